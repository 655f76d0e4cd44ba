"""A real OTLP gRPC trace receiver for tests, built from opentelemetry-proto's collector service.

    with OtlpReceiver() as receiver:            # binds 127.0.0.1 on a free port
        endpoint = receiver.endpoint            # "http://127.0.0.1:PORT" (plaintext gRPC)
        ...                                     # point Tracing (or Envoy) at it
        spans = receiver.wait_for(lambda spans: len(spans) >= 7, timeout=10)

Every ExportTraceServiceRequest is kept (`requests`) and flattened into `ReceivedSpan`s with hex
ids, attributes and event attributes as plain Python values, and the resource attributes of the
process that sent them (service.name, service.instance.id).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

__all__ = ["OtlpReceiver", "ReceivedEvent", "ReceivedSpan", "any_value"]


def any_value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in items}


@dataclass(frozen=True)
class ReceivedEvent:
    name: str
    time_unix_nano: int
    attributes: Mapping[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    start_unix_nano: int
    end_unix_nano: int
    attributes: Mapping[str, Any]
    events: tuple[ReceivedEvent, ...]
    resource: Mapping[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    scope: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def service_instance(self) -> str | None:
        value = self.resource.get("service.instance.id")
        return str(value) if value is not None else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver._add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """OTLP/gRPC TraceService on loopback; start() / stop(), or use it as a context manager."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port: int | None = None
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._spans: list[ReceivedSpan] = []
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("receiver not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        port = server.add_insecure_port(f"{self.host}:0")
        if port == 0:
            raise OSError(f"OTLP receiver: cannot bind {self.host}")
        server.start()
        self._server, self.port = server, port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = _attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            start_unix_nano=s.start_time_unix_nano,
                            end_unix_nano=s.end_time_unix_nano,
                            attributes=_attributes(s.attributes),
                            events=tuple(
                                ReceivedEvent(e.name, e.time_unix_nano, _attributes(e.attributes))
                                for e in s.events
                            ),
                            resource=resource,
                            status_code=int(s.status.code),
                            status_message=s.status.message,
                            scope=ss.scope.name,
                        )
                    )
        with self._cond:
            self.requests.append(request)
            self._spans.extend(spans)
            self._cond.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self.requests.clear()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Block until predicate(spans) holds; AssertionError with what arrived at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted(f"{s.name}@{s.service_instance}" for s in self._spans)
                    raise AssertionError(
                        f"OTLP receiver: condition not met within {timeout} s; got {names}"
                    )
                self._cond.wait(left)
            return list(self._spans)
