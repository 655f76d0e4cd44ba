"""xds.limits: an abusive client is refused or bounded, counted in a metric with a fixed label
set, and leaves no per-type state behind (issue 13, item 4). Real grpcio on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from repstage_mesh.telemetry.metrics import MeshMetrics
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot, SnapshotCache
from repstage_mesh.xds.limits import XdsLimits, is_loopback_peer, peer_host
from repstage_mesh.xds.protocol import DeltaRequest, DeltaStream, SotwRequest, SotwStream
from repstage_mesh.xds.server import AdsServer, _Outbox
from repstage_mesh.xds.tracker import ProxyTracker
from tests.fakes import eventually
from tests.xds_client import CLUSTERS, AdsClient, delta_request, sotw_request


def snapshot(version: int, services: tuple[str, ...] = ("db",)) -> Snapshot:
    clusters = {n: EncodedResource.from_bytes(res.CLUSTER, n, f"c:{n}:{version}".encode()) for n in services}
    return Snapshot(str(version), {res.CLUSTER: clusters})


@dataclass
class Served:
    server: AdsServer
    tracker: ProxyTracker
    metrics: MeshMetrics
    registry: CollectorRegistry
    channel: aio.Channel
    cache: SnapshotCache

    def hits(self, limit: str) -> float:
        value = self.registry.get_sample_value("repstage_xds_limit_hits_total", {"limit": limit})
        return value or 0.0

    def client(self, delta: bool = False) -> AdsClient:
        return AdsClient(self.channel, delta)


async def serve(limits: XdsLimits, transport: str = "h2") -> AsyncIterator[Served]:
    registry = CollectorRegistry()
    cache = SnapshotCache()
    cache.set_snapshot("", snapshot(5))
    tracker = ProxyTracker("cp-test")
    metrics = MeshMetrics(registry, "cp-test")
    tracker.observers.append(metrics)
    server = AdsServer(cache, tracker, "cp-test", limits=limits, guard=metrics, transport=transport)
    port = await server.start("127.0.0.1", 0)
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(server, tracker, metrics, registry, channel, cache)
    finally:
        await channel.close()
        await server.stop(0)


@pytest.fixture(params=["h2", "grpc"])  # both transports (xds.transport) apply every limit alike
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    limits = XdsLimits(max_resource_names=50, max_streams_per_peer=4, max_streams=6,
                       max_initial_resource_versions=20, max_node_metadata_bytes=64)
    async for s in serve(limits, request.param):
        yield s


async def test_unknown_type_urls_close_the_stream_and_keep_no_state(served: Served) -> None:
    label_lines = len(generate_latest(served.registry).splitlines())
    for i in range(20):
        client = served.client()
        client.send(sotw_request(f"type.googleapis.com/made.up.Type{i}", node_id=f"edge-{i}"))
        code, details = await client.status()
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown type URL" in details
        client.close()
    huge = "type.googleapis.com/" + "x" * (1024 * 1024)
    client = served.client()
    client.send(sotw_request(huge, node_id="edge-huge"))
    code, details = await client.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 400, details[:500]
    assert served.hits("type_url") == 21
    assert not any(record.stream.types for record in served.tracker.records.values())
    assert len(generate_latest(served.registry).splitlines()) == label_lines  # no new label


async def test_a_known_type_after_an_unknown_one_on_another_stream_is_served(served: Served) -> None:
    bad = served.client()
    bad.send(sotw_request("type.googleapis.com/nope", node_id="bad"))
    assert (await bad.status())[0] == grpc.StatusCode.INVALID_ARGUMENT
    good = served.client()
    good.send(sotw_request(CLUSTERS, node_id="good"))
    response = await good.receive()
    assert response.version_info.startswith("5-")
    good.close()


async def test_too_many_resource_names_close_the_stream(served: Served) -> None:
    client = served.client()
    client.send(sotw_request(res.ENDPOINT, names=tuple(f"n{i}" for i in range(51)), node_id="e"))
    code, details = await client.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_resource_names" in details
    # Delta: subscriptions add up across requests
    delta = served.client(delta=True)
    delta.send(delta_request(res.ENDPOINT, subscribe=tuple(f"a{i}" for i in range(30)), node_id="d"))
    await eventually(lambda: any(r.kind == "delta" for r in served.tracker.connected()), "delta connected")
    delta.send(delta_request(res.ENDPOINT, subscribe=tuple(f"b{i}" for i in range(30))))
    code, _ = await delta.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.hits("resource_names") == 2


async def test_initial_resource_versions_over_the_limit(served: Served) -> None:
    client = served.client(delta=True)
    client.send(delta_request(CLUSTERS, initial={f"r{i}": "v" for i in range(21)}, node_id="d"))
    code, details = await client.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "initial_resource_versions" in details
    assert served.hits("initial_resource_versions") == 1


async def test_streams_per_peer_and_in_total(served: Served) -> None:
    clients = [served.client() for _ in range(4)]
    for i, c in enumerate(clients):
        c.send(sotw_request(CLUSTERS, node_id=f"p{i}"))
        await c.receive()
    extra = served.client()
    extra.send(sotw_request(CLUSTERS, node_id="p-extra"))
    code, details = await extra.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams_per_peer" in details
    assert served.hits("streams_per_peer") == 1
    clients[0].close()
    await eventually(lambda: served.server.slots.total == 3, "a slot is released")
    again = served.client()
    again.send(sotw_request(CLUSTERS, node_id="p-again"))
    assert (await again.receive()).version_info.startswith("5-")
    for c in [*clients, again]:
        c.close()
    await eventually(lambda: served.server.slots.total == 0, "every slot released")


def test_stream_slots_total_limit() -> None:
    from repstage_mesh.xds.limits import LimitExceeded, StreamSlots

    slots = StreamSlots(XdsLimits(max_streams=2, max_streams_per_peer=5))
    release = slots.take("ipv4:10.0.0.1:1")
    slots.take("ipv4:10.0.0.2:1")
    with pytest.raises(LimitExceeded) as err:
        slots.take("ipv4:10.0.0.3:1")
    assert err.value.limit == "streams"
    release()
    release()  # idempotent
    slots.take("ipv4:10.0.0.3:1")
    assert slots.total == 2 and slots.by_peer == {"10.0.0.2": 1, "10.0.0.3": 1}


async def test_node_id_too_long_is_refused_and_big_metadata_is_dropped(served: Served) -> None:
    client = served.client()
    client.send(sotw_request(CLUSTERS, node_id="n" * 300))
    code, details = await client.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "node.id is 300 bytes" in details
    from envoy_data_plane.envoy.config.core.v3 import Node
    from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest
    from envoy_data_plane.google.protobuf import Struct

    fat = Node(id="fat", cluster="c", metadata=Struct.from_dict({"blob": "x" * 1000}))
    client = served.client()
    client.send(bytes(DiscoveryRequest(node=fat, type_url=CLUSTERS)))
    await client.receive()
    (record,) = [r for r in served.tracker.connected() if r.node.id == "fat"]
    assert record.node.metadata == {}
    assert served.hits("node_metadata") == 1 and served.hits("node_id") == 1
    client.close()


def test_unacked_delta_responses_are_bounded() -> None:
    stream = DeltaStream()
    stream.max_unacked = 2
    actions = stream.receive(DeltaRequest(CLUSTERS))
    for version in range(1, 6):
        stream.update(snapshot(version))
    assert len(stream.types[CLUSTERS].pending) == 2 and stream.throttled
    pending = sorted(stream.types[CLUSTERS].pending)
    actions = stream.receive(DeltaRequest(CLUSTERS, response_nonce=pending[0]))
    assert any(getattr(a, "nonce", None) not in pending for a in actions)  # one more goes out
    assert len(stream.types[CLUSTERS].pending) == 2


async def test_outgoing_queue_over_the_limit_closes_the_stream() -> None:
    cache = SnapshotCache()
    server = AdsServer(cache, ProxyTracker(), limits=XdsLimits(max_outgoing_queue=3))
    stream = SotwStream(snapshot(1))
    out = _Outbox(stream, 1, server, delta=False)
    for version in range(2, 7):
        stream.snapshot = snapshot(version)
        out.emit(stream.receive(SotwRequest(CLUSTERS)))
        stream.types.clear()  # a client re-asking: each request yields a response
    assert out.overflow is not None and out.overflow.limit == "outgoing_queue"
    assert not out.frames


@pytest.mark.parametrize(
    ("peer", "host", "loopback"),
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1", True),
        ("ipv4:10.1.2.3:5000", "10.1.2.3", False),
        ("ipv6:[::1]:5000", "::1", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", "::ffff:127.0.0.1", True),
        ("ipv6:[fe80::1%eth0]:5000", "fe80::1%eth0", False),
        ("unix:/tmp/x", "unix:/tmp/x", True),
        ("something", "something", False),
    ],
)
def test_peer_addresses(peer: str, host: str, loopback: bool) -> None:
    assert peer_host(peer) == host
    assert is_loopback_peer(peer) is loopback


async def test_metrics_label_sets_are_fixed() -> None:
    registry = CollectorRegistry()
    metrics = MeshMetrics(registry, "cp")
    before = generate_latest(registry)
    metrics.on_limit("not-a-limit")
    metrics.on_refusal("not-a-reason")
    assert generate_latest(registry) == before
    await asyncio.sleep(0)


def test_refusals_do_not_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    from repstage_mesh.xds.server import _QuietLog

    quiet = _QuietLog(interval=3600)
    with caplog.at_level("INFO", logger="repstage_mesh.xds.server"):
        for i in range(1000):
            quiet.log("streams_per_peer", "refused %d", i)
        quiet.log("type_url", "other %d", 0)
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "other 0"]


def test_a_long_nack_error_is_cut_and_counted() -> None:
    from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest
    from envoy_data_plane.google.rpc import Status

    from repstage_mesh.xds.requests import NodeReading, parse_sotw

    reading = NodeReading()
    data = bytes(DiscoveryRequest(type_url=CLUSTERS, response_nonce="1", error_detail=Status(code=3, message="e" * 10_000)))
    request = parse_sotw(data, XdsLimits(max_error_detail_bytes=100), reading)
    assert request.error == "e" * 100 + "..." and reading.cut_error


async def test_a_huge_resource_name_closes_the_stream(served: Served) -> None:
    client = served.client(delta=True)
    client.send(delta_request(res.ENDPOINT, subscribe=("n" * 2000,), node_id="d"))
    code, details = await client.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_resource_name_bytes" in details
    assert served.hits("resource_name_bytes") == 1


async def test_a_request_over_max_request_bytes_is_refused_and_counted() -> None:
    async for served in serve(XdsLimits(max_request_bytes=2048)):
        client = served.client()
        client.send(sotw_request(CLUSTERS, names=("x" * 500,) * 6, node_id="big"))
        code, details = await client.status()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_bytes" in details
        assert served.hits("request_bytes") == 1


async def test_insecure_plaintext_is_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from repstage_mesh.xds.tls import XdsSecurity

    server = AdsServer(SnapshotCache(), ProxyTracker(), security=XdsSecurity(insecure=True))
    with caplog.at_level("INFO", logger="repstage_mesh.xds.server"):
        await server.start("127.0.0.1", 0)
        await server.stop(0)
    (record,) = [r for r in caplog.records if "listening" in r.getMessage()]
    assert record.levelname == "WARNING" and "INSECURE" in record.getMessage()


_names = st.sampled_from([f"r{i}" for i in range(30)])


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([res.CLUSTER, res.ENDPOINT]),
                          st.lists(_names, max_size=12), st.lists(_names, max_size=6)), max_size=25))
def test_a_stream_never_holds_more_names_than_the_limit(requests: list[tuple[bool, str, list[str], list[str]]]) -> None:
    """Whatever a client asks, in whatever order: a request that passes check_names leaves the
    stream within max_resource_names (SotW replaces a type's names; Delta adds and removes)."""
    from repstage_mesh.xds.limits import LimitExceeded, check_names

    limits = XdsLimits(max_resource_names=15)
    sotw, delta = SotwStream(snapshot(1)), DeltaStream(snapshot(1))
    for is_delta, type_url, names, unsubscribe in requests:
        stream: SotwStream | DeltaStream = delta if is_delta else sotw
        try:
            check_names(stream, type_url, names, limits, unsubscribe if is_delta else ())
        except LimitExceeded:
            continue  # the server closes the stream; nothing is applied
        if is_delta:
            delta.receive(DeltaRequest(type_url, tuple(names), tuple(unsubscribe)))
        else:
            sotw.receive(SotwRequest(type_url, resource_names=tuple(names)))
        assert sum(len(t.names) for t in stream.types.values()) <= limits.max_resource_names


def test_a_delta_client_at_the_limit_may_swap_names_in_one_request() -> None:
    from repstage_mesh.xds.limits import LimitExceeded, check_names

    limits = XdsLimits(max_resource_names=3)
    stream = DeltaStream(snapshot(1))
    stream.receive(DeltaRequest(res.ENDPOINT, ("a", "b", "c")))
    check_names(stream, res.ENDPOINT, ["d"], limits, unsubscribe=["a"])  # 3 after: allowed
    with pytest.raises(LimitExceeded):
        check_names(stream, res.ENDPOINT, ["d"], limits)


def test_admission_gate_serves_a_burst_then_a_steady_rate() -> None:
    from repstage_mesh.xds.limits import AdmissionGate

    gate = AdmissionGate(XdsLimits(admission_rate=10.0, admission_burst=3))
    waits = [gate.reserve(100.0) for _ in range(6)]
    assert waits[:3] == [0.0, 0.0, 0.0]  # the burst
    assert waits[3:] == pytest.approx([0.1, 0.2, 0.3])  # then one every 1/rate seconds
    assert gate.reserve(200.0) == 0.0  # an idle gate has its burst back
    with pytest.raises(ValueError, match="admission_rate"):
        XdsLimits(admission_rate=0)


async def test_a_reconnect_storm_waits_its_turn_and_nothing_is_refused() -> None:
    limits = XdsLimits(admission_rate=5.0, admission_burst=1, max_streams_per_peer=100)
    async for served in serve(limits):
        clients = [served.client() for _ in range(6)]
        for i, c in enumerate(clients):
            c.send(sotw_request(CLUSTERS, node_id=f"storm-{i}"))
        answers = [await c.receive() for c in clients]  # every stream is served, in turn
        assert all(a.version_info.startswith("5-") for a in answers)
        # Beyond the burst they waited (how many depends on how fast they arrived; the exact
        # schedule is test_admission_gate_serves_a_burst_then_a_steady_rate's).
        assert served.hits("admission") >= 1
        assert served.hits("streams") == 0 and served.hits("streams_per_peer") == 0
        assert served.server.admission.waiting == 0
        for c in clients:
            c.close()


async def test_a_stream_that_leaves_while_waiting_its_turn_gives_its_slot_back() -> None:
    limits = XdsLimits(admission_rate=0.5, admission_burst=1, max_streams_per_peer=100)
    async for served in serve(limits):
        first = served.client()
        first.send(sotw_request(CLUSTERS, node_id="first"))
        await first.receive()
        waiting = served.client()
        waiting.send(sotw_request(CLUSTERS, node_id="waiting"))
        server = served.server
        await eventually(lambda s=server: s.admission.waiting == 1, "the second stream waits its turn")
        assert served.server.slots.total == 2 and served.hits("admission") == 1
        waiting.close()
        await eventually(lambda s=server: s.admission.waiting == 0, "the waiting stream left")
        await eventually(lambda s=server: s.slots.total == 1, "its slot is given back")
        assert "waiting" not in {r.node.id for r in served.tracker.records.values()}
        first.close()
