"""The h2 transport (xds/http2.py) as a hand-driven HTTP/2 client sees it: flow control both
ways, keepalive, message framing, what gRPC clients never send, and the stop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryResponse
from grpc import aio

from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot, SnapshotCache
from repstage_mesh.xds.limits import XdsLimits
from repstage_mesh.xds.server import AdsServer
from repstage_mesh.xds.tracker import ProxyTracker
from tests.fakes import eventually
from tests.xds_client import CLUSTERS, SOTW, AdsClient, sotw_request


def _snapshot(version: str, size: int = 10) -> Snapshot:
    return Snapshot(version, {res.CLUSTER: {"db": EncodedResource.from_bytes(res.CLUSTER, "db", b"c" * size)}})


def _message(data: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BI", compressed, len(data)) + data


def _responses(data: bytes | bytearray) -> list[DiscoveryResponse]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos + 1)
        out.append(DiscoveryResponse.parse(bytes(data[pos + 5:pos + 5 + length])))
        pos += 5 + length
    return out


class RawH2:
    """One HTTP/2 connection driven by hand (python-hyper's h2 on the client side)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.data: dict[int, bytearray] = {}
        self.closed = False
        self.answer = True  # write what h2 has to say (PING ACKs, WINDOW_UPDATEs)
        self.flush()

    @classmethod
    async def connect(cls, port: int, window: int = 65_535) -> RawH2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, window)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.answer:
            self.writer.write(data)

    def call(self, sid: int, path: bytes = SOTW.encode()) -> None:
        self.h2.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
                                   (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])
        self.flush()

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self.h2.send_data(sid, data, end_stream=end)
        self.flush()

    async def until(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                chunk = await self.reader.read(65_536)
                if not chunk:
                    self.closed = True
                    if done():
                        return
                    raise EOFError("the server closed the connection")
                for event in self.h2.receive_data(chunk):
                    self.events.append(event)
                    if isinstance(event, h2.events.DataReceived):
                        self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.flush()

    def status(self, sid: int) -> tuple[int, str] | None:
        for event in self.events:
            if isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)) and event.stream_id == sid:
                headers = dict(event.headers)
                if b"grpc-status" in headers:
                    return int(headers[b"grpc-status"]), headers.get(b"grpc-message", b"").decode()
        return None

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def server() -> AsyncIterator[AdsServer]:
    cache = SnapshotCache()
    cache.set_snapshot("", _snapshot("1"))
    ads = AdsServer(cache, ProxyTracker(), "cp", limits=XdsLimits(max_request_bytes=4096), transport="h2",
                    grpc_options=[("grpc.keepalive_time_ms", 200), ("grpc.keepalive_timeout_ms", 200)])
    await ads.start("127.0.0.1", 0)
    try:
        yield ads
    finally:
        await ads.stop(0)


@contextlib.asynccontextmanager
async def raw(server: AdsServer, window: int = 65_535) -> AsyncIterator[RawH2]:
    assert server.port is not None
    client = await RawH2.connect(server.port, window)
    try:
        yield client
    finally:
        client.close()


async def test_a_response_larger_than_the_window_waits_for_room_and_arrives_whole(server: AdsServer) -> None:
    server.cache.set_snapshot("", _snapshot("2", size=100_000))
    async with raw(server, window=1_000) as client:
        client.call(1)
        client.send(1, _message(sotw_request(node_id="edge-1")))
        # h2 raises FlowControlError should the server send past the window the client gave
        await client.until(lambda: len(client.data.get(1, b"")) == 1_000)
        while len(client.data[1]) < 5 or len(client.data[1]) < 5 + struct.unpack_from(">I", client.data[1], 1)[0]:
            got = len(client.data[1])
            client.h2.increment_flow_control_window(30_000, stream_id=1)
            client.h2.increment_flow_control_window(30_000)
            client.flush()
            await client.until(lambda got=got: len(client.data[1]) > got)  # type: ignore[misc]
        response = DiscoveryResponse.parse(bytes(client.data[1][5:]))
        assert response.version_info.startswith("2-") and len(response.resources[0].value) >= 100_000


async def test_requests_split_over_frames_and_sharing_one_are_all_read(server: AdsServer) -> None:
    async with raw(server) as client:
        client.call(1)
        first = _message(sotw_request(node_id="edge-1"))
        client.send(1, first[:3])
        client.send(1, first[3:20])
        client.send(1, first[20:])
        await client.until(lambda: len(client.data.get(1, b"")) > 5)
        response = DiscoveryResponse.parse(bytes(client.data[1][5:]))
        ack = sotw_request(version=response.version_info, nonce=response.nonce)
        again = sotw_request(names=("other",), version=response.version_info, nonce=response.nonce)
        client.send(1, _message(ack) + _message(again))  # an ACK and a new subscription in one frame
        (stream,) = server.streams.values()
        await eventually(lambda: stream.types[CLUSTERS].names == frozenset({"other"}), "both requests read")
        (record,) = server.tracker.connected()
        record.refresh()
        assert record.types[CLUSTERS].acked_version == response.version_info


async def test_requests_past_the_stream_window_are_all_read(server: AdsServer) -> None:
    """The transport reads DATA of open calls outside h2 and gives the window back itself: a
    client that respects it sends twice the stream window of ACKs and is never left waiting."""
    names = tuple(f"{i:0>200}" for i in range(14))
    async with raw(server) as client:
        client.call(1)
        client.send(1, _message(sotw_request(names=names, node_id="edge-1")))
        await client.until(lambda: len(client.data.get(1, b"")) > 5)
        response = DiscoveryResponse.parse(bytes(client.data[1][5:]))
        ack = _message(sotw_request(names=names, version=response.version_info, nonce=response.nonce))
        sent = 0
        while sent < 2 * (1 << 20):
            await client.until(lambda: client.h2.local_flow_control_window(1) >= len(ack))
            client.send(1, ack)
            sent += len(ack)
        await client.until(lambda: client.h2.local_flow_control_window(1) >= 1_000)
        last = _responses(client.data[1])[-1]  # the server answered the subscription again meanwhile
        client.send(1, _message(sotw_request(names=("other",), version=last.version_info, nonce=last.nonce)))
        (stream,) = server.streams.values()
        await eventually(lambda: stream.types[CLUSTERS].names == frozenset({"other"}), "every request read")


async def test_what_grpc_clients_never_send_ends_the_call_with_a_status(server: AdsServer) -> None:
    async with raw(server) as client:
        client.call(1, path=b"/nope.Service/Method")
        client.call(3)
        client.send(3, _message(sotw_request(node_id="edge-1"), compressed=1))
        client.call(5)
        client.send(5, struct.pack(">BI", 0, 10_000_000) + b"x" * 100)  # declares 10 MB, sends 100 bytes
        await client.until(lambda: all(client.status(sid) is not None for sid in (1, 3, 5)))
        assert client.status(1) == (grpc.StatusCode.UNIMPLEMENTED.value[0], client.status(1)[1])  # type: ignore[index]
        assert client.status(3)[0] == grpc.StatusCode.UNIMPLEMENTED.value[0]  # type: ignore[index]
        code, message = client.status(5)  # type: ignore[misc]
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "max_request_bytes" in message
    assert not server.streams and server.slots.total == 0


async def test_a_quiet_peer_is_pinged_and_a_vanished_one_is_left_by_the_kernel(server: AdsServer) -> None:
    """A PING after keepalive_time of silence; the socket's TCP_USER_TIMEOUT is the keepalive
    timeout, so a host that stops ACKing those bytes is dropped. A frozen process whose kernel
    still ACKs stays connected (as with grpcio): its lag is what /v1/proxies shows."""
    async with raw(server) as client:
        client.call(1)
        client.send(1, _message(sotw_request(node_id="edge-1")))
        await client.until(lambda: len(client.data.get(1, b"")) > 5)
        assert server._h2 is not None
        (conn,) = server._h2.connections
        sock = conn.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 200
        client.answer = False  # frozen: reads nothing more, answers no PING
        await client.until(lambda: sum(isinstance(e, h2.events.PingReceived) for e in client.events) >= 2)
        assert len(server.streams) == 1 and len(server.tracker.connected()) == 1


async def test_garbage_closes_that_connection_only(server: AdsServer) -> None:
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 100)
    async with asyncio.timeout(5):
        while await reader.read(65_536):
            pass
    writer.close()
    channel = aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        client = AdsClient(channel)
        client.send(sotw_request(node_id="edge-2"))
        assert (await client.receive()).version_info.startswith("1-")
        client.close()
    finally:
        await channel.close()


async def test_a_stop_ends_open_streams_with_unavailable(server: AdsServer) -> None:
    assert server.port is not None
    channel = aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        client = AdsClient(channel)
        client.send(sotw_request(CLUSTERS, node_id="edge-3"))
        await client.receive()
        await server.stop(0.1)
        code, _ = await client.status()
        assert code == grpc.StatusCode.UNAVAILABLE
        client.close()
    finally:
        await channel.close()


class _Guard:
    def __init__(self) -> None:
        self.limits: list[str] = []

    def on_limit(self, limit: str) -> None:
        self.limits.append(limit)

    def on_refusal(self, reason: str) -> None:
        pass


async def test_a_peer_that_floods_pings_and_reads_nothing_is_disconnected() -> None:
    guard = _Guard()
    # A long TCP_USER_TIMEOUT (the keepalive timeout): the kernel would otherwise abort a peer
    # that keeps a zero window for 1 s, on a loaded machine before this limit is reached.
    ads = AdsServer(SnapshotCache(), ProxyTracker(), limits=XdsLimits(max_connection_buffer_bytes=64 * 1024),
                    guard=guard, transport="h2", grpc_options=[("grpc.keepalive_timeout_ms", 60_000)])
    port = await ads.start("127.0.0.1", 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little room in the kernel for what we never read
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        _, writer = await asyncio.open_connection(sock=sock)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        pings = b"".join(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + struct.pack(">Q", i) for i in range(4096))
        async with asyncio.timeout(20):
            with contextlib.suppress(ConnectionError):
                while "connection_buffer" not in guard.limits:
                    writer.write(pings)
                    await writer.drain()
        assert "connection_buffer" in guard.limits
        await eventually(lambda: not ads._h2 or not ads._h2.connections, "the connection is closed")
        writer.close()
    finally:
        sock.close()
        await ads.stop(0)


async def test_a_push_that_fails_on_one_stream_closes_that_stream_and_reaches_the_others(
    server: AdsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from repstage_mesh.xds.protocol import SotwStream

    assert server.port is not None
    channel = aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        clients = [AdsClient(channel) for _ in range(3)]
        for i, client in enumerate(clients):
            client.send(sotw_request(node_id=f"edge-{i}"))
            first = await client.receive()
            client.send(sotw_request(version=first.version_info, nonce=first.nonce))  # ACK
        await eventually(lambda: all(r.synced_index >= 0 for r in server.tracker.connected() if r.refresh() is None),
                         "all three ACKed")
        (bad,) = [server.streams[r.stream_id] for r in server.tracker.connected() if r.node.id == "edge-1"]
        update = SotwStream.update

        def failing(self: SotwStream, snapshot: Snapshot) -> list[object]:
            if self is bad:
                raise RuntimeError("a bug")
            return update(self, snapshot)  # type: ignore[return-value]

        monkeypatch.setattr(SotwStream, "update", failing)
        server.cache.set_snapshot("", _snapshot("2", size=11))
        for i in (0, 2):
            second = await clients[i].receive()
            assert second.version_info.startswith("2-")
            clients[i].send(sotw_request(version=second.version_info, nonce=second.nonce))
        code, _ = await clients[1].status()
        assert code == grpc.StatusCode.INTERNAL
        assert len(server.streams) == 2
        server.cache.set_snapshot("", _snapshot("3", size=12))  # the pump still runs
        assert (await clients[0].receive()).version_info.startswith("3-")
        for client in clients:
            client.close()
    finally:
        await channel.close()


async def test_a_request_that_fails_ends_its_call_and_not_the_connection(
    server: AdsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from repstage_mesh.xds.protocol import SotwStream

    receive = SotwStream.receive

    def failing(self: SotwStream, request: object) -> list[object]:
        if getattr(request, "node", None) is not None and request.node.id == "edge-bad":  # type: ignore[attr-defined]
            raise RuntimeError("a bug")
        return receive(self, request)  # type: ignore[arg-type,return-value]

    monkeypatch.setattr(SotwStream, "receive", failing)
    assert server.port is not None
    channel = aio.insecure_channel(f"127.0.0.1:{server.port}")  # one connection for both calls
    try:
        good, bad = AdsClient(channel), AdsClient(channel)
        good.send(sotw_request(node_id="edge-good"))
        first = await good.receive()
        good.send(sotw_request(version=first.version_info, nonce=first.nonce))
        bad.send(sotw_request(node_id="edge-bad"))
        code, _ = await bad.status()
        assert code == grpc.StatusCode.INTERNAL
        server.cache.set_snapshot("", _snapshot("2", size=11))
        assert (await good.receive()).version_info.startswith("2-")
        good.close()
    finally:
        await channel.close()


def test_grpc_message_is_percent_encoded_and_read_back_whole() -> None:
    import urllib.parse

    from repstage_mesh.xds.grpc_wire import grpc_peer, trailers

    message = "node id 'édge-1' 100% wrong\r\n: see xds.limits"
    (status, (name, value)) = trailers("PERMISSION_DENIED", message)
    assert status == (b"grpc-status", b"7") and name == b"grpc-message"
    assert value.isascii() and b"%25" in value and b"\r" not in value
    assert urllib.parse.unquote(value.decode()) == message
    assert trailers("OK", "") == [(b"grpc-status", b"0")]
    assert grpc_peer(("127.0.0.1", 5000)) == "ipv4:127.0.0.1:5000"
    assert grpc_peer(("::1", 5000, 0, 0)) == "ipv6:[::1]:5000"


async def test_a_server_started_without_serving_refuses_until_told_then_serves() -> None:
    """workers.py binds every worker first and lets them all accept together (relay.WorkerInit.hold)."""
    cache = SnapshotCache()
    cache.set_snapshot("", _snapshot("1"))
    ads = AdsServer(cache, ProxyTracker(), "cp", transport="h2")
    port = await ads.start("127.0.0.1", 0, serving=False)
    try:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        await ads.serve_now()
        await ads.serve_now()  # once is enough; again changes nothing
        async with raw(ads) as client:
            client.call(1)
            client.send(1, _message(sotw_request(node_id="edge-1")))
            await client.until(lambda: len(client.data.get(1, b"")) > 5)
    finally:
        await ads.stop(0)
