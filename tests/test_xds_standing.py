"""Proxies that must not hold a change back: a version claim from the future, and a client
that never ACKs anything (xds/standing.py)."""

from __future__ import annotations

from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot
from repstage_mesh.xds.protocol import NodeInfo, SotwRequest, SotwStream
from repstage_mesh.xds.sync_state import type_sync_state
from repstage_mesh.xds.tracker import ProxyTracker

CDS = res.CLUSTER


def snapshot(version: int) -> Snapshot:
    item = EncodedResource.from_bytes(CDS, "db", f"c:{version}".encode())
    return Snapshot(str(version), {CDS: {"db": item}})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def connect(tracker: ProxyTracker, sid: int, snap: Snapshot, request: SotwRequest) -> SotwStream:
    stream = SotwStream(snap)
    tracker.connect(sid, NodeInfo(f"edge-{sid}"), stream)
    tracker.record(sid, stream.receive(request))
    return stream


def test_a_version_from_the_future_is_flagged_not_waited_for_and_not_downgraded() -> None:
    tracker = ProxyTracker(clock=Clock())
    stream = connect(tracker, 1, snapshot(7), SotwRequest(CDS, version_info="999999999-x"))
    record = tracker.records[1]
    assert type_sync_state(stream, CDS) == "ahead"
    assert not record.stream.types[CDS].pending  # nothing older is sent (invariant 4)
    assert record.synced(min_index=7) and tracker.unsynced(7) == []
    assert not record.synced(min_index=8)  # this replica has not reached the awaited index
    view = record.to_dict()
    assert view["version_ahead"] is True and view["claimed_version"] == "999999999-x"


def test_an_honest_client_behind_is_still_waited_for() -> None:
    tracker = ProxyTracker(clock=Clock())
    connect(tracker, 1, snapshot(7), SotwRequest(CDS, version_info="3-abc"))
    record = tracker.records[1]
    assert not record.synced(min_index=7)  # sent 7, not yet ACKed
    assert record.to_dict()["version_ahead"] is False


def test_a_never_acking_client_is_waited_for_only_during_its_grace() -> None:
    clock = Clock()
    tracker = ProxyTracker(clock=clock, never_acked_grace=10.0)
    connect(tracker, 1, snapshot(7), SotwRequest(CDS))
    record = tracker.records[1]
    assert not record.synced(7) and record.to_dict()["never_acked"] is False
    clock.now += 10.0
    assert record.synced(7) and record.to_dict()["never_acked"] is True


def test_a_client_that_acked_once_is_waited_for_after_the_grace() -> None:
    clock = Clock()
    tracker = ProxyTracker(clock=clock, never_acked_grace=10.0)
    stream = connect(tracker, 1, snapshot(7), SotwRequest(CDS))
    nonce = stream.types[CDS].last_nonce
    tracker.record(1, stream.receive(SotwRequest(CDS, version_info="x", response_nonce=nonce)))
    assert tracker.records[1].synced(7)
    tracker.record(1, stream.update(snapshot(8)))
    clock.now += 60.0
    assert not tracker.records[1].synced(8)  # slow now, but it answers: waited for
    assert tracker.records[1].to_dict()["never_acked"] is False


def test_the_tracker_keeps_a_bounded_number_of_disconnected_records() -> None:
    hits: list[str] = []
    tracker = ProxyTracker(clock=Clock(), max_disconnected=3, on_limit=hits.append)
    for sid in range(1, 11):
        connect(tracker, sid, snapshot(7), SotwRequest(CDS))
        tracker.disconnect(sid)
    connect(tracker, 11, snapshot(7), SotwRequest(CDS))
    assert sorted(tracker.records) == [8, 9, 10, 11]
    assert hits and set(hits) == {"disconnected_proxies"}


def test_disconnected_records_are_forgotten_in_the_order_they_left_and_after_the_horizon() -> None:
    clock = Clock()
    tracker = ProxyTracker(clock=clock, max_disconnected=2, keep_disconnected=60.0)
    for sid in (1, 2, 3):
        connect(tracker, sid, snapshot(7), SotwRequest(CDS))
    for sid in (3, 1, 2):  # the first to connect is not the first to leave
        clock.now += 10
        tracker.disconnect(sid)
    connect(tracker, 4, snapshot(7), SotwRequest(CDS))
    assert sorted(tracker.records) == [1, 2, 4]  # 3 left first
    clock.now += 55  # 1 left 65 s ago, 2 left 55 s ago
    connect(tracker, 5, snapshot(7), SotwRequest(CDS))
    assert sorted(tracker.records) == [2, 4, 5]
    tracker.disconnect(4)
    clock.now += 61
    connect(tracker, 6, snapshot(7), SotwRequest(CDS))
    assert sorted(tracker.records) == [5, 6]


def test_the_push_trace_does_not_wait_for_excused_proxies() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from repstage_mesh.telemetry.push_tracer import PushTracer

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    clock = Clock()
    tracker = ProxyTracker(clock=clock, never_acked_grace=10.0)
    tracer = PushTracer(provider.get_tracer("test"), "cp", clock=clock)
    tracer.attach(tracker)
    never = connect(tracker, 1, snapshot(7), SotwRequest(CDS))  # sent 7, will never answer
    connect(tracker, 2, snapshot(7), SotwRequest(CDS, version_info="999999999-x"))
    honest = connect(tracker, 3, snapshot(7), SotwRequest(CDS))
    clock.now += 10.0
    tracker.record(3, honest.receive(SotwRequest(CDS, version_info="x", response_nonce=honest.types[CDS].last_nonce)))
    for sid, stream in ((1, never), (3, honest)):
        tracker.record(sid, stream.update(snapshot(8)))
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert tracer.begin(8, {"traceparent": traceparent}, timeout=30.0)
    nonce = honest.types[CDS].last_nonce
    tracker.record(3, honest.receive(SotwRequest(CDS, version_info="y", response_nonce=nonce)))
    (span,) = exporter.get_finished_spans()  # closed at the honest proxy's ACK, not at the deadline
    assert span.attributes is not None and span.attributes["repstage.push.proxies"] == 1
    assert not span.attributes.get("repstage.push.timed_out")


def test_a_client_that_came_back_in_sync_is_waited_for_at_its_first_push() -> None:
    """Reconnected with the current digest: nothing sent, nothing to ACK. Long after, the
    first change goes out: it is a fresh wait, not a 'never ACKed' client."""
    clock = Clock()
    tracker = ProxyTracker(clock=clock, never_acked_grace=10.0)
    stream = SotwStream(snapshot(7))
    tracker.connect(1, NodeInfo("edge-1"), stream)
    first = SotwStream(snapshot(7))
    first.receive(SotwRequest(CDS))
    version = first.types[CDS].pending[first.types[CDS].last_nonce].version
    tracker.record(1, stream.receive(SotwRequest(CDS, version_info=version)))
    assert tracker.records[1].synced(7) and tracker.records[1].first_sent_at is None
    clock.now += 60.0
    tracker.record(1, stream.update(snapshot(8)))
    assert not tracker.records[1].synced(8) and not tracker.records[1].to_dict()["never_acked"]


def test_a_future_claim_on_one_type_does_not_excuse_another_type_behind() -> None:
    from repstage_mesh.xds import standing

    tracker = ProxyTracker(clock=Clock())
    snap = Snapshot("7", {
        CDS: {"db": EncodedResource.from_bytes(CDS, "db", b"c")},
        res.ENDPOINT: {"db": EncodedResource.from_bytes(res.ENDPOINT, "db", b"e")},
    })
    stream = connect(tracker, 1, snap, SotwRequest(CDS, version_info="999999999-x"))
    tracker.record(1, stream.receive(SotwRequest(res.ENDPOINT, resource_names=("db",))))  # sent, not ACKed
    record = tracker.records[1]
    assert standing.version_ahead(record)
    assert not standing.excused(record, 7) and not record.synced(7)
