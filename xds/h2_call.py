"""One ADS call of the h2 transport (http2.py): an HTTP/2 stream's requests in, its responses
out through the peer's flow-control windows, and its end (gRPC status trailers). The
connection (`http2._Connection`) owns the h2 state machine and hands each call its events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import h2.exceptions

from .grpc_wire import trailers
from .limits import LimitExceeded
from .messages import Action
from .protocol import DeltaStream, ProtocolError, SotwStream
from .requests import parse_delta, parse_sotw
from .server import _Outbox
from .tls import Refusal

if TYPE_CHECKING:
    from .http2 import _Connection
    from .server import AdsServer

log = logging.getLogger("repstage_mesh.xds.http2")

FLUSH_AT = 256 * 1024  # bytes framed into one connection before it is written (and may pause)
PREFIX = struct.Struct(">BI")  # a gRPC message's prefix: compressed flag, length


class H2Outbox(_Outbox):
    """The grpcio binding's outbox, woken into the listener's pump instead of a writer task."""

    def __init__(self, call: Call, stream: SotwStream | DeltaStream, stream_id: int, server: AdsServer,
                 delta: bool) -> None:
        super().__init__(stream, stream_id, server, delta)
        self.call = call
        self.bytes = 0  # of its frames (`emit`; the connection's `held`)

    def emit(self, actions: list[Action]) -> None:
        super().emit(actions)
        size = sum(map(len, self.frames))  # a few frames (at most max_outgoing_queue)
        self.call.conn.held += size - self.bytes  # what the peer's windows hold back: flush checks
        self.bytes = size

    def wake(self) -> None:
        if not self._woken and not self.call.closed:
            self._woken = True
            self.call.conn.listener.mark(self)


class Call:
    """One ADS call (an HTTP/2 stream) on a connection."""

    __slots__ = (
        "admit_at", "buffer", "cancel_watch", "closed", "conn", "ending", "headers_sent", "held", "out",
        "parse", "partial", "raw_held", "raw_unacked", "release", "sid", "stream", "stream_id", "unacked",
    )

    def __init__(self, conn: _Connection, sid: int, delta: bool) -> None:
        server = conn.listener.server
        self.conn = conn
        self.sid = sid
        stream: SotwStream | DeltaStream
        if delta:
            stream = DeltaStream()
            stream.max_unacked = server.limits.max_unacked_delta
        else:
            stream = SotwStream()
        self.stream = stream
        self.parse = parse_delta if delta else parse_sotw
        self.stream_id = next(server._ids)
        self.out = H2Outbox(self, stream, self.stream_id, server, delta)
        self.partial = b""  # the rest of a response the peer's window did not take (prefixed)
        self.buffer = bytearray()
        self.release: Callable[[], None] | None = None
        self.held = False
        self.admit_at: asyncio.TimerHandle | None = None  # its turn, while held (_Connection._open)
        self.cancel_watch: Callable[[], None] | None = None
        self.closed = False
        self.headers_sent = False
        self.ending: tuple[str, str] | None = None  # refused as it opened (_end)
        self.unacked = 0  # request bytes taken in by h2 but not yet given back to the peer's window
        self.raw_unacked = 0  # the same, of the DATA frames read outside h2
        self.raw_held = 0  # bytes read outside h2 not yet given back by a WINDOW_UPDATE

    # ---------------------------------------------------------------- requests
    def data(self, data: bytes, flow: int) -> None:
        if self.ending is not None:
            self.finish(*self.ending)
            return
        self.buffer += data
        self.unacked += flow
        if not self.held:
            self.take_requests()

    def raw_data(self, data: bytes) -> None:
        """A DATA frame read outside h2 (h2_raw: its flow control is counted there)."""
        self.buffer += data
        if not self.held:
            self.take_requests()

    def take_requests(self) -> None:
        server = self.conn.listener.server
        buf = self.buffer
        while not self.closed and len(buf) >= 5:
            compressed, length = PREFIX.unpack_from(buf)
            if compressed:
                self.finish("UNIMPLEMENTED", "compressed xDS requests are not supported (send grpc-encoding identity)")
                return
            if length > server.limits.max_request_bytes:
                self.over(LimitExceeded(
                    "request_bytes",
                    f"a request of {length} bytes; the limit is {server.limits.max_request_bytes} "
                    "(xds.limits.max_request_bytes)",
                ))
                return
            if len(buf) < 5 + length:
                break
            message = bytes(buf[5:5 + length])
            del buf[:5 + length]
            try:
                self.request(message)
            except Exception:  # a bug: this call ends, the connection's other calls go on
                log.exception("xDS stream %d (%s): a request failed; closing it", self.stream_id, self.conn.peer)
                self.finish("INTERNAL", "the server failed to handle this request")
        if self.unacked and not self.closed:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.h2.acknowledge_received_data(self.unacked, self.sid)
            self.unacked = 0
        if self.raw_unacked and not self.closed:
            self.conn.raw.read(self)

    def request(self, data: bytes) -> None:
        server = self.conn.listener.server
        stream = self.stream
        try:
            request = server._read(data, stream, self.parse)
        except LimitExceeded as exc:
            self.over(exc)
            return
        except Exception as exc:
            self.finish("INVALID_ARGUMENT", f"cannot parse request: {exc}")
            return
        if self.cancel_watch is None:
            refusal = server.open_stream(self.stream_id, stream, self.out, request, self.conn.auth)
            if isinstance(refusal, Refusal):
                self.refuse(refusal)
                return
            self.cancel_watch = refusal
        try:
            self.out.emit(stream.receive(request))
        except ProtocolError as exc:
            self.finish("INVALID_ARGUMENT", str(exc))
            return
        self.run_outbox(compute=False)

    # ---------------------------------------------------------------- responses
    def run_outbox(self, compute: bool = True) -> None:
        """The writer's turn: the latest snapshot and renewals become frames, and the frames
        go to the connection as far as flow control and the socket allow."""
        out = self.out
        if compute:
            out.compute()
        if out.overflow is not None:
            self.over(out.overflow)
            return
        frames = out.frames
        if not (frames or self.partial) or self.conn.paused or self.closed:
            return
        conn = self.conn.h2
        if not self.headers_sent:
            self.headers_sent = True
            conn.send_headers(self.sid, ((b":status", b"200"), (b"content-type", b"application/grpc")))
        while self.partial or frames:
            window = conn.local_flow_control_window(self.sid)
            if window <= 0:
                # Resumed by what opens that window: the connection's (a stream-0 WINDOW_UPDATE
                # walks only the calls it blocked) or its own (its WINDOW_UPDATE, SETTINGS).
                blocked = self.conn.blocked if conn.outbound_flow_control_window <= 0 else self.conn.starved
                blocked[self.sid] = self
                return
            if self.partial:
                data = self.partial
            else:
                message = frames.pop(0)
                out.bytes -= len(message)
                self.conn.held -= len(message)
                data = PREFIX.pack(0, len(message)) + message
            self.partial = data[window:]  # the rest waits for the peer's WINDOW_UPDATE
            self._send(data[:window])

    def _send(self, data: bytes) -> None:
        self.conn.raw.send(self.sid, data)
        self.conn.queued += len(data)
        if self.conn.queued > FLUSH_AT:  # a large push: let the socket say when it is full
            self.conn.flush()

    # ---------------------------------------------------------------- ends
    def refuse(self, refusal: Refusal, at_once: bool = True) -> None:
        server = self.conn.listener.server
        server.guard.on_refusal(refusal.reason)
        server._log.log(refusal.reason, "xDS stream from %s refused: %s", self.conn.peer, refusal.message)
        self._end(refusal.code, refusal.message, at_once)

    def over(self, exc: LimitExceeded, at_once: bool = True) -> None:
        server = self.conn.listener.server
        server.guard.on_limit(exc.limit)
        server._log.log(exc.limit, "xDS stream from %s closed: %s", self.conn.peer, exc)
        self._end(exc.code, str(exc), at_once)

    def _end(self, code: str, message: str, at_once: bool) -> None:
        """A call refused as it opens ends when its first request arrives (or in 1 s): a gRPC
        client whose stream ends before its first message is written sees INTERNAL, not the
        status (grpcio's client fails that write)."""
        if at_once:
            self.finish(code, message)
            return
        self.ending = (code, message)
        asyncio.get_running_loop().call_later(1.0, self._end_late)

    def _end_late(self) -> None:
        if self.ending is not None and not self.closed:
            self.finish(*self.ending)
            self.conn.flush()

    def finish(self, code: str, message: str = "") -> None:
        """End the call with a gRPC status (trailers; trailers-only when nothing was sent)."""
        if self.closed:
            return
        ending = trailers(code, message)
        headers = ending if self.headers_sent else [(b":status", b"200"), (b"content-type", b"application/grpc"), *ending]
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.h2.send_headers(self.sid, headers, end_stream=True)
        self.close()

    def close(self) -> None:
        """Forget the call (the peer is gone, or it was finished)."""
        if self.closed:
            return
        self.closed = True
        server = self.conn.listener.server
        self.conn.raw.release(self.raw_unacked)  # taken in, never read: the connection's still
        if self.admit_at is not None:  # reset while waiting its turn: the turn goes to the next
            self.admit_at.cancel()
            self.admit_at = None
            server.admission.waiting -= 1
            server.admission.release()
        self.conn.blocked.pop(self.sid, None)
        self.conn.starved.pop(self.sid, None)
        self.conn.held -= self.out.bytes
        self.out.bytes = 0
        self.out.frames.clear()
        self.partial = b""
        self.conn.calls.pop(self.sid, None)
        if self.cancel_watch is not None:
            self.cancel_watch()
            server.streams.pop(self.stream_id, None)
            server._outboxes.pop(self.stream_id, None)
            server.tracker.disconnect(self.stream_id)
        if self.release is not None:
            self.release()
            self.release = None
