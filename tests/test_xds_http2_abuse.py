"""A hostile HTTP/2 peer against the h2 transport (xds/http2.py, xds/h2_call.py): what one
connection can make the server hold or walk, and how a window opened by SETTINGS is honoured.
Each test is the shape of an attack a review found, made small."""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import AsyncIterator

import h2.errors
import h2.events
import h2.settings
import hpack
import pytest

from repstage_mesh.xds.cache import SnapshotCache
from repstage_mesh.xds.h2_call import Call
from repstage_mesh.xds.limits import XdsLimits
from repstage_mesh.xds.server import AdsServer
from repstage_mesh.xds.tracker import ProxyTracker
from tests.fakes import eventually
from tests.test_xds_http2 import RawH2, _Guard, _message, _snapshot
from tests.xds_client import SOTW, sotw_request


@pytest.fixture
async def guarded() -> AsyncIterator[tuple[AdsServer, _Guard]]:
    cache = SnapshotCache()
    cache.set_snapshot("", _snapshot("1", size=100))
    guard = _Guard()
    ads = AdsServer(cache, ProxyTracker(), "cp", transport="h2", guard=guard,
                    # resets are not limited here (what a reset stream's turn does is tested), and
                    # past the burst of 500 every new stream waits, however slowly the pairs are read
                    limits=XdsLimits(max_connection_buffer_bytes=1 << 20, max_early_resets=1_000_000,
                                     admission_rate=10.0),
                    grpc_options=[("grpc.keepalive_timeout_ms", 60_000)])
    await ads.start("127.0.0.1", 0)
    try:
        yield ads, guard
    finally:
        await ads.stop(0)


async def _goaway(client: RawH2) -> int | None:
    """The error code of the GOAWAY the server sent (read until it comes or the connection ends)."""
    with contextlib.suppress(EOFError, ConnectionError):
        await client.until(lambda: any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events))
    [goaway] = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
    return goaway.error_code


def _headers_and_resets(first_sid: int, count: int) -> bytes:
    block = hpack.Encoder().encode([(b":method", b"POST"), (b":scheme", b"http"), (b":path", SOTW.encode()),
                                     (b":authority", b"x"), (b"content-type", b"application/grpc")])
    out = []
    for i in range(count):
        sid = first_sid + 2 * i
        out.append(struct.pack(">I", len(block))[1:] + b"\x01\x04" + struct.pack(">I", sid) + block)
        out.append(b"\x00\x00\x04\x03\x00" + struct.pack(">I", sid) + struct.pack(">I", 8))  # RST_STREAM CANCEL
    return b"".join(out)


async def test_streams_reset_while_they_wait_their_turn_give_the_turn_back(
    guarded: tuple[AdsServer, _Guard],
) -> None:
    """CVE-2023-44487's pattern: HEADERS then RST_STREAM, thousands of times. Each stream past the
    admission burst was booked a turn; a reset stream now hands it back, so honest Envoys that
    connect next are not queued behind streams that no longer exist."""
    server, guard = guarded
    assert server.port is not None
    client = await RawH2.connect(server.port)
    try:
        n = 3_000  # past the burst (500): 2,500 booked turns, 250 s at 10/s
        client.writer.write(_headers_and_resets(1, n))
        await client.writer.drain()
        await eventually(lambda: guard.limits.count("admission") >= 2_400 and server.slots.total == 0,
                         "the pairs read")
        assert server.admission.waiting == 0  # no reset stream's timer left holding it
        wait = server.admission.reserve(time.monotonic())  # the next honest stream's turn
        assert wait <= server.admission.interval, f"a new stream would wait {wait:.3f} s behind reset streams"
    finally:
        client.close()


async def test_a_peer_that_shuts_its_windows_and_asks_again_is_disconnected_at_the_byte_limit(
    guarded: tuple[AdsServer, _Guard],
) -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE 0, then the same ACK twice per response (each re-ask is a
    new full response): the responses wait in the server for a window that never opens. They
    count against max_connection_buffer_bytes like unwritten bytes do."""
    server, guard = guarded
    server.cache.set_snapshot("", _snapshot("1", size=100_000))  # ~100 KB per response
    assert server.port is not None
    client = await RawH2.connect(server.port, window=0)
    try:
        await client.until(lambda: client.h2.remote_settings.initial_window_size == 1 << 20)
        client.call(1)
        client.send(1, _message(sotw_request(node_id="edge-1")))  # its response is nonce "1"
        for k in range(1, 40):  # ~40 responses (4 MB) for a 1 MiB limit
            client.send(1, _message(sotw_request(nonce=str(k))) * 2)
        await eventually(lambda: "connection_buffer" in guard.limits, "the byte limit hit")
        await eventually(lambda: not server._h2 or not server._h2.connections, "the connection closed")
    finally:
        client.close()


async def test_a_flood_of_connection_window_updates_walks_only_the_calls_it_blocked(
    guarded: tuple[AdsServer, _Guard], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 streams with a zero stream window (each a response queued) and 2,000 one-byte
    WINDOW_UPDATEs on stream 0: a connection's window does not open a stream's, so the calls
    are not walked for each (before: 400,000 walks, seconds of a worker's loop)."""
    server, _ = guarded
    assert server.port is not None
    client = await RawH2.connect(server.port, window=0)
    walks = [0]
    real = Call.run_outbox

    def counted(self: Call, compute: bool = True) -> None:
        walks[0] += 1
        real(self, compute)

    try:
        await client.until(lambda: client.h2.remote_settings.initial_window_size == 1 << 20)
        for i in range(200):
            client.call(1 + 2 * i)
            client.send(1 + 2 * i, _message(sotw_request(node_id=f"edge-{i}")))
        assert server._h2 is not None
        await eventually(lambda: len(server._h2.connections) == 1 and sum(  # type: ignore[union-attr]
            1 for c in next(iter(server._h2.connections)).calls.values() if c.out.frames) == 200,  # type: ignore[union-attr]
            "every call has its response queued")
        (conn,) = server._h2.connections
        before = conn.h2.outbound_flow_control_window
        monkeypatch.setattr(Call, "run_outbox", counted)
        client.writer.write((struct.pack(">I", 4)[1:] + b"\x08\x00" + struct.pack(">II", 0, 1)) * 2_000)
        await client.writer.drain()
        await eventually(lambda: conn.h2.outbound_flow_control_window >= before + 2_000, "every update read")
        assert walks[0] <= 200, f"{walks[0]} walks of the calls for 2,000 connection window updates"
    finally:
        client.close()


async def test_a_window_opened_by_settings_lets_a_queued_response_out(guarded: tuple[AdsServer, _Guard]) -> None:
    """RFC 9113 6.9.2: a new SETTINGS_INITIAL_WINDOW_SIZE applies to every open stream."""
    server, _ = guarded
    assert server.port is not None
    client = await RawH2.connect(server.port, window=0)
    try:
        await client.until(lambda: client.h2.remote_settings.initial_window_size == 1 << 20)
        client.call(1)
        client.send(1, _message(sotw_request(node_id="edge-1")))
        assert server._h2 is not None
        await eventually(lambda: len(server._h2.connections) == 1 and any(  # type: ignore[union-attr]
            c.out.frames for c in next(iter(server._h2.connections)).calls.values()), "the response queued")  # type: ignore[union-attr]
        client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65_535})
        client.flush()
        await client.until(lambda: len(client.data.get(1, b"")) > 5, timeout=10)
    finally:
        client.close()


async def test_an_honest_stream_on_another_connection_is_served_after_the_resets(
    guarded: tuple[AdsServer, _Guard],
) -> None:
    server, guard = guarded
    assert server.port is not None
    attacker, honest = await RawH2.connect(server.port), await RawH2.connect(server.port)
    try:
        attacker.writer.write(_headers_and_resets(1, 3_000))
        await attacker.writer.drain()
        await eventually(lambda: guard.limits.count("admission") >= 2_400, "the resets read")
        honest.call(1)
        honest.send(1, _message(sotw_request(node_id="honest")))
        await honest.until(lambda: len(honest.data.get(1, b"")) > 5, timeout=10)
    finally:
        attacker.close()
        honest.close()


async def test_a_connection_that_resets_too_many_streams_before_their_first_response_is_closed() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("", _snapshot("1"))
    guard = _Guard()
    server = AdsServer(cache, ProxyTracker(), "cp", transport="h2", guard=guard, limits=XdsLimits(max_early_resets=50))
    port = await server.start("127.0.0.1", 0)
    attacker, honest = await RawH2.connect(port), await RawH2.connect(port)
    try:
        honest.call(1)
        honest.send(1, _message(sotw_request(node_id="honest")))
        await honest.until(lambda: len(honest.data.get(1, b"")) > 5)
        attacker.writer.write(_headers_and_resets(1, 500))
        await attacker.writer.drain()
        await eventually(lambda: guard.limits.count("early_resets") == 1, "the limit hit once")
        assert await _goaway(attacker) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert server._h2 is not None
        await eventually(lambda: len(server._h2.connections) == 1, "only the honest connection is left")  # type: ignore[union-attr]
        assert server.slots.total == 1  # the honest stream
    finally:
        attacker.close()
        honest.close()
        await server.stop(0)


async def test_a_stream_that_half_closes_while_it_waits_its_turn_is_not_served_ahead_of_it() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("", _snapshot("1"))
    server = AdsServer(cache, ProxyTracker(), "cp", transport="h2",
                       limits=XdsLimits(admission_burst=1, admission_rate=0.5))  # the second waits 2 s
    port = await server.start("127.0.0.1", 0)
    client = await RawH2.connect(port)
    try:
        client.call(1)
        client.send(1, _message(sotw_request(node_id="first")))
        await client.until(lambda: len(client.data.get(1, b"")) > 5)
        client.call(3)
        client.send(3, _message(sotw_request(node_id="second")), end=True)  # and half-closed at once
        await client.until(lambda: client.status(3) is not None)
        assert client.status(3) == (0, "") and not client.data.get(3)  # ended, nothing computed for it
        assert len(server.tracker.records) == 1  # only the first stream was ever opened
    finally:
        client.close()
        await server.stop(0)


async def test_a_connection_that_floods_settings_is_closed(guarded: tuple[AdsServer, _Guard]) -> None:
    """Each SETTINGS that changes the initial window makes h2 walk every stream of the
    connection (5,000 on 1,000 streams held the loop ~1 s): 10 a second, 100 at once, then GOAWAY."""
    server, guard = guarded
    assert server.port is not None
    client = await RawH2.connect(server.port)
    try:
        await client.until(lambda: client.h2.remote_settings.initial_window_size == 1 << 20)
        client.writer.write(b"".join(struct.pack(">I", 6)[1:] + b"\x04\x00" + struct.pack(">I", 0)
                                     + struct.pack(">HI", 4, 65_535 + k % 2) for k in range(500)))
        await client.writer.drain()
        await eventually(lambda: guard.limits.count("settings_frames") == 1, "the limit hit once")
        assert await _goaway(client) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        client.close()
