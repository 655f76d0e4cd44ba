"""A lean ADS load generator for bench/xds_fanout.py (`--client h2`, the default): the same
streams as its grpcio client, spoken with python-hyper's h2 on plain asyncio.

Why: on this 2-core machine the simulated proxies share the cores with the server. grpcio's
asyncio client spends ~90 µs of CPU per stream and push (a read and a write, each a batch into
C-core and back through its poller thread); that is the load generator measuring itself. This
one takes a connection's bytes in one `receive_data`, answers every response of the pass and
writes once (~25 µs). What it does on the wire is what Envoy's gRPC client does: one HTTP/2
connection per `per_channel` streams, each stream a POST to the ADS method with
`content-type: application/grpc` and `te: trailers`, length-prefixed messages, 256 MiB stream and
connection windows (Envoy's `initial_stream_window_size`/`initial_connection_window_size`
defaults; a WINDOW_UPDATE when half is used, as h2 and nghttp2 both do), PING and SETTINGS
acknowledged. Each response is ACKed with its version and nonce (EDS ACKs name the clusters
again), exactly as the grpcio client does.

Retries as Envoy's xDS client makes them (`Config::GrpcStream`: a jittered exponential back-off,
base 500 ms, at most 30 s, the wait drawn uniformly below the current bound, reset by a
response): a stream the server ends is opened again after that back-off, with the versions it
holds; a lost connection is dialled again after it (each failed dial doubles the bound), and
its streams are opened on the new one. A stream ended before its first responses counts in
`retries`; one ended after the config was complete counts in `reconnects`, and a re-opened
stream that fails before any response counts as a reconnect failure (as run_stream counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

_PREFIX = struct.Struct(">BI")
_WINDOW = 256 << 20  # Envoy's default initial stream and connection windows
_BASE, _MAX = 0.5, 30.0  # Envoy's RetryInitialDelayMs, RetryMaxDelayMs


def backoff(failures: int) -> float:
    """Envoy's JitteredExponentialBackOffStrategy: uniform below min(base * 2^failures, max)."""
    return random.uniform(0, min(_BASE * 2 ** min(failures, 16), _MAX))


class H2Stream:
    """One simulated proxy's ADS stream: what it asks for and what it holds."""

    __slots__ = ("buffer", "conn", "failures", "node_id", "opened_at", "sid", "state")

    def __init__(self, node_id: str, state: Any) -> None:
        self.node_id = node_id
        self.state = state  # xds_fanout.StreamState
        self.conn: H2Connection | None = None
        self.sid = 0
        self.buffer = bytearray()
        self.opened_at = 0.0
        self.failures = 0  # ends since the last response (the back-off's exponent)


class H2Client:
    """The streams of one client process over `ceil(streams / per_channel)` connections."""

    def __init__(
        self, port: int, streams: Sequence[H2Stream], per_channel: int, types: Sequence[str], path: str,
        first_requests: Callable[[H2Stream], list[bytes]], answer: Callable[[H2Stream, bytes], bytes | None],
    ) -> None:
        self.port = port
        self.types = types
        self.path = path.encode()
        self.first_requests = first_requests  # a stream's opening requests (node id in the first)
        self.answer = answer  # a response's bytes -> the ACK to send (records what it got)
        self.groups = [list(streams[i:i + per_channel]) for i in range(0, len(streams), per_channel)]
        self.conns: list[H2Connection] = []
        self.errors: list[str] = []

    async def start(self) -> None:
        for group in self.groups:
            conn = H2Connection(self, group)
            self.conns.append(conn)
            await conn.connect()

    def close(self) -> None:
        for conn in self.conns:
            conn.closing = True
            if conn.transport is not None:
                conn.transport.abort()


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection and the streams it carries; reconnects while the streams live."""

    def __init__(self, client: H2Client, streams: list[H2Stream]) -> None:
        self.client = client
        self.streams = streams
        self.by_sid: dict[int, H2Stream] = {}
        self.h2: h2.connection.H2Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.goaway = False
        self.dials = 0  # failed dials in a row

    async def connect(self, wait: bool = False) -> None:
        loop = asyncio.get_running_loop()
        while not self.closing:
            if wait:
                await asyncio.sleep(backoff(self.dials))
            wait = True
            try:
                await loop.create_connection(lambda: self, "127.0.0.1", self.client.port)
                self.dials = 0
                return
            except OSError:
                self.dials += 1

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.goaway, self.by_sid = transport, False, {}
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_WINDOW - 65_535)
        for stream in self.streams:
            self.open(stream)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        lost = list(self.by_sid.values())
        self.by_sid = {}
        for stream in lost:
            self.ended(stream, f"UNAVAILABLE: connection lost ({exc})", reopen=False)
        if not self.closing:
            asyncio.get_running_loop().create_task(self.connect(wait=True))

    def data_received(self, data: bytes) -> None:
        conn = self.h2
        assert conn is not None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.client.errors.append(f"protocol error: {exc}")
            if self.transport is not None:
                self.transport.abort()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                stream = self.by_sid.get(event.stream_id)
                if event.flow_controlled_length:
                    with contextlib.suppress(h2.exceptions.H2Error):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if stream is not None:
                    self.take(stream, event.data)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                stream = self.by_sid.pop(event.stream_id, None)
                if stream is not None:
                    self.ended(stream, "stream ended by the server", reopen=not self.goaway)
            elif isinstance(event, h2.events.TrailersReceived):
                status = dict(event.headers).get(b"grpc-status", b"?").decode()
                stream = self.by_sid.get(event.stream_id)
                if stream is not None and status != "0":
                    message = dict(event.headers).get(b"grpc-message", b"").decode()
                    stream.state.last_error = f"grpc-status {status}: {message}"
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True  # no new streams here; the server closes what it still has
        self.flush()

    # ------------------------------------------------------------------ streams
    def open(self, stream: H2Stream) -> None:
        conn = self.h2
        if conn is None or self.transport is None or self.goaway:
            return  # opened again by connection_made
        sid = conn.get_next_available_stream_id()
        stream.conn, stream.sid, stream.buffer, stream.opened_at = self, sid, bytearray(), time.monotonic()
        self.by_sid[sid] = stream
        conn.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", self.client.path),
            (b":authority", f"127.0.0.1:{self.client.port}".encode()),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        ])
        for request in self.client.first_requests(stream):
            conn.send_data(stream.sid, _PREFIX.pack(0, len(request)) + request)

    def take(self, stream: H2Stream, data: bytes) -> None:
        buf = stream.buffer
        buf += data
        conn = self.h2
        assert conn is not None
        while len(buf) >= 5:
            _compressed, length = _PREFIX.unpack_from(buf)
            if len(buf) < 5 + length:
                return
            message = bytes(buf[5:5 + length])
            del buf[:5 + length]
            stream.failures = 0
            ack = self.client.answer(stream, message)
            if ack is not None:
                with contextlib.suppress(h2.exceptions.H2Error):
                    conn.send_data(stream.sid, _PREFIX.pack(0, len(ack)) + ack)

    def ended(self, stream: H2Stream, why: str, reopen: bool) -> None:
        """Counted as run_stream counts; opened again after Envoy's back-off (on this connection
        when it lives, else when the connection is back)."""
        state = stream.state
        if len(state.initial) == len(self.client.types):
            if state.reconnects and state.versions.get("reopened") == "1":
                state.reconnect_failures += 1
                state.failed_at.append(time.monotonic())
            state.reconnects += 1
            state.versions["reopened"] = "1"
        else:
            state.retries += 1
            state.last_error = state.last_error or why
        delay = backoff(stream.failures)
        stream.failures += 1
        if reopen:
            asyncio.get_running_loop().call_later(delay, self._reopen, stream)

    def _reopen(self, stream: H2Stream) -> None:
        if self.closing or self.by_sid.get(stream.sid) is stream:
            return
        self.open(stream)
        self.flush()

    def flush(self) -> None:
        if self.h2 is None or self.transport is None:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)
