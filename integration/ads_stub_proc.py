"""A stand-in ADS server in its own process, for bootstrap failover tests (test helper).

Usage: python ads_stub_proc.py NAME [GRPC_OPTIONS_JSON]

It accepts SotW and Delta ADS streams, answers nothing, and prints one JSON line per event:
{"ready": true, "port": P} once bound on 127.0.0.1 (port 0: the kernel picks), then
{"event": "open", "server": NAME, "node": ID, "t": unix_time} when a stream starts and
{"event": "close", ...} when it ends (with "error" when the stream broke).
GRPC_OPTIONS_JSON is a list of [key, value] pairs passed to grpc.server (ping policy, ...).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryRequest, DiscoveryRequest

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_lock = threading.Lock()


def _print(obj: dict[str, Any]) -> None:
    with _lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _stream(name: str) -> Any:
    def handler(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[bytes]:
        node = ""
        opened = False
        try:
            for request in requests:
                if not opened:
                    node = request.node.id if request.node else ""
                    opened = True
                    _print({"event": "open", "server": name, "node": node, "t": time.time()})
        except Exception as exc:  # the stream broke
            _print(
                {
                    "event": "close",
                    "server": name,
                    "node": node,
                    "t": time.time(),
                    "error": repr(exc),
                }
            )
            return
        _print({"event": "close", "server": name, "node": node, "t": time.time()})
        yield from ()

    return handler


def main() -> None:
    name = sys.argv[1]
    options = [tuple(o) for o in json.loads(sys.argv[2])] if len(sys.argv) > 2 else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                        _stream(name),
                        request_deserializer=DiscoveryRequest.parse,
                        response_serializer=bytes,
                    ),
                    "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                        _stream(name),
                        request_deserializer=DeltaDiscoveryRequest.parse,
                        response_serializer=bytes,
                    ),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _print({"ready": True, "port": port})
    server.wait_for_termination()


if __name__ == "__main__":
    main()
