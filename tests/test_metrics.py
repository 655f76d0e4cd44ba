"""MeshMetrics: a real ProxyTracker drives it; the registry is scraped with generate_latest and
parsed with prometheus_client's own text parser, as Prometheus would read /metrics."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from repstage_mesh.core.errors import CommitTimeout, NoQuorum, NoQuorumOutcomeUnknown, Rejected
from repstage_mesh.core.models import MeshState, Rejection
from repstage_mesh.telemetry.metrics import MeshMetrics, write_failure_code
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot
from repstage_mesh.xds.protocol import (
    Acked,
    DeltaStream,
    Nacked,
    NodeInfo,
    Send,
    SotwRequest,
    SotwStream,
)
from repstage_mesh.xds.tracker import ProxyTracker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def snapshot(version: int, endpoint_salt: str = "a") -> Snapshot:
    cluster = EncodedResource.from_bytes(res.CLUSTER, "db", b"cluster-db", ((res.ENDPOINT, "db"),))
    cla = EncodedResource.from_bytes(res.ENDPOINT, "db", f"cla-{endpoint_salt}".encode())
    return Snapshot(str(version), {res.CLUSTER: {"db": cluster}, res.ENDPOINT: {"db": cla}})


@pytest.fixture
def setup() -> tuple[CollectorRegistry, MeshMetrics, ProxyTracker, Clock]:
    registry = CollectorRegistry()
    metrics = MeshMetrics(registry, "cp-1")
    clock = Clock()
    tracker = ProxyTracker(control_plane="cp-1", clock=clock)
    tracker.observers.append(metrics)
    return registry, metrics, tracker, clock


def test_fake_actions_move_push_ack_nack_counters(setup: Any) -> None:
    registry, _, tracker, clock = setup
    snap = snapshot(5)
    tracker.connect(1, NodeInfo("envoy-1"), SotwStream(snap))
    before = scrape(registry)
    assert value(before, "repstage_xds_pushes_total", type="eds") is None

    tracker.record(1, [Send(res.ENDPOINT, "5-aa", "1", (), (), snap), Send(res.CLUSTER, "5-bb", "2", (), (), snap)])
    clock.now += 0.003
    tracker.record(1, [Acked(res.ENDPOINT, "5-aa", "1")])
    clock.now += 0.5
    tracker.record(1, [Nacked(res.CLUSTER, "5-bb", "2", "bad cluster")])

    after = scrape(registry)
    assert value(after, "repstage_xds_pushes_total", type="eds") == 1
    assert value(after, "repstage_xds_pushes_total", type="cds") == 1
    assert value(after, "repstage_xds_acks_total", type="eds") == 1
    assert value(after, "repstage_xds_nacks_total", type="cds") == 1
    assert value(after, "repstage_xds_acks_total", type="cds") == 0
    # the ACK came 3 ms after the push: in the 5 ms bucket, not in the 2.5 ms one
    assert value(after, "repstage_xds_push_ack_seconds_count", type="eds") == 1
    assert value(after, "repstage_xds_push_ack_seconds_bucket", type="eds", le="0.0025") == 0
    assert value(after, "repstage_xds_push_ack_seconds_bucket", type="eds", le="0.005") == 1
    assert value(after, "repstage_xds_push_ack_seconds_bucket", type="eds", le="0.0005") == 0
    assert value(after, "repstage_xds_push_ack_seconds_bucket", type="eds", le="10.0") == 1
    assert value(after, "repstage_xds_push_ack_seconds_sum", type="eds") == pytest.approx(0.003)
    # the NACKed cluster update is held back until an ACK of that type
    assert value(after, "repstage_xds_nacked_held", type="cds") == 1
    assert value(after, "repstage_xds_nacked_held", type="eds") == 0

    tracker.record(1, [Send(res.CLUSTER, "6-cc", "3", (), (), snap)])
    tracker.record(1, [Acked(res.CLUSTER, "6-cc", "3")])
    later = scrape(registry)
    assert value(later, "repstage_xds_nacked_held", type="cds") == 0
    assert value(later, "repstage_xds_pushes_total", type="cds") == 2
    assert value(later, "repstage_xds_acks_total", type="cds") == 1


def test_nacked_held_cleared_on_disconnect(setup: Any) -> None:
    registry, _, tracker, _ = setup
    snap = snapshot(5)
    for sid in (1, 2):
        tracker.connect(sid, NodeInfo(f"envoy-{sid}"), SotwStream(snap))
        tracker.record(sid, [Send(res.ENDPOINT, "5-aa", "1", (), (), snap)])
        tracker.record(sid, [Nacked(res.ENDPOINT, "5-aa", "1", "no")])
    assert value(scrape(registry), "repstage_xds_nacked_held", type="eds") == 2
    tracker.disconnect(1)
    assert value(scrape(registry), "repstage_xds_nacked_held", type="eds") == 1


def test_connected_proxies_by_type_and_stream_kind(setup: Any) -> None:
    """Real streams: a proxy counts for a type once it subscribed to it."""
    registry, _, tracker, _ = setup
    snap = snapshot(7)
    streams = []
    for sid in (1, 2, 3):
        stream = SotwStream(snap)
        streams.append(stream)
        tracker.connect(sid, NodeInfo(f"envoy-{sid}"), stream)
        tracker.record(sid, stream.receive(SotwRequest(res.CLUSTER, node=NodeInfo(f"envoy-{sid}"))))
    tracker.record(1, streams[0].receive(SotwRequest(res.ENDPOINT, resource_names=("db",))))
    tracker.connect(4, NodeInfo("envoy-4"), DeltaStream(snap))

    samples = scrape(registry)
    assert value(samples, "repstage_xds_connected_proxies", control_plane="cp-1", type="cds", stream="sotw") == 3
    assert value(samples, "repstage_xds_connected_proxies", control_plane="cp-1", type="eds", stream="sotw") == 1
    assert value(samples, "repstage_xds_streams", control_plane="cp-1", stream="sotw") == 3
    assert value(samples, "repstage_xds_streams", control_plane="cp-1", stream="delta") == 1
    # the real protocol sent CDS to all three and EDS to one
    assert value(samples, "repstage_xds_pushes_total", type="cds") == 3
    assert value(samples, "repstage_xds_pushes_total", type="eds") == 1

    # an ACK through the real protocol
    send = next(a for a in streams[0].types[res.CLUSTER].pending.values())
    tracker.record(1, streams[0].receive(SotwRequest(res.CLUSTER, send.version, send.nonce)))
    assert value(scrape(registry), "repstage_xds_acks_total", type="cds") == 1

    tracker.disconnect(2)
    tracker.disconnect(4)
    samples = scrape(registry)
    assert value(samples, "repstage_xds_connected_proxies", control_plane="cp-1", type="cds", stream="sotw") == 2
    assert value(samples, "repstage_xds_streams", control_plane="cp-1", stream="delta") == 0


def test_raft_gauges_read_status_at_scrape_time() -> None:
    registry = CollectorRegistry()
    status: dict[str, Any] = {
        "term": 2, "commit_index": 10, "applied_index": 9, "is_leader": False, "has_quorum": True,
        "peers": [{"address": "a:1", "connected": True}, {"address": "b:1", "connected": False}],
    }
    calls = []

    def read() -> dict[str, Any]:
        calls.append(1)
        return status

    MeshMetrics(registry, "cp-1", raft_status=read)
    assert calls == []  # registering does not read it
    samples = scrape(registry)
    assert value(samples, "repstage_raft_term") == 2
    assert value(samples, "repstage_raft_commit_index") == 10
    assert value(samples, "repstage_raft_applied_index") == 9
    assert value(samples, "repstage_raft_is_leader") == 0
    assert value(samples, "repstage_raft_has_quorum") == 1
    assert value(samples, "repstage_raft_peers") == 2
    assert value(samples, "repstage_raft_peers_connected") == 1
    status.update(term=3, commit_index=12, is_leader=True)
    samples = scrape(registry)
    assert value(samples, "repstage_raft_term") == 3
    assert value(samples, "repstage_raft_commit_index") == 12
    assert value(samples, "repstage_raft_is_leader") == 1
    assert len(calls) == 2


def test_raft_status_failure_does_not_break_the_scrape() -> None:
    registry = CollectorRegistry()

    def broken() -> dict[str, Any]:
        raise RuntimeError("store closed")

    MeshMetrics(registry, "cp-1", raft_status=broken)
    samples = scrape(registry)
    assert value(samples, "repstage_raft_term") is None
    assert value(samples, "repstage_xds_streams", control_plane="cp-1", stream="sotw") == 0


def test_observed_facts() -> None:
    registry = CollectorRegistry()
    metrics = MeshMetrics(registry, "cp-1")
    metrics.observe_failover("db", 1.5, "orchestrate")
    metrics.observe_commit(0.0004)
    metrics.observe_probe("db", "a", "primary")
    metrics.observe_probe("db", "a", "primary")
    metrics.observe_probe("db", "b", "down")
    metrics.observe_write_failure(write_failure_code(NoQuorum("x")))
    metrics.observe_write_failure(write_failure_code(Rejected(Rejection(code="stale_epoch", message="old"))))
    samples = scrape(registry)
    assert value(samples, "repstage_failover_duration_seconds_count", service="db", mode="orchestrate") == 1
    assert value(samples, "repstage_failover_duration_seconds_bucket", service="db", mode="orchestrate", le="1.0") == 0
    assert value(samples, "repstage_failover_duration_seconds_bucket", service="db", mode="orchestrate", le="2.0") == 1
    assert value(samples, "repstage_raft_commit_seconds_bucket", le="0.0005") == 1
    assert value(samples, "repstage_probe_results_total", service="db", member="a", result="primary") == 2
    assert value(samples, "repstage_probe_results_total", service="db", member="b", result="down") == 1
    assert value(samples, "repstage_write_failures_total", code="no_quorum") == 1
    assert value(samples, "repstage_write_failures_total", code="stale_epoch") == 1


def test_write_failure_codes() -> None:
    assert write_failure_code(NoQuorum("x")) == "no_quorum"
    assert write_failure_code(CommitTimeout("x")) == "commit_timeout"
    assert write_failure_code(NoQuorumOutcomeUnknown("x")) == "no_quorum_outcome_unknown"
    assert write_failure_code(ValueError("x")) == "error"


def test_names_follow_prometheus_conventions() -> None:
    registry = CollectorRegistry()
    MeshMetrics(registry, "cp-1", state=MeshState)  # with the service gauges (issue 15)
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    for family in families:
        assert family.name.startswith("repstage_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
