"""ADS over HTTP/2 with python-hyper's `h2` (sans-IO) on asyncio: the `h2` transport of `AdsServer`.

Why a second binding: grpcio's asyncio server spends ~60-80 µs of CPU per stream and push in
`context.write` and the read of the ACK (a batch into C-core, its completion back through a
poller thread, a future and a task step each; bench/RESULTS.md, issue 17). Here a push is
synchronous: every stream's response is framed into its connection's `H2Connection` and each
connection is written once per pass (100 streams on one connection: one `write`), and an ACK
is parsed where its bytes arrive. h2 measured ~5 µs to send a message and ~8 µs to take one in.

What this binding does of gRPC (the parts Envoy's and grpcio's clients use for ADS): the two
ADS methods on `:path`, length-prefixed messages (uncompressed; a compressed one ends the
call), `grpc-status`/`grpc-message` trailers (a trailers-only response when nothing was sent),
HTTP/2 flow control both ways, server keepalive pings (a silent peer is dropped, as grpcio's
`keepalive_time_ms`/`keepalive_timeout_ms` do), GOAWAY on stop, and TLS with ALPN `h2` and
client certificates (`tls.ssl_context`: reloaded files are used by the next handshake).
Every decision (limits, admission, identity, the protocol) is `AdsServer`'s, shared with the
grpcio binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .grpc_wire import grpc_peer, trailers
from .h2_call import Call, H2Outbox
from .h2_raw import CONNECTION_WINDOW, STREAM_WINDOW, RawFraming
from .limits import LimitExceeded
from .tls import auth_context_of

if TYPE_CHECKING:
    from .server import AdsServer

log = logging.getLogger(__name__)

_METHODS = {
    b"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources": "sotw",
    b"/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources": "delta",
}
_PUMP_CHUNK = 256  # outboxes served per loop pass, so ACKs are read between chunks of a push


class H2Listener:
    """The listening socket(s), the connections, and the pump that runs the streams' pushes."""

    def __init__(self, server: AdsServer) -> None:
        self.server = server
        options = server.grpc_options
        self.keepalive_time = float(options.get("grpc.keepalive_time_ms", 2_000)) / 1000
        self.keepalive_timeout = float(options.get("grpc.keepalive_timeout_ms", 1_000)) / 1000
        self.max_streams = int(options.get("grpc.max_concurrent_streams", 100_000))
        self.reuse_port = bool(options.get("grpc.so_reuseport", 0))
        self.connections: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._dirty: list[H2Outbox] = []
        self._pumping = False
        self._tls: Callable[[], ssl.SSLContext] | None = None

    async def start(
        self, host: str, port: int, tls: Callable[[], ssl.SSLContext] | None, serving: bool = True
    ) -> int:
        """Bind; listen too unless `serving` is False (then `serve_now` listens: a socket bound
        with SO_REUSEPORT and not listening is given no connection by the kernel)."""
        self._tls = tls
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Connection(self), host, port, reuse_port=self.reuse_port or None, backlog=4096,
                start_serving=serving,
            )
        except OSError as exc:
            raise OSError(f"xDS: cannot listen on {host}:{port} ({exc.strerror or exc})") from exc
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def serve_now(self) -> None:
        if self._server is not None and not self._server.is_serving():
            await self._server.start_serving()

    async def stop(self, grace: float | None) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.goaway()
        if grace and self.connections:
            deadline = time.monotonic() + grace
            while self.connections and time.monotonic() < deadline:
                await asyncio.sleep(min(0.05, grace))
        for conn in list(self.connections):
            conn.close_calls("UNAVAILABLE", "the xDS server is stopping")
            conn.transport_abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None

    def mark(self, out: H2Outbox) -> None:
        """An outbox has something to do: the pump runs it in a later pass."""
        self._dirty.append(out)
        if not self._pumping:
            self._pumping = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        batch, self._dirty = self._dirty[:_PUMP_CHUNK], self._dirty[_PUMP_CHUNK:]
        touched: set[_Connection] = set()
        try:
            for out in batch:
                call = out.call
                if call.closed:
                    continue
                touched.add(call.conn)
                try:
                    call.run_outbox()
                except Exception:  # a bug in one stream must not stop every other stream's pushes
                    log.exception("xDS stream %d (%s): push failed; closing it", call.stream_id, call.conn.peer)
                    call.finish("INTERNAL", "the server failed to push to this stream")
            for conn in touched:
                conn.flush()
        finally:
            if self._dirty:
                asyncio.get_running_loop().call_soon(self._pump)
            else:
                self._pumping = False


class _Connection(asyncio.Protocol):
    """One client connection: its h2 state machine, its calls, its keepalive."""

    def __init__(self, listener: H2Listener) -> None:
        self.listener = listener
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(config)
        self.calls: dict[int, Call] = {}
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.auth: dict[str, list[bytes]] = {}
        self.paused = False
        self.queued = 0  # bytes framed since the last flush
        self.held = 0  # bytes of responses framed for its calls, waiting for the peer's windows
        self.blocked: dict[int, Call] = {}  # calls waiting for the connection's window
        self.starved: dict[int, Call] = {}  # calls waiting for their own stream's window
        self.early_resets = 0  # streams its client reset before their first response
        self.settings_tokens = 10 * listener.server.limits.max_settings_per_second  # `_settings_frame`
        self.settings_at = time.monotonic()
        self._ping_due: asyncio.TimerHandle | None = None
        self._last_read = time.monotonic()
        self._closed = False
        self._early: list[bytes] | None = []  # what arrived before _begin
        self.raw = RawFraming(self.h2)  # DATA frames of open calls, read and written outside h2

    # ---------------------------------------------------------------- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = grpc_peer(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                max(1, int(self.listener.keepalive_timeout * 1000)))
        self.listener.connections.add(self)
        if self.listener._tls is not None:
            transport.pause_reading()
            asyncio.get_running_loop().create_task(self._handshake(self.listener._tls()))
            return
        self._begin()

    async def _handshake(self, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            secure = await asyncio.wait_for(loop.start_tls(self.transport, self, context, server_side=True), 10.0)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("xDS TLS handshake with %s failed: %s", self.peer, exc)
            if self.transport is not None:
                self.transport.abort()
            self.listener.connections.discard(self)
            return
        if secure is None:
            return
        self.transport = secure
        ssl_object = secure.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() not in ("h2", None):
            secure.abort()
            return
        self.auth = auth_context_of(ssl_object.getpeercert(binary_form=True))
        self._begin()

    def _begin(self) -> None:
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.listener.max_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        self.flush()
        self._schedule_ping()
        early, self._early = self._early or [], None
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._early is not None:  # TLS: the handshake is done but start_tls has not returned yet
            self._early.append(data)
            return
        self._last_read = time.monotonic()
        try:
            self._receive(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("xDS HTTP/2 protocol error from %s: %s", self.peer, exc)
            self.flush()
            self.transport_abort()
            return
        self.flush()

    def _receive(self, data: bytes) -> None:
        self.raw.receive(data, self._open_call, self._h2_receive, Call.raw_data)

    def _open_call(self, sid: int) -> Call | None:
        call = self.calls.get(sid)
        return call if call is not None and not call.closed and call.ending is None else None

    def _h2_receive(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # closed for what the client did (`_calm`): h2 reads no more of it
        for event in self.h2.receive_data(data):
            if self.transport is None or self.transport.is_closing():
                return  # closed for what the client did (early_resets): the rest is not served
            self._event(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._ping_due is not None:
            self._ping_due.cancel()
        for call in list(self.calls.values()):
            call.close()
        self.listener.connections.discard(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for call in list(self.calls.values()):
            if call.out.frames or call.partial:
                call.run_outbox(compute=False)
        self.flush()

    # ---------------------------------------------------------------- h2 events
    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.data(event.data, event.flow_controlled_length)
            elif event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.RequestReceived):
            self._open(event.stream_id, dict(event.headers))
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                self._resume(self.blocked)
            else:
                call = self.starved.pop(event.stream_id, None) or self.blocked.pop(event.stream_id, None)
                if call is not None and (call.out.frames or call.partial):
                    call.run_outbox(compute=False)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_frame()
            window = event.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
            if window is not None and window.new_value > (window.original_value or 0):
                self._resume(self.starved)  # every stream's window moved (RFC 9113 6.9.2)
        elif isinstance(event, h2.events.StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None and call.ending is not None:
                call.finish(*call.ending)
            elif call is not None:  # the client half-closed: the call is over (grpcio's handler returns)
                if not call.held:  # one waiting its turn is not served ahead of it by half-closing
                    call.take_requests()
                call.finish("OK")
        elif isinstance(event, h2.events.StreamReset):
            call = self.calls.get(event.stream_id)
            if call is not None:
                if not call.headers_sent:
                    self._reset_early()
                call.close()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close_calls("UNAVAILABLE", "the client closed the connection")
            self.transport_abort()

    def _reset_early(self) -> None:
        """A stream reset by the client before its first response: a few are a client changing
        its mind, thousands an attack that costs it two frames each (CVE-2023-44487)."""
        self.early_resets += 1
        limit = self.listener.server.limits.max_early_resets
        if self.early_resets == limit + 1:
            self._calm("early_resets", f"its client reset more than {limit} streams before their first response "
                       "(xds.limits.max_early_resets)")

    def _settings_frame(self) -> None:
        """A SETTINGS frame: h2 walks every stream of the connection when one changes the initial
        window (5,000 frames on 1,000 streams held the loop ~1 s), so a client gets
        `max_settings_per_second` of them, averaged over 10 s (a token bucket)."""
        rate = self.listener.server.limits.max_settings_per_second
        now = time.monotonic()
        self.settings_tokens = min(10 * rate, self.settings_tokens + (now - self.settings_at) * rate) - 1
        self.settings_at = now
        if self.settings_tokens < 0:
            self._calm("settings_frames", f"its client sent SETTINGS faster than {rate:g} a second "
                       "(xds.limits.max_settings_per_second)")

    def _calm(self, limit: str, why: str) -> None:
        """Close the connection for what its client did: GOAWAY (ENHANCE_YOUR_CALM), then abort."""
        server = self.listener.server
        server.guard.on_limit(limit)
        server._log.log(limit, "xDS connection from %s closed: %s", self.peer, why)
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.flush()
        self.close_calls("UNAVAILABLE", why)
        self.transport_abort()

    def _resume(self, waiting: dict[int, Call]) -> None:
        """Let the calls of `waiting` (taken out of it) write; each that is blocked again goes
        back to the set of what blocks it. O(calls resumed), however many calls the connection
        has: a flood of 1-byte WINDOW_UPDATEs no longer walks every stream (or stalls the
        worker's other connections)."""
        calls = list(waiting.values())
        waiting.clear()
        for n, call in enumerate(calls):
            if self.h2.outbound_flow_control_window <= 0:
                self.blocked.update((c.sid, c) for c in calls[n:] if not c.closed)
                return
            if not call.closed and (call.out.frames or call.partial):
                call.run_outbox(compute=False)

    def _open(self, sid: int, headers: dict[bytes, bytes]) -> None:
        method = _METHODS.get(headers.get(b":path", b""))
        server = self.listener.server
        if method is None or not server.accepting:
            self._trailers_only(sid, "UNIMPLEMENTED", f"unknown method {headers.get(b':path', b'')!r}")
            return
        call = Call(self, sid, method == "delta")
        self.calls[sid] = call
        refusal = server.security.admit_peer(self.peer, self.auth)
        if refusal is not None:
            call.refuse(refusal, at_once=False)
            return
        try:
            call.release = server.slots.take(self.peer)
        except LimitExceeded as exc:
            call.over(exc, at_once=False)
            return
        wait = server.admission.reserve(time.monotonic())
        if wait > 0:  # a reconnect storm: the stream waits its turn, its first request unread
            server.guard.on_limit("admission")
            server.admission.waiting += 1
            call.held = True
            call.admit_at = asyncio.get_running_loop().call_later(wait, self._admit, call)

    def _admit(self, call: Call) -> None:
        self.listener.server.admission.waiting -= 1
        call.held = False
        call.admit_at = None
        if not call.closed:
            call.take_requests()
            self.flush()

    def _trailers_only(self, sid: int, code: str, message: str) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                       *trailers(code, message)], end_stream=True)

    # ---------------------------------------------------------------- writing, pings, ends
    def flush(self) -> None:
        self.queued = 0
        data = self.raw.take_output()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        limit = self.listener.server.limits.max_connection_buffer_bytes
        # Unwritten bytes and responses held back by the peer's windows alike: a peer that
        # keeps its windows shut and asks again and again must not hold the process's memory.
        if transport.get_write_buffer_size() + self.held > limit:
            server = self.listener.server
            server.guard.on_limit("connection_buffer")
            server._log.log("connection_buffer", "xDS connection from %s closed: more than %d bytes wait for it "
                            "to read (xds.limits.max_connection_buffer_bytes)", self.peer, limit)
            transport.abort()

    def _schedule_ping(self) -> None:
        if not self._closed and self.listener.keepalive_time > 0:
            self._ping_due = asyncio.get_running_loop().call_later(self.listener.keepalive_time, self._ping)

    def _ping(self) -> None:
        """grpcio's keepalive as it behaves: after `keepalive_time` with nothing read, a PING. The
        PING is bytes the peer's kernel must ACK within `keepalive_timeout` (TCP_USER_TIMEOUT,
        set at accept): a vanished host or a partition closes the connection ~3 s after its last
        word. A frozen Envoy process (its kernel still ACKs) stays connected and shows as behind,
        as with grpcio (an Envoy pinging every 0.4 s is never pinged)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        quiet = time.monotonic() - self._last_read
        if quiet < self.listener.keepalive_time:
            self._ping_due = loop.call_later(self.listener.keepalive_time - quiet, self._ping)
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.ping(struct.pack(">Q", time.monotonic_ns()))
        self.flush()
        self._ping_due = loop.call_later(self.listener.keepalive_time, self._ping)

    def goaway(self) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.close_connection()
        self.flush()

    def close_calls(self, code: str, message: str) -> None:
        for call in list(self.calls.values()):
            call.finish(code, message)
        self.flush()

    def transport_abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
