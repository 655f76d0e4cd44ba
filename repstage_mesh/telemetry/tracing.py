"""OpenTelemetry traces of failovers: one trace per failover or switchover, across every node.

The leader's failover engine opens the trace; every node (followers too) adds a "push" span for
its own proxies, because the trace context travels inside the replicated command
(`SetPrimary.trace`, W3C traceparent):

    failover  (root: service, old/new primary, epoch, cause, mode)         leader
    ├── detection / decision / raft.commit / promotion                     leader
    ├── push  (cp-1: one "ack" event per proxy: node id, version, latency)  every node
    └── push  (cp-2 ...)

Span "push" (one per node and version): attributes repstage.control_plane, repstage.version (the
Raft index), repstage.push.proxies (count expected), and at its end repstage.push.followed (count),
repstage.push.not_followed / .lagging / .nacked / .disconnected (proxy node ids),
repstage.push.timed_out; status ERROR when a proxy did not follow. Events, one per proxy:
"ack" (repstage.proxy.node_id, .proxy.stream_id, repstage.version: the version_info ACKed,
repstage.latency_s: from the push's start, repstage.xds.send_ack_s: that response's send -> ACK,
repstage.xds.types: e.g. ["eds"]), "unchanged" (its config did not change at this version),
"nack" (with repstage.error), "disconnect". The root span ends with repstage.not_followed.

Configuration: `telemetry.otlp_endpoint` in the config file (or REPSTAGE_TELEMETRY__OTLP_ENDPOINT),
else the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`. No endpoint,
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`: tracing is off, the SDK is not even
imported, and every call below returns at once. Export is OTLP over gRPC with a
BatchSpanProcessor (tuned by `OTEL_BSP_*`); TLS, headers, timeout and compression follow the
exporter's own `OTEL_EXPORTER_OTLP_*` variables (an `http://` endpoint is plaintext, `https://`
TLS; a bare HOST:PORT is plaintext unless `OTEL_EXPORTER_OTLP_[TRACES_]INSECURE` says otherwise). The
service name is `telemetry.service_name` when set in the config, else `OTEL_SERVICE_NAME`, else
"repstage-mesh"; `OTEL_RESOURCE_ATTRIBUTES` are added; `service.instance.id` is the node id.
Each `Tracing` has its own TracerProvider (nothing global), so several nodes can share a process.

    tracing = Tracing.setup(settings.telemetry, node_id)
    push_tracer = tracing.push_tracer()
    push_tracer.attach(tracker)                         # a TrackerObserver

    # leader, failover engine:
    ft = tracing.start_failover("db", old="a", new="b", cause="primary_down", mode="follow",
                                started_at=first_failed_probe_wall_time)
    ft.record("detection", start=first_failed_probe_wall_time, end=time.time(), probes=3)
    with ft.child("decision"): ...
    with ft.child("raft.commit") as phase:
        outcome = await plane.submit(SetPrimary(..., trace=ft.context()))
        phase.set(index=..., epoch=...)
    ft.set(epoch=...)
    result = await push_tracer.wait(ft.context(), timeout=ack_deadline + 1)
    seconds = ft.end(not_followed=result.not_followed if result else ())

    # every node, once the command at `index` is applied AND published to the xDS cache:
    push_tracer.begin(index, command.trace, timeout=ack_deadline)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from repstage_mesh.config import TelemetryConfig
from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.errors import ConfigError
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.protocol import Acked, Nacked, Send, type_sync_state
from repstage_mesh.xds.tracker import ProxyRecord, ProxyTracker

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

__all__ = [
    "FailoverTrace",
    "Phase",
    "PushResult",
    "PushTracer",
    "Tracing",
    "resolve_endpoint",
]

_PROPAGATOR = TraceContextTextMapPropagator()
_SCOPE = "repstage_mesh.failover.runner"
_KEEP_RESULTS = 64
MAX_PUSH_EVENTS = 10_000  # span event limit (one "ack" event per proxy)
Attr = str | bool | int | float | Sequence[str]


def _attrs(values: Mapping[str, Any]) -> dict[str, Attr]:
    """`repstage.`-prefixed OTel attributes; None values are left out."""
    out: dict[str, Attr] = {}
    for key, value in values.items():
        if value is None:
            continue
        name = key if key.startswith("repstage.") else f"repstage.{key}"
        if isinstance(value, str | bool | int | float):
            out[name] = value
        elif isinstance(value, Iterable):
            out[name] = [str(v) for v in value]
        else:
            out[name] = str(value)
    return out


def _ns(wall_seconds: float | None) -> int | None:
    return None if wall_seconds is None else int(wall_seconds * 1e9)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def resolve_endpoint(telemetry: TelemetryConfig | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP gRPC endpoint to export to, or None when tracing is off.

    Raises ConfigError naming the field (or variable) when the endpoint is not HOST:PORT or an
    http(s):// URL."""
    env = os.environ if environ is None else environ
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return None
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters == {"none"}:
        return None
    candidates = [
        ("telemetry.otlp_endpoint", telemetry.otlp_endpoint if telemetry is not None else None),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", env.get("OTEL_EXPORTER_OTLP_ENDPOINT")),
    ]
    for where, value in candidates:
        if value is None or not value.strip():
            continue
        value = value.strip()
        if exporters - {"otlp"}:
            log.warning("OTEL_TRACES_EXPORTER=%s: only otlp (gRPC) is supported; using otlp", ",".join(sorted(exporters)))
        _check_endpoint(where, value)
        return value
    return None


def _check_endpoint(where: str, value: str) -> None:
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.hostname:
            try:
                parts.port  # noqa: B018 - raises ValueError for a bad port
            except ValueError:
                pass
            else:
                return
        raise ConfigError([(where, f"expected HOST:PORT or an http(s):// URL, got {value!r}")])
    try:
        parse_host_port(value)
    except ValueError as exc:
        raise ConfigError([(where, f"{exc} (or an http(s):// URL)")]) from None


def _plaintext(endpoint: str | None, environ: Mapping[str, str] | None = None) -> bool | None:
    """True for a bare HOST:PORT (what an OTel collector listens for by default), unless
    `OTEL_EXPORTER_OTLP_TRACES_INSECURE` / `OTEL_EXPORTER_OTLP_INSECURE` decide; None (the
    exporter decides: http:// plaintext, https:// TLS) for a URL. Without this the exporter
    would open TLS to a bare HOST:PORT and drop every span against a plaintext collector."""
    env = os.environ if environ is None else environ
    if endpoint is None or "://" in endpoint:
        return None
    if env.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE") is not None or env.get("OTEL_EXPORTER_OTLP_INSECURE") is not None:
        return None
    return True


# --- the failover trace (leader) --------------------------------------------------------------


class Phase:
    """A span in progress: detection, decision, raft.commit, promotion. No-op when tracing is off."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def set(self, **attrs: Any) -> None:
        if self.span is not None:
            self.span.set_attributes(_attrs(attrs))

    def event(self, name: str, **attrs: Any) -> None:
        if self.span is not None:
            self.span.add_event(name, _attrs(attrs))


_NOOP_PHASE = Phase(None)


class FailoverTrace:
    """One failover's trace. When tracing is off every method is a no-op, `context()` is None,
    and `end()` still returns the duration (for the failover histogram)."""

    DETECTION = "detection"
    DECISION = "decision"
    COMMIT = "raft.commit"
    PROMOTION = "promotion"

    def __init__(self, tracer: Tracer | None, span: Span | None, started_at: float) -> None:
        self._tracer = tracer
        self._span = span
        self._ctx = trace.set_span_in_context(span) if span is not None else None
        self.started_at = started_at
        self.ended_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self._span is not None

    @property
    def trace_id(self) -> str | None:
        return f"{self._span.get_span_context().trace_id:032x}" if self._span is not None else None

    @property
    def span_id(self) -> str | None:
        return f"{self._span.get_span_context().span_id:016x}" if self._span is not None else None

    def context(self) -> dict[str, str] | None:
        """W3C trace context ({"traceparent": ...}) to put in SetPrimary.trace; None when off."""
        if self._ctx is None:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=self._ctx)
        return carrier

    @contextlib.contextmanager
    def child(self, name: str, **attrs: Any) -> Iterator[Phase]:
        """A child span around a block; an exception escaping the block is recorded on it."""
        if self._tracer is None:
            yield _NOOP_PHASE
            return
        span = self._tracer.start_span(name, context=self._ctx, attributes=_attrs(attrs))
        with trace.use_span(span, end_on_exit=True):
            yield Phase(span)

    def record(self, name: str, start: float, end: float | None = None, **attrs: Any) -> None:
        """A child span for a phase already over (wall-clock seconds, time.time()); e.g.
        detection, which starts at the first failed probe, before anyone knew of a failover."""
        if self._tracer is None:
            return
        span = self._tracer.start_span(name, context=self._ctx, attributes=_attrs(attrs), start_time=_ns(start))
        span.end(end_time=_ns(end))

    def set(self, **attrs: Any) -> None:
        """Attributes of the root span (e.g. epoch=..., once the commit gave it)."""
        if self._span is not None:
            self._span.set_attributes(_attrs(attrs))

    def end(self, *, not_followed: Sequence[str] = (), error: str | None = None, end_time: float | None = None) -> float:
        """End the root span (once; later calls change nothing). Returns seconds since start."""
        if self.ended_at is None:
            self.ended_at = time.time() if end_time is None else end_time
            if self._span is not None:
                self._span.set_attribute("repstage.not_followed", [str(p) for p in not_followed])
                if error is not None:
                    self._span.set_status(Status(StatusCode.ERROR, error))
                elif not_followed:
                    self._span.set_status(Status(StatusCode.ERROR, f"{len(not_followed)} proxies did not follow"))
                self._span.end(end_time=_ns(self.ended_at))
        return self.ended_at - self.started_at


# --- the per-node push span --------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    """How this node's proxies followed one version."""

    control_plane: str
    version_index: int
    traceparent: str
    expected: tuple[str, ...]
    followed: tuple[tuple[str, float], ...]  # (proxy node id, seconds from begin to its last ACK)
    nacked: tuple[str, ...]
    disconnected: tuple[str, ...]
    lagging: tuple[str, ...]  # still not there at the deadline
    timed_out: bool
    duration: float

    @property
    def not_followed(self) -> tuple[str, ...]:
        return self.lagging + self.nacked + self.disconnected


@dataclass
class _Waiting:
    record: ProxyRecord
    acked_types: set[str] = field(default_factory=set)


@dataclass
class _Push:
    span: Span
    key: str
    version_index: int
    started: float
    deadline: float
    expected: tuple[str, ...]
    waiting: dict[int, _Waiting]
    followed: list[tuple[str, float]] = field(default_factory=list)
    nacked: list[str] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


def version_index(version: str) -> int:
    """Index of an xDS version we sent: the part before '-' (SotW) or the whole (Delta)."""
    head = version.partition("-")[0]
    return int(head) if head.isdigit() else -1


def _progress(record: ProxyRecord, index: int) -> str:
    """'followed', 'nacked' (refused what it would get at >= index) or 'waiting'."""
    stream = record.stream
    snap = stream.snapshot
    if snap is None or snap.index < index:
        return "waiting"
    types = list(stream.types.items())
    if any(state.pending for _, state in types):
        return "waiting"
    nacked = False
    for type_url, _ in types:
        sync = type_sync_state(stream, type_url)
        if sync == "nacked":
            nacked = True
        elif sync not in ("synced", "idle"):
            return "waiting"
    return "nacked" if nacked else "followed"


class PushTracer:
    """A TrackerObserver that turns this node's push of one version into a "push" span.

    `begin()` opens a span, child of the carried trace context, waiting for the proxies
    connected now. Each proxy that reaches the version (every type it asked for ACKed at that
    snapshot or later) adds an "ack" event; a proxy that already had it adds "unchanged"; a NACK
    or a disconnect adds an event and counts as not followed. The span ends at the last proxy or
    at the deadline, with the proxies that did not follow in `repstage.push.not_followed`.

    The deadline fires by itself on the running asyncio loop (if `begin` runs on one); without
    a loop, call `poll()`. Hooks are called on the thread that drives the tracker.
    """

    def __init__(self, tracer: Tracer | None, control_plane: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._tracer = tracer
        self.control_plane = control_plane
        self.clock = clock
        self.tracker: ProxyTracker | None = None
        self._open: list[_Push] = []
        self._results: dict[str, PushResult] = {}
        self._waiters: dict[str, list[asyncio.Future[PushResult]]] = {}

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def attach(self, tracker: ProxyTracker) -> None:
        """Observe `tracker`; `begin()` then defaults to the proxies it has connected."""
        self.tracker = tracker
        if self not in tracker.observers:
            tracker.observers.append(self)

    def begin(
        self,
        index: int,
        trace_context: Mapping[str, str] | None,
        expected: Iterable[ProxyRecord] | None = None,
        timeout: float = 5.0,
    ) -> bool:
        """Open the push span for version `index` (the Raft index of the applied command).
        Call it after the snapshot for `index` went to the xDS cache. Returns False (and does
        nothing) when tracing is off or `trace_context` holds no valid traceparent."""
        if self._tracer is None or not trace_context:
            return False
        parent = _PROPAGATOR.extract(carrier=dict(trace_context))
        if not trace.get_current_span(parent).get_span_context().is_valid:
            log.debug("push %d: no valid traceparent in %r", index, trace_context)
            return False
        if expected is None:
            expected = self.tracker.connected() if self.tracker is not None else ()
        records = [r for r in expected if r.connected]
        names = tuple(r.node.id for r in records)
        span = self._tracer.start_span(
            "push",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=_attrs({"control_plane": self.control_plane, "version": index, "push.proxies": len(names)}),
        )
        now = self.clock()
        push = _Push(
            span=span,
            key=trace_context.get("traceparent", ""),
            version_index=index,
            started=now,
            deadline=now + timeout,
            expected=names,
            waiting={id(r): _Waiting(r) for r in records},
        )
        self._open.append(push)
        for waiting in list(push.waiting.values()):
            self._check(push, waiting, None)
        if push.waiting:
            with contextlib.suppress(RuntimeError):  # no running loop: the caller polls
                push.timer = asyncio.get_running_loop().call_later(timeout, self._close, push, True)
        else:
            self._close(push, False)
        return True

    def poll(self, now: float | None = None) -> int:
        """Re-check waiting proxies (one whose config did not change at this version follows
        without an ACK) and close pushes past their deadline. Returns how many closed."""
        if not self._open:
            return 0
        now = self.clock() if now is None else now
        closed = 0
        for push in list(self._open):
            for waiting in list(push.waiting.values()):
                self._check(push, waiting, None)
            if push in self._open and push.deadline <= now:
                self._close(push, True)
            if push not in self._open:
                closed += 1
        return closed

    def open_pushes(self) -> int:
        return len(self._open)

    def result(self, trace_context: Mapping[str, str] | None) -> PushResult | None:
        """The result of this node's push for that trace context, once closed."""
        return self._results.get(trace_context.get("traceparent", "")) if trace_context else None

    async def wait(self, trace_context: Mapping[str, str] | None, timeout: float) -> PushResult | None:
        """Wait until this node's push for that trace context closes; None when tracing is off,
        or nothing closed within `timeout` (e.g. begin() was never called)."""
        if not trace_context or self._tracer is None:
            return None
        key = trace_context.get("traceparent", "")
        done = self._results.get(key)
        if done is not None:
            return done
        future: asyncio.Future[PushResult] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(key, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(key, None)

    # --- TrackerObserver ----------------------------------------------------------------------

    def on_connect(self, record: ProxyRecord) -> None:
        pass

    def on_send(self, record: ProxyRecord, send: Send) -> None:
        pass

    def on_disconnect(self, record: ProxyRecord) -> None:
        if not self._open:
            return
        for push in list(self._open):
            waiting = push.waiting.pop(id(record), None)
            if waiting is not None:
                push.disconnected.append(record.node.id)
                push.span.add_event("disconnect", _attrs({"proxy.node_id": record.node.id, "proxy.stream_id": record.stream_id}))
                if not push.waiting:
                    self._close(push, False)

    def on_ack(self, record: ProxyRecord, ack: Acked, latency: float | None) -> None:
        if not self._open:
            return
        key = id(record)
        for push in list(self._open):
            waiting = push.waiting.get(key)
            if waiting is not None:
                if version_index(ack.version) >= push.version_index:
                    waiting.acked_types.add(ack.type_url)
                self._check(push, waiting, ack, latency)

    def on_nack(self, record: ProxyRecord, nack: Nacked) -> None:
        if not self._open:
            return
        key = id(record)
        for push in list(self._open):
            if key in push.waiting and version_index(nack.version) >= push.version_index:
                del push.waiting[key]
                push.nacked.append(record.node.id)
                push.span.add_event(
                    "nack",
                    _attrs({
                        "proxy.node_id": record.node.id, "proxy.stream_id": record.stream_id,
                        "version": nack.version, "xds.type": res.short_name(nack.type_url), "error": nack.error[:512],
                        "latency_s": self.clock() - push.started,
                    }),
                )
                if not push.waiting:
                    self._close(push, False)

    # --- internals ----------------------------------------------------------------------------

    def _check(self, push: _Push, waiting: _Waiting, ack: Acked | None, latency: float | None = None) -> None:
        record = waiting.record
        state = _progress(record, push.version_index)
        if state == "waiting":
            return
        del push.waiting[id(record)]
        elapsed = self.clock() - push.started
        if state == "nacked":
            push.nacked.append(record.node.id)
            push.span.add_event("nack", _attrs({"proxy.node_id": record.node.id, "proxy.stream_id": record.stream_id}))
        else:
            push.followed.append((record.node.id, elapsed))
            acked = bool(waiting.acked_types)
            push.span.add_event(
                "ack" if acked else "unchanged",
                _attrs({
                    "proxy.node_id": record.node.id,
                    "proxy.stream_id": record.stream_id,
                    "version": ack.version if ack is not None and acked else str(push.version_index),
                    "latency_s": elapsed,
                    "xds.send_ack_s": latency if acked else None,
                    "xds.types": sorted(res.short_name(t) for t in waiting.acked_types),
                }),
            )
        if not push.waiting:
            self._close(push, False)

    def _close(self, push: _Push, timed_out: bool) -> None:
        if push not in self._open:
            return
        self._open.remove(push)
        if push.timer is not None:
            push.timer.cancel()
        lagging = tuple(w.record.node.id for w in push.waiting.values())
        result = PushResult(
            control_plane=self.control_plane,
            version_index=push.version_index,
            traceparent=push.key,
            expected=push.expected,
            followed=tuple(push.followed),
            nacked=tuple(push.nacked),
            disconnected=tuple(push.disconnected),
            lagging=lagging,
            timed_out=timed_out and bool(lagging),
            duration=self.clock() - push.started,
        )
        span = push.span
        span.set_attributes(
            _attrs({
                "push.followed": len(result.followed),
                "push.not_followed": result.not_followed,
                "push.lagging": result.lagging,
                "push.nacked": result.nacked,
                "push.disconnected": result.disconnected,
                "push.timed_out": result.timed_out,
            })
        )
        if result.not_followed:
            span.set_status(Status(StatusCode.ERROR, f"{len(result.not_followed)} of {len(push.expected)} proxies did not follow"))
        span.end()
        self._results[push.key] = result
        while len(self._results) > _KEEP_RESULTS:
            del self._results[next(iter(self._results))]
        for future in self._waiters.pop(push.key, []):
            if not future.done():
                future.set_result(result)


# --- setup ------------------------------------------------------------------------------------


class Tracing:
    """This node's tracing: a TracerProvider of its own exporting over OTLP gRPC, or nothing."""

    def __init__(self, node_id: str, provider: TracerProvider | None = None) -> None:
        self.node_id = node_id
        self.provider = provider
        self.tracer: Tracer | None = provider.get_tracer(_SCOPE) if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def disabled(cls, node_id: str = "") -> Tracing:
        return cls(node_id)

    @classmethod
    def setup(
        cls,
        telemetry: TelemetryConfig | None,
        node_id: str,
        *,
        exporter: SpanExporter | None = None,
    ) -> Tracing:
        """Tracing as the config and the `OTEL_*` environment say; off when no endpoint is set
        (and no `exporter` is given: tests may pass one, e.g. an InMemorySpanExporter).
        Raises ConfigError naming the field for a malformed endpoint."""
        endpoint = resolve_endpoint(telemetry)
        if endpoint is None and exporter is None:
            return cls(node_id)
        from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        telemetry = telemetry if telemetry is not None else TelemetryConfig()
        attributes: dict[str, str] = {SERVICE_INSTANCE_ID: node_id}
        if "service_name" in telemetry.model_fields_set or not os.environ.get("OTEL_SERVICE_NAME"):
            attributes[SERVICE_NAME] = telemetry.service_name
        # One event per proxy on a push span: the SDK's default of 128 events would drop most
        # of them on a node with many proxies. OTEL_SPAN_EVENT_COUNT_LIMIT still decides when set.
        limits = SpanLimits(
            max_events=None if os.environ.get("OTEL_SPAN_EVENT_COUNT_LIMIT") else MAX_PUSH_EVENTS
        )
        provider = TracerProvider(resource=Resource.create(attributes), span_limits=limits)
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=_plaintext(endpoint))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing: exporting failover traces over OTLP gRPC to %s", endpoint or type(exporter).__name__)
        return cls(node_id, provider)

    def start_failover(
        self,
        service: str,
        old: str | None,
        new: str | None,
        *,
        cause: str,
        mode: str,
        epoch: int | None = None,
        started_at: float | None = None,
        **attrs: Any,
    ) -> FailoverTrace:
        """Open the root span of a failover (or switchover). `started_at` (time.time()) lets
        the trace begin at the first sign of trouble (the first failed probe)."""
        start = time.time() if started_at is None else started_at
        if self.tracer is None:
            return FailoverTrace(None, None, start)
        span = self.tracer.start_span(
            "failover",
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # always a new trace
            attributes=_attrs({
                "service": service, "old_primary": old or "", "new_primary": new or "",
                "epoch": epoch, "cause": cause, "mode": mode, "control_plane": self.node_id, **attrs,
            }),
            start_time=_ns(start),
        )
        return FailoverTrace(self.tracer, span, start)

    def push_tracer(self, clock: Callable[[], float] = time.monotonic) -> PushTracer:
        return PushTracer(self.tracer, self.node_id, clock)

    def flush(self, timeout: float = 5.0) -> bool:
        """Export everything ended so far; True when done within `timeout`."""
        if self.provider is None:
            return True
        return self.provider.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking: run it in an executor from async code)."""
        if self.provider is not None:
            self.provider.shutdown()
