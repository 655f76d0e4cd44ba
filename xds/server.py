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
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from grpc import aio

from . import wire
from .cache import Snapshot, SnapshotCache
from .limits import AdmissionGate, LimitExceeded, StreamSlots, XdsLimits, check_names
from .protocol import (
    Action,
    DeltaStream,
    NodeInfo,
    ProtocolError,
    Send,
    SotwStream,
)
from .requests import NodeReading, node_info, parse_delta, parse_sotw
from .tls import AuthContext, CertificateReloader, Refusal, XdsSecurity
from .tracker import ProxyTracker

__all__ = ["AdsServer", "GuardObserver", "frame", "node_info", "parse_delta", "parse_sotw"]

if TYPE_CHECKING:
    from .http2 import H2Listener

log = logging.getLogger(__name__)

# "grpc": grpcio's asyncio server; "h2": python-hyper's h2 on asyncio (http2.py), ~3x less CPU
# per stream and push.
TRANSPORTS = ("grpc", "h2")
DEFAULT_TRANSPORT = "h2"

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_GRPC_OPTIONS = [
    # A proxy that vanished (host down, partition) is noticed within ~3 s, so a failover's proxy
    # wait stops waiting for it (xds/tracker.py: a disconnected proxy is not waited for).
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 1_000),
    # Envoy's bootstrap (filters/bootstrap.py) pings every 0.4 s to notice a paused control-plane
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
    # grpc core cancels a stream its server has not picked up within 30 s (its default): with
    # tens of thousands connecting at once most were cancelled (bench: ~22,000 of 30,000).
    ("grpc.server_max_unrequested_time_in_server", 600),
]


# Requests of at most this many bytes are kept by their bytes once parsed, at most this many of
# each kind (then forgotten all at once): ~0.5 MiB at most per server.
_PARSED_BYTES = 1024
_PARSED_ENTRIES = 512


@functools.lru_cache(maxsize=4096)
def _sotw_tail(nonce: str, control_plane_id: str) -> bytes:
    """Streams in step number their responses alike: one push's tails are mostly the same."""
    return wire.sotw_tail(nonce, control_plane_id)


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
    return body + _sotw_tail(send.nonce, control_plane_id)


class _QuietLog:
    """At most one log line per key (a limit or refusal reason) per second, so a client that
    opens thousands of refused streams cannot flood the log; the metrics count every one."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def log(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        suffix = f" ({quiet} more like it since the last line, not logged)" if quiet else ""
        log.info(message + suffix, *args)


class GuardObserver(Protocol):
    """Told when a limit is hit (`limits.LIMIT_NAMES`) or a stream refused
    (`tls.REFUSAL_REASONS`): both fixed sets, so metric labels stay bounded."""

    def on_limit(self, limit: str) -> None: ...
    def on_refusal(self, reason: str) -> None: ...


class _NoGuardObserver:
    def on_limit(self, limit: str) -> None:
        return None

    def on_refusal(self, reason: str) -> None:
        return None


class AdsServer:
    """Serves ADS from a SnapshotCache; records every stream in a ProxyTracker. `limits` bound
    what one client may cost; `security` decides who may open a stream (TLS, node identity,
    plaintext on loopback only)."""

    def __init__(
        self,
        cache: SnapshotCache,
        tracker: ProxyTracker,
        control_plane_id: str = "",
        *,
        limits: XdsLimits | None = None,
        security: XdsSecurity | None = None,
        guard: GuardObserver | None = None,
        first_stream_id: int = 1,
        grpc_options: Sequence[tuple[str, Any]] = (),
        transport: str = DEFAULT_TRANSPORT,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"xds.transport: expected one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.transport = transport
        self.cache = cache
        self.tracker = tracker
        self.control_plane_id = control_plane_id
        self.limits = limits or XdsLimits()
        self.security = security or XdsSecurity()
        self.guard: GuardObserver = guard or _NoGuardObserver()
        self.slots = StreamSlots(self.limits)
        self.admission = AdmissionGate(self.limits)
        self._log = _QuietLog()
        self.reloader: CertificateReloader | None = None
        self._ids = itertools.count(first_stream_id)  # a worker's ids do not meet another's (workers.py)
        self.grpc_options = {**dict(_GRPC_OPTIONS), **dict(grpc_options)}  # e.g. grpc.so_reuseport
        self._server: aio.Server | None = None
        self._h2: H2Listener | None = None
        self.port: int | None = None
        self.streams: dict[int, SotwStream | DeltaStream] = {}
        # Requests seen again, parsed once: the streams of one push send the same ACK bytes
        # (the same version, nonce and names), and a parse without a node or an error detail is
        # a plain value of its bytes (`_read`).
        self._parsed: dict[Callable[..., Any], dict[bytes, Any]] = {parse_sotw: {}, parse_delta: {}}
        self._outboxes: dict[int, _Outbox] = {}
        self.accepting = True

    def renew(self) -> int:
        """Renew the leased resources on every stream (`SotwStream.renew`); each stream's
        writer sends them. Returns the number of streams asked."""
        for out in self._outboxes.values():
            out.renew()
        return len(self._outboxes)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(self._sotw),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(self._delta),
            },
        )

    async def start(self, host: str, port: int, serving: bool = True) -> int:
        """Bind and listen. `serving=False` (the h2 transport): bound, but no connection is
        taken until `serve_now` (workers.py starts every worker's accepting at once, so a
        reconnect storm is spread over all of them); grpcio's server always listens at once."""
        if self.transport == "h2":
            return await self._start_h2(host, port, serving)
        # grpc's own cap is above ours, so a request between the two is counted (request_bytes).
        receive_cap = self.limits.max_request_bytes + 64 * 1024
        server = aio.server(options=[*self.grpc_options.items(), ("grpc.max_receive_message_length", receive_cap)])
        server.add_generic_rpc_handlers((self.handler(),))
        tls = self.security.tls
        try:  # grpcio >= 1.60 raises RuntimeError when it cannot bind
            if tls is not None:
                self.reloader = CertificateReloader(tls)
                bound = server.add_secure_port(f"{host}:{port}", self.reloader.credentials())
            else:
                bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            await server.stop(None)  # else its __del__ schedules a shutdown on a closed loop
            raise OSError(f"xDS: cannot listen on {host}:{port} (address in use or not available)")
        await server.start()
        self._server, self.port = server, bound
        self._log_listening(host, bound)
        return bound

    async def _start_h2(self, host: str, port: int, serving: bool) -> int:
        from .http2 import H2Listener

        listener = H2Listener(self)
        if self.security.tls is not None:
            self.reloader = CertificateReloader(self.security.tls)
        bound = await listener.start(
            host, port, self.reloader.ssl_context if self.reloader is not None else None, serving=serving
        )
        self._h2, self.port = listener, bound
        self._log_listening(host, bound)
        return bound

    async def serve_now(self) -> None:
        """Start taking connections (after `start(..., serving=False)`; nothing otherwise)."""
        if self._h2 is not None:
            await self._h2.serve_now()

    def _log_listening(self, host: str, bound: int) -> None:
        tls = self.security.tls
        mode = "mTLS, node id checked against " + str(self.security.identity) if tls else (
            "plaintext, INSECURE: any peer" if self.security.insecure else "plaintext, loopback peers only"
        )
        (log.warning if tls is None and self.security.insecure else log.info)(
            "xDS (ADS, SotW and Delta, %s) listening on %s:%d (%s)", self.transport, host, bound, mode
        )

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._h2 is not None:
            await self._h2.stop(grace)
            self._h2 = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def _sotw(self, requests: AsyncIterator[bytes], context: aio.ServicerContext) -> None:
        await self._admitted(requests, context, SotwStream(), parse_sotw)

    async def _delta(self, requests: AsyncIterator[bytes], context: aio.ServicerContext) -> None:
        stream = DeltaStream()
        stream.max_unacked = self.limits.max_unacked_delta
        await self._admitted(requests, context, stream, parse_delta)

    async def _refuse(self, context: aio.ServicerContext, refusal: Refusal) -> None:
        self.guard.on_refusal(refusal.reason)
        self._log.log(refusal.reason, "xDS stream from %s refused: %s", context.peer(), refusal.message)
        await context.abort(grpc.StatusCode[refusal.code], refusal.message)

    async def _over(self, context: aio.ServicerContext, exc: LimitExceeded) -> None:
        self.guard.on_limit(exc.limit)
        self._log.log(exc.limit, "xDS stream from %s closed: %s", context.peer(), exc)
        await context.abort(grpc.StatusCode[exc.code], str(exc))

    async def _admitted(
        self,
        requests: AsyncIterator[bytes],
        context: aio.ServicerContext,
        stream: SotwStream | DeltaStream,
        parse: Callable[..., Any],
    ) -> None:
        """Who may open a stream (security), and how many (slots), before anything is kept."""
        refusal = self.security.admit_peer(context.peer(), context.auth_context())
        if refusal is not None:
            await self._refuse(context, refusal)
            return
        try:
            release = self.slots.take(context.peer())
        except LimitExceeded as exc:
            await self._over(context, exc)
            return
        try:
            await self._admit_in_turn()
            await self._serve(requests, context, stream, parse)
        finally:
            release()

    async def _admit_in_turn(self) -> None:
        """A reconnect storm is served at `admission_rate`: the stream waits (holding its slot),
        its first request unread, instead of being refused or cancelled."""
        wait = self.admission.reserve(time.monotonic())
        if wait <= 0:
            return
        self.guard.on_limit("admission")
        self.admission.waiting += 1
        try:
            await asyncio.sleep(wait)
        finally:
            self.admission.waiting -= 1

    async def _serve(
        self,
        requests: AsyncIterator[bytes],
        context: aio.ServicerContext,
        stream: SotwStream | DeltaStream,
        parse: Callable[..., Any],
    ) -> None:
        stream_id = next(self._ids)
        out = _Outbox(stream, stream_id, self, isinstance(stream, DeltaStream))
        writer = asyncio.create_task(out.write(context))
        cancel_watch: Callable[[], None] | None = None
        try:
            async for data in requests:
                try:
                    request = self._read(data, stream, parse)
                except LimitExceeded as exc:
                    await self._over(context, exc)
                    return
                except Exception as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse request: {exc}")
                    return
                if cancel_watch is None:
                    opened = self.open_stream(stream_id, stream, out, request, context.auth_context())
                    if isinstance(opened, Refusal):
                        await self._refuse(context, opened)
                        return
                    cancel_watch = opened
                try:
                    out.emit(stream.receive(request))
                except ProtocolError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                if out.overflow:
                    await self._over(context, out.overflow)
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
            self._outboxes.pop(stream_id, None)
            self.tracker.disconnect(stream_id)

    def open_stream(
        self, stream_id: int, stream: SotwStream | DeltaStream, out: _Outbox, request: Any, auth: AuthContext
    ) -> Refusal | Callable[[], None]:
        """At a stream's first request: the node's identity is checked, the stream is given its
        group's snapshot and recorded, and it watches the group. Returns the watch's cancel."""
        refusal = self.security.admit_node(auth, request.node.id if request.node else None)
        if refusal is not None:
            return refusal
        node = request.node or NodeInfo(id=f"unknown-{stream_id}")
        group = self.cache.group_of(node.id, node.cluster)
        snapshot = self.cache.get(group)
        if snapshot is not None:
            stream.snapshot = snapshot
        self.streams[stream_id] = stream
        self._outboxes[stream_id] = out
        self.tracker.connect(stream_id, node, stream)
        return self.cache.watch(group, lambda _g, snap: out.snapshot(snap))

    def _read(self, data: bytes, stream: SotwStream | DeltaStream, parse: Callable[..., Any]) -> Any:
        """Parse one request within the limits (LimitExceeded when it is over one)."""
        limits = self.limits
        if len(data) > limits.max_request_bytes:
            raise LimitExceeded(
                "request_bytes",
                f"a request of {len(data)} bytes; the limit is {limits.max_request_bytes} "
                "(xds.limits.max_request_bytes)",
            )
        seen = self._parsed.get(parse)
        request = seen.get(data) if seen is not None else None
        if request is None:
            reading = NodeReading()
            request = parse(data, limits, reading)
            if reading.dropped_metadata:
                self.guard.on_limit("node_metadata")
            if reading.cut_error:
                self.guard.on_limit("error_detail")
            if seen is not None and len(data) <= _PARSED_BYTES and request.node is None and request.error is None:
                if len(seen) >= _PARSED_ENTRIES:
                    seen.clear()
                seen[data] = request
        if isinstance(stream, SotwStream):
            state = stream.types.get(request.type_url)
            if state is None or state.names != request.names_key:  # the same names: the same count
                check_names(stream, request.type_url, request.names_key, limits)
        else:
            check_names(stream, request.type_url, request.subscribe, limits, request.unsubscribe)
        return request


class _Outbox:
    """One stream's way out. A new snapshot only marks the stream; its writer task runs the
    protocol's update and frames the responses, so a push to thousands of streams starts
    writing to the first at once instead of after every stream was computed (and a stream
    that is slow to drain computes only the latest snapshot). At most `max_outgoing_queue`
    frames wait: a client that sends requests but does not read its responses is closed."""

    def __init__(self, stream: SotwStream | DeltaStream, stream_id: int, server: AdsServer, delta: bool) -> None:
        self.stream = stream
        self.stream_id = stream_id
        self.server = server
        self.delta = delta
        # A list and a bare future, not a deque and an asyncio.Event (a deque each): ~1.2 KB
        # less per stream; the list holds a frame or two.
        self.frames: list[bytes] = []
        self.latest: Snapshot | None = None
        self.renewing = False
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self.overflow: LimitExceeded | None = None

    def wake(self) -> None:
        """The writer has something to do (at once, or when it is back from a write)."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def renew(self) -> None:
        self.renewing = True
        self.wake()

    def snapshot(self, snapshot: Snapshot) -> None:
        self.latest = snapshot
        self.wake()

    def emit(self, actions: list[Action]) -> None:
        if self.overflow is not None:
            return  # the stream is being closed
        for action in actions:
            if isinstance(action, Send):
                self.frames.append(frame(action, self.server.control_plane_id, self.delta))
        self.server.tracker.record(self.stream_id, actions)
        if isinstance(self.stream, DeltaStream) and self.stream.throttled:
            self.stream.throttled = False
            self.server.guard.on_limit("unacked_delta")
        limit = self.server.limits.max_outgoing_queue
        if len(self.frames) > limit and self.overflow is None:
            self.frames.clear()
            self.overflow = LimitExceeded(
                "outgoing_queue",
                f"more than {limit} responses wait for this client to read them "
                "(xds.limits.max_outgoing_queue)",
            )
        if self.frames:
            self.wake()

    async def write(self, context: aio.ServicerContext) -> None:
        while self.overflow is None:
            if not self._woken:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            self.compute()
            while self.frames:
                await context.write(self.frames.pop(0))

    def compute(self) -> None:
        """The writer's turn: the latest snapshot and a renewal become frames (either transport)."""
        self._woken = False
        if self.latest is not None:
            snapshot, self.latest = self.latest, None
            self.emit(self.stream.update(snapshot))
        if self.renewing:
            self.renewing = False
            self.emit(self.stream.renew())
