"""Failover traces exported over real OTLP gRPC to a receiver built from opentelemetry-proto.

Two control-plane "nodes" in one process, each with its own Tracing (TracerProvider, resource
with its own service.instance.id): node 1 opens the failover trace, the context travels as it
would inside SetPrimary.trace, and both nodes' PushTracers watch simulated proxies (the real
xDS protocol and ProxyTracker) ACK the new version.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from integration.fake_proxies import FakeProxy, snapshot
from integration.otlp_receiver import OtlpReceiver, ReceivedSpan
from repstage_mesh.config import ConfigError, TelemetryConfig
from repstage_mesh.core.models import SetPrimary
from repstage_mesh.telemetry import FailoverTrace, PushTracer, Tracing, resolve_endpoint
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.tracker import ProxyTracker

OLD, NEW = 10, 12


@pytest.fixture(autouse=True)
def _clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
        "OTEL_TRACES_SAMPLER",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@dataclass
class FakeNode:
    node_id: str
    tracing: Tracing
    tracker: ProxyTracker
    pushes: PushTracer
    proxies: list[FakeProxy]

    def publish(self, version: int, primary: str) -> None:
        snap = snapshot(version, primary)
        for proxy in self.proxies:
            proxy.update(snap)


@pytest.fixture
def nodes(receiver: OtlpReceiver) -> Iterator[list[FakeNode]]:
    made: list[FakeNode] = []
    try:
        for node_id, proxies in (
            ("cp-1", ("envoy-a", "envoy-b", "envoy-c")),
            ("cp-2", ("envoy-d", "envoy-e")),
        ):
            tracing = Tracing.setup(TelemetryConfig(otlp_endpoint=receiver.endpoint), node_id)
            assert tracing.enabled
            tracker = ProxyTracker(control_plane=node_id)
            pushes = tracing.push_tracer()
            pushes.attach(tracker)
            node = FakeNode(node_id, tracing, tracker, pushes, [])
            made.append(node)
            initial = snapshot(OLD, "a")
            for i, name in enumerate(proxies, start=1):
                proxy = FakeProxy(tracker, i, name, delta=(name == "envoy-e"))
                proxy.connect(initial)
                proxy.respond()
                node.proxies.append(proxy)
            assert all(r.synced(OLD) for r in tracker.connected())
        yield made
    finally:
        for node in made:
            node.tracing.shutdown()


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


async def test_failover_trace_spans_both_nodes(
    receiver: OtlpReceiver, nodes: list[FakeNode]
) -> None:
    leader = nodes[0]
    detected_at = time.time() - 0.3  # first failed probe, before the failover was known
    ft = leader.tracing.start_failover(
        "db", old="a", new="b", cause="primary_down", mode="follow", started_at=detected_at
    )
    ft.record(FailoverTrace.DETECTION, start=detected_at, end=time.time(), probes_failed=3)
    with ft.child(FailoverTrace.DECISION, candidates=["b"]):
        pass
    with ft.child(FailoverTrace.COMMIT) as commit:
        command = SetPrimary(service="db", member="b", trace=ft.context())
        commit.set(index=NEW)
    ft.set(epoch=NEW)
    with ft.child(FailoverTrace.PROMOTION, member="b"):
        pass
    # the command travels through the log: every node sees the same trace context
    carried = SetPrimary.model_validate_json(command.model_dump_json()).trace
    assert carried is not None and carried["traceparent"].startswith(
        f"00-{ft.trace_id}-{ft.span_id}-"
    )

    for node in nodes:  # apply at NEW: publish to the cache, then begin the push span
        node.publish(NEW, "b")
        assert node.pushes.begin(NEW, carried, timeout=10.0)
        assert node.pushes.open_pushes() == 1
    for node in nodes:
        for proxy in node.proxies:
            assert proxy.respond() >= 1  # the endpoints changed: at least the EDS push to ACK
        assert node.pushes.open_pushes() == 0  # closed at the last ACK, not at the deadline

    result = await leader.pushes.wait(carried, timeout=5.0)
    assert result is not None and not result.not_followed and not result.timed_out
    assert sorted(name for name, _ in result.followed) == ["envoy-a", "envoy-b", "envoy-c"]
    duration = ft.end(not_followed=result.not_followed)
    assert duration >= 0.3
    for node in nodes:
        assert node.tracing.flush(10.0)

    spans = receiver.wait_for(lambda s: len(s) >= 7, timeout=15.0)
    assert len(spans) == 7, [s.name for s in spans]
    assert {s.trace_id for s in spans} == {ft.trace_id}
    (root,) = by_name(spans, "failover")
    assert root.parent_span_id == "" and root.span_id == ft.span_id
    assert root.attributes["repstage.service"] == "db"
    assert root.attributes["repstage.old_primary"] == "a"
    assert root.attributes["repstage.new_primary"] == "b"
    assert root.attributes["repstage.epoch"] == NEW
    assert root.attributes["repstage.cause"] == "primary_down"
    assert root.attributes["repstage.mode"] == "follow"
    assert root.attributes["repstage.not_followed"] == []
    assert root.start_unix_nano == int(detected_at * 1e9)
    assert root.resource["service.instance.id"] == "cp-1"
    assert root.resource["service.name"] == "repstage-mesh"
    for name in ("detection", "decision", "raft.commit", "promotion"):
        (child,) = by_name(spans, name)
        assert child.parent_span_id == root.span_id, name
        assert child.resource["service.instance.id"] == "cp-1"
    (detection,) = by_name(spans, "detection")
    assert detection.start_unix_nano == root.start_unix_nano
    pushes = {s.service_instance: s for s in by_name(spans, "push")}
    assert set(pushes) == {"cp-1", "cp-2"}
    for node in nodes:
        push = pushes[node.node_id]
        assert push.parent_span_id == root.span_id  # across both nodes
        assert push.attributes["repstage.control_plane"] == node.node_id
        assert push.attributes["repstage.version"] == NEW
        assert push.attributes["repstage.push.not_followed"] == []
        assert push.attributes["repstage.push.followed"] == len(node.proxies)
        assert push.status_code != 2
        acks = [e for e in push.events if e.name == "ack"]
        assert sorted(e.attributes["repstage.proxy.node_id"] for e in acks) == sorted(
            p.node.id for p in node.proxies
        )  # exactly one per proxy
        for event in acks:
            assert event.attributes["repstage.latency_s"] >= 0
            assert event.attributes["repstage.xds.send_ack_s"] >= 0
            assert str(event.attributes["repstage.version"]).startswith(str(NEW))
            assert res.short_name(res.ENDPOINT) in [
                res.short_name(t) for t in event.attributes["repstage.xds.types"]
            ]
        assert push.start_unix_nano <= min(e.time_unix_nano for e in acks) <= push.end_unix_nano


async def test_push_lists_proxies_that_did_not_follow(
    receiver: OtlpReceiver, nodes: list[FakeNode]
) -> None:
    leader, follower = nodes
    ft = leader.tracing.start_failover(
        "db", old="a", new="b", cause="switchover", mode="orchestrate"
    )
    carried = ft.context()
    clock = [100.0]
    pushes = follower.tracing.push_tracer(clock=lambda: clock[0])
    pushes.attach(follower.tracker)
    follower.tracker.observers.remove(follower.pushes)
    follower.publish(NEW, "b")
    assert pushes.begin(NEW, carried, timeout=2.0)
    envoy_d = follower.proxies[0]
    envoy_d.respond(nack_types=frozenset({res.ENDPOINT}))  # refuses the new endpoints
    assert pushes.poll(now=101.0) == 0  # envoy-e is silent, the deadline is not there yet
    assert pushes.poll(now=102.0) == 1
    result = pushes.result(carried)
    assert result is not None
    assert result.nacked == ("envoy-d",) and result.lagging == ("envoy-e",) and result.timed_out
    ft.end(not_followed=result.not_followed)
    follower.tracing.flush(10.0)
    leader.tracing.flush(10.0)

    spans = receiver.wait_for(lambda s: {"failover", "push"} <= {x.name for x in s}, timeout=15.0)
    (push,) = by_name(spans, "push")
    assert push.attributes["repstage.push.not_followed"] == ["envoy-e", "envoy-d"]
    assert push.attributes["repstage.push.timed_out"] is True
    assert push.status_code == 2
    assert [e.name for e in push.events] == ["nack"]
    assert push.events[0].attributes["repstage.error"] == "rejected by test"
    (root,) = by_name(spans, "failover")
    assert root.attributes["repstage.not_followed"] == ["envoy-e", "envoy-d"]
    assert push.parent_span_id == root.span_id


async def test_deadline_fires_on_the_loop(receiver: OtlpReceiver, nodes: list[FakeNode]) -> None:
    leader, _ = nodes
    ft = leader.tracing.start_failover("db", old="a", new="b", cause="primary_down", mode="follow")
    leader.publish(NEW, "b")
    assert leader.pushes.begin(NEW, ft.context(), timeout=0.2)
    leader.proxies[0].respond()
    result = await leader.pushes.wait(ft.context(), timeout=5.0)  # no poll(): the loop's timer
    assert result is not None and result.timed_out
    assert sorted(result.lagging) == ["envoy-b", "envoy-c"]
    assert [name for name, _ in result.followed] == ["envoy-a"]


async def test_disconnect_counts_as_not_followed_and_unchanged_proxy_follows(
    receiver: OtlpReceiver, nodes: list[FakeNode]
) -> None:
    leader, _ = nodes
    other = FakeProxy(leader.tracker, 99, "envoy-other", services=("cache",))
    other.connect(snapshot(OLD, "a", services=("db", "cache")))
    other.respond()
    ft = leader.tracing.start_failover("db", old="a", new="b", cause="primary_down", mode="follow")
    snap = snapshot(NEW, "b", services=("db", "cache"))
    for proxy in [*leader.proxies, other]:
        proxy.update(snap)
    assert leader.pushes.begin(NEW, ft.context(), timeout=10.0)
    leader.proxies[0].disconnect()
    for proxy in leader.proxies[1:]:
        proxy.respond()
    result = leader.pushes.result(ft.context())
    assert result is not None
    assert result.disconnected == ("envoy-a",)
    followed = dict(result.followed)
    assert set(followed) == {
        "envoy-b",
        "envoy-c",
        "envoy-other",
    }  # cache's endpoints did not change
    leader.tracing.flush(10.0)
    spans = receiver.wait_for(lambda s: any(x.name == "push" for x in s), timeout=15.0)
    (push,) = by_name(spans, "push")
    names = sorted(e.name for e in push.events)
    assert names == ["ack", "ack", "disconnect", "unchanged"]


def test_off_without_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    tracing = Tracing.setup(TelemetryConfig(), "cp-1")
    assert not tracing.enabled and tracing.provider is None
    ft = tracing.start_failover("db", old="a", new="b", cause="x", mode="follow")
    assert ft.context() is None and ft.trace_id is None
    with ft.child("decision") as phase:
        phase.set(anything=1)
    assert ft.end() >= 0
    pushes = tracing.push_tracer()
    assert not pushes.begin(NEW, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    assert pushes.open_pushes() == 0


def test_endpoint_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_endpoint(TelemetryConfig(), {}) is None
    assert resolve_endpoint(TelemetryConfig(otlp_endpoint="http://c:4317"), {}) == "http://c:4317"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317"}
    assert resolve_endpoint(TelemetryConfig(), env) == "http://env:4317"
    assert (
        resolve_endpoint(TelemetryConfig(), {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "t:4317"})
        == "t:4317"
    )
    assert (
        resolve_endpoint(TelemetryConfig(otlp_endpoint="c:4317"), env) == "c:4317"
    )  # the file wins
    assert (
        resolve_endpoint(TelemetryConfig(otlp_endpoint="c:4317"), {"OTEL_SDK_DISABLED": "true"})
        is None
    )
    assert resolve_endpoint(TelemetryConfig(), {**env, "OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(ConfigError, match=r"telemetry\.otlp_endpoint"):
        resolve_endpoint(TelemetryConfig(otlp_endpoint="grpc://x"), {})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        resolve_endpoint(TelemetryConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "nocolon"})


def test_service_name_from_env_unless_configured(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "mesh-from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    tracings = [
        Tracing.setup(TelemetryConfig(otlp_endpoint=receiver.endpoint), "cp-1"),
        Tracing.setup(
            TelemetryConfig(otlp_endpoint=receiver.endpoint, service_name="mesh-file"), "cp-2"
        ),
    ]
    try:
        for t in tracings:
            t.start_failover("db", old=None, new="b", cause="x", mode="follow").end()
            t.flush(10.0)
        spans = receiver.wait_for(lambda s: len(s) >= 2, timeout=15.0)
        names = {s.service_instance: s.resource["service.name"] for s in spans}
        assert names == {"cp-1": "mesh-from-env", "cp-2": "mesh-file"}
        assert all(s.resource["deployment.environment"] == "test" for s in spans)
    finally:
        for t in tracings:
            t.shutdown()


async def test_one_event_per_proxy_beyond_the_sdk_default_limit(receiver: OtlpReceiver) -> None:
    """The SDK keeps 128 events per span by default; a push span must keep one per proxy."""
    tracing = Tracing.setup(TelemetryConfig(otlp_endpoint=receiver.endpoint), "cp-1")
    try:
        tracker = ProxyTracker(control_plane="cp-1")
        pushes = tracing.push_tracer()
        pushes.attach(tracker)
        fleet = [FakeProxy(tracker, i, f"envoy-{i}") for i in range(300)]
        for proxy in fleet:
            proxy.connect(snapshot(OLD, "a"))
            proxy.respond()
        ft = tracing.start_failover("db", old="a", new="b", cause="primary_down", mode="follow")
        for proxy in fleet:
            proxy.update(snapshot(NEW, "b"))
        assert pushes.begin(NEW, ft.context(), timeout=10.0)
        for proxy in fleet:
            proxy.respond()
        ft.end()
        tracing.flush(10.0)
        spans = receiver.wait_for(lambda s: any(x.name == "push" for x in s), timeout=15.0)
        (push,) = by_name(spans, "push")
        assert push.attributes["repstage.push.proxies"] == 300
        assert len({e.attributes["repstage.proxy.node_id"] for e in push.events if e.name == "ack"}) == 300
    finally:
        tracing.shutdown()
