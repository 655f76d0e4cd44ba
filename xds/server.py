"""grpcio (asyncio) binding of the ADS service: `StreamAggregatedResources` (SotW) and
`DeltaAggregatedResources` (Delta) of envoy.service.discovery.v3.AggregatedDiscoveryService.

`server` decides *how* things are sent (go-control-plane's split). Requests are parsed with
envoy-data-plane's types; responses are framed from bytes the cache encoded once, so the
per-stream cost of a push is a nonce and a concatenation. Each stream is one reader (the RPC
handler) and one writer task draining a queue, so pushes from the cache never block on a
slow proxy and never interleave.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy_data_plane.envoy.config.core.v3 import Node
from grpc import aio

from . import wire
from .cache import Snapshot, SnapshotCache
from .protocol import (
    Action,
    DeltaRequest,
    DeltaStream,
    NodeInfo,
    ProtocolError,
    Send,
    SotwRequest,
    SotwStream,
)
from .tracker import ProxyTracker

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Envoy's bootstrap (filters/bootstrap.py) pings every 2 s to notice a paused control-plane
    # node; grpcio's defaults answer such pings with GOAWAY "too_many_pings" after ~11 s.
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.so_reuseport", 0),
    # A restarted node sees every proxy reconnect at once; grpc's default pending-request
    # limits cancel most of those streams (bench: 4,959 retries for 5,000 streams).
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]


def node_info(node: Node | None) -> NodeInfo | None:
    if node is None:
        return None
    metadata: dict[str, object] = {}
    if node.metadata is not None:
        try:
            metadata = dict(node.metadata.to_dict())
        except Exception:  # metadata is informative only
            metadata = {}
    return NodeInfo(id=node.id, cluster=node.cluster, metadata=metadata, user_agent=node.user_agent_name)


def parse_sotw(data: bytes) -> SotwRequest:
    """DiscoveryRequest{version_info=1, node=2, resource_names=3, type_url=4,
    response_nonce=5, error_detail=6}, read by a wire scan; only a node is parsed with
    envoy-data-plane (it comes once per stream)."""
    version = type_url = nonce = ""
    names: list[str] = []
    node: NodeInfo | None = None
    error: str | None = None
    for number, _, value in wire.iter_fields(data):
        if not isinstance(value, bytes):
            continue
        if number == 1:
            version = value.decode()
        elif number == 2:
            node = node_info(Node.parse(value))
        elif number == 3:
            names.append(value.decode())
        elif number == 4:
            type_url = value.decode()
        elif number == 5:
            nonce = value.decode()
        elif number == 6:
            error = wire.decode_status(value)
    return SotwRequest(type_url, version, nonce, tuple(names), error, node)


def parse_delta(data: bytes) -> DeltaRequest:
    """DeltaDiscoveryRequest{node=1, type_url=2, resource_names_subscribe=3,
    resource_names_unsubscribe=4, initial_resource_versions=5, response_nonce=6,
    error_detail=7}, read by a wire scan."""
    type_url = nonce = ""
    subscribe: list[str] = []
    unsubscribe: list[str] = []
    initial: dict[str, str] = {}
    node: NodeInfo | None = None
    error: str | None = None
    for number, _, value in wire.iter_fields(data):
        if not isinstance(value, bytes):
            continue
        if number == 1:
            node = node_info(Node.parse(value))
        elif number == 2:
            type_url = value.decode()
        elif number == 3:
            subscribe.append(value.decode())
        elif number == 4:
            unsubscribe.append(value.decode())
        elif number == 5:
            key, version = wire.decode_map_entry(value)
            initial[key] = version
        elif number == 6:
            nonce = value.decode()
        elif number == 7:
            error = wire.decode_status(value)
    return DeltaRequest(type_url, tuple(subscribe), tuple(unsubscribe), initial, nonce, error, node)


def frame(send: Send, control_plane_id: str, delta: bool) -> bytes:
    if delta:
        return wire.delta_response(
            send.version,
            (item.delta_bytes for item in send.resources),
            send.type_url,
            send.removed,
            send.nonce,
            control_plane_id,
        )
    body = send.snapshot.sotw_body(send.type_url, send.resources, send.version)
    return body + wire.sotw_tail(send.nonce, control_plane_id)


class AdsServer:
    """Serves ADS from a SnapshotCache; records every stream in a ProxyTracker."""

    def __init__(self, cache: SnapshotCache, tracker: ProxyTracker, control_plane_id: str = "") -> None:
        self.cache = cache
        self.tracker = tracker
        self.control_plane_id = control_plane_id
        self._ids = itertools.count(1)
        self._server: aio.Server | None = None
        self.port: int | None = None
        self.streams: dict[int, SotwStream | DeltaStream] = {}
        self.accepting = True

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(self._sotw),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(self._delta),
            },
        )

    async def start(self, host: str, port: int) -> int:
        server = aio.server(options=_GRPC_OPTIONS)
        server.add_generic_rpc_handlers((self.handler(),))
        try:
            bound = server.add_insecure_port(f"{host}:{port}")  # grpcio >= 1.60 raises RuntimeError
        except RuntimeError:
            bound = 0
        if bound == 0:
            await server.stop(None)  # else its __del__ schedules a shutdown on a closed loop
            raise OSError(f"xDS: cannot listen on {host}:{port} (address in use or not available)")
        await server.start()
        self._server, self.port = server, bound
        log.info("xDS (ADS, SotW and Delta) listening on %s:%d", host, bound)
        return bound

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def _sotw(self, requests: AsyncIterator[bytes], context: aio.ServicerContext) -> None:
        await self._serve(requests, context, SotwStream(), parse_sotw)

    async def _delta(self, requests: AsyncIterator[bytes], context: aio.ServicerContext) -> None:
        await self._serve(requests, context, DeltaStream(), parse_delta)

    async def _serve(
        self,
        requests: AsyncIterator[bytes],
        context: aio.ServicerContext,
        stream: SotwStream | DeltaStream,
        parse: Callable[[bytes], Any],
    ) -> None:
        stream_id = next(self._ids)
        out = _Outbox(stream, stream_id, self, isinstance(stream, DeltaStream))
        writer = asyncio.create_task(out.write(context))
        cancel_watch: Callable[[], None] | None = None
        try:
            async for data in requests:
                try:
                    request = parse(data)
                except Exception as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse request: {exc}")
                    return
                if cancel_watch is None:
                    node = request.node or NodeInfo(id=f"unknown-{stream_id}")
                    group = self.cache.group_of(node.id, node.cluster)
                    snapshot = self.cache.get(group)
                    if snapshot is not None:
                        stream.snapshot = snapshot
                    self.streams[stream_id] = stream
                    self.tracker.connect(stream_id, node, stream)
                    cancel_watch = self.cache.watch(group, lambda _g, snap: out.snapshot(snap))
                try:
                    out.emit(stream.receive(request))
                except ProtocolError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                if writer.done():
                    break
        except asyncio.CancelledError:
            raise
        finally:
            if cancel_watch is not None:
                cancel_watch()
            writer.cancel()
            self.streams.pop(stream_id, None)
            self.tracker.disconnect(stream_id)


class _Outbox:
    """One stream's way out. A new snapshot only marks the stream; its writer task runs the
    protocol's update and frames the responses, so a push to thousands of streams starts
    writing to the first at once instead of after every stream was computed (and a stream
    that is slow to drain computes only the latest snapshot)."""

    def __init__(self, stream: SotwStream | DeltaStream, stream_id: int, server: AdsServer, delta: bool) -> None:
        self.stream = stream
        self.stream_id = stream_id
        self.server = server
        self.delta = delta
        self.frames: collections.deque[bytes] = collections.deque()
        self.latest: Snapshot | None = None
        self.wake = asyncio.Event()

    def snapshot(self, snapshot: Snapshot) -> None:
        self.latest = snapshot
        self.wake.set()

    def emit(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.frames.append(frame(action, self.server.control_plane_id, self.delta))
        self.server.tracker.record(self.stream_id, actions)
        if self.frames:
            self.wake.set()

    async def write(self, context: aio.ServicerContext) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.latest is not None:
                snapshot, self.latest = self.latest, None
                self.emit(self.stream.update(snapshot))
            while self.frames:
                await context.write(self.frames.popleft())
