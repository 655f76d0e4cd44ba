"""The node <-> xDS worker messages (xds/relay.py, issue 17 item 1), sans-IO: the frame codec,
the snapshot sent as encoded bytes, and the facts a worker's tracker batches per event-loop
pass, replayed into the node's tracker so that it sees every proxy as the worker does."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repstage_mesh.xds import relay
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot
from repstage_mesh.xds.limits import XdsLimits
from repstage_mesh.xds.protocol import (
    DeltaRequest,
    DeltaStream,
    NodeInfo,
    Send,
    SotwRequest,
    SotwStream,
)
from repstage_mesh.xds.tracker import ProxyTracker
from repstage_mesh.xds.workers import STREAM_ID_STRIDE, worker_limits

# --- frames ------------------------------------------------------------------------------------

messages = st.lists(
    st.tuples(st.sampled_from(["facts", "snapshot", "tick"]), st.binary(max_size=300), st.integers()),
    min_size=1, max_size=6,
)


@given(messages, st.lists(st.integers(min_value=1, max_value=64), max_size=40))
def test_frames_come_out_whole_and_in_order_however_the_bytes_are_cut(sent: list[Any], cuts: list[int]) -> None:
    data = b"".join(relay.encode(m) for m in sent)
    decoder, got, at = relay.FrameDecoder(), [], 0
    for size in cuts:
        got += decoder.feed(data[at:at + size])
        at += size
    got += decoder.feed(data[at:])
    assert got == sent and decoder.buffered == 0


def test_a_frame_that_is_not_ours_closes_the_pipe() -> None:
    with pytest.raises(relay.FrameError):
        relay.FrameDecoder().feed((relay.MAX_FRAME + 1).to_bytes(4, "big"))
    not_a_message = pickle.dumps([1, 2])
    with pytest.raises(relay.FrameError):
        relay.FrameDecoder().feed(len(not_a_message).to_bytes(4, "big") + not_a_message)


def test_a_half_frame_waits_for_the_rest() -> None:
    data = relay.encode(("tick",))
    decoder = relay.FrameDecoder()
    assert decoder.feed(data[:5]) == [] and decoder.buffered == 5
    assert decoder.feed(data[5:]) == [("tick",)]


# --- snapshots ---------------------------------------------------------------------------------


def snapshot(index: int, salt: str, ttl: float | None = None) -> Snapshot:
    cluster = EncodedResource.from_bytes(res.CLUSTER, "db", f"cluster-{salt}".encode(), (), ttl)
    endpoint = EncodedResource.from_bytes(res.ENDPOINT, "db", f"endpoints-{salt}".encode())
    return Snapshot(str(index), {res.CLUSTER: {"db": cluster}, res.ENDPOINT: {"db": endpoint}})


def test_a_worker_s_snapshot_is_the_node_s_bytes_not_encoded_again() -> None:
    snap = snapshot(7, "x", ttl=3.0)
    (message,) = relay.FrameDecoder().feed(relay.encode(("snapshot", "", relay.snapshot_wire(snap), 1)))
    copy = relay.snapshot_from_wire(message[2])
    assert copy.version == snap.version and copy.order == snap.order
    assert copy.resources == snap.resources
    for type_url in (res.CLUSTER, res.ENDPOINT):
        mine, theirs = snap.selection(type_url, None), copy.selection(type_url, None)
        assert (mine.digest, mine.version) == (theirs.digest, theirs.version)
        assert snap.sotw_body(type_url, mine.items, mine.version) == copy.sotw_body(type_url, theirs.items, theirs.version)


contents = st.dictionaries(
    st.sampled_from([res.CLUSTER, res.ENDPOINT, res.LISTENER]),
    st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(["1", "2", "3"]), max_size=4),
    max_size=3,
)


def built(index: int, content: dict[str, dict[str, str]], before: Snapshot | None) -> Snapshot:
    """A snapshot as the node's encoder builds it: an unchanged resource is the same object."""
    resources: dict[str, dict[str, EncodedResource]] = {}
    for type_url, by_name in content.items():
        resources[type_url] = {}
        for name, value in by_name.items():
            old = before.resources.get(type_url, {}).get(name) if before is not None else None
            data = f"{name}={value}".encode()
            fresh = EncodedResource.from_bytes(type_url, name, data)
            # Sometimes the same content comes back as a new object (a re-rendered resource).
            resources[type_url][name] = old if old is not None and old.digest == fresh.digest and index % 2 else fresh
    return Snapshot(str(index), resources)


@settings(max_examples=200, deadline=None)
@given(st.lists(contents, min_size=1, max_size=8))
def test_a_worker_that_applies_each_change_holds_the_node_s_snapshot(steps: list[dict[str, dict[str, str]]]) -> None:
    node: Snapshot | None = None
    worker: Snapshot | None = None
    for index, content in enumerate(steps, 1):
        snap = built(index, content, node)
        if node is None:
            (message,) = relay.FrameDecoder().feed(relay.encode(("snapshot", "", relay.snapshot_wire(snap), 1)))
            worker = relay.snapshot_from_wire(message[2])
        else:
            delta = relay.snapshot_delta(node, snap)
            (message,) = relay.FrameDecoder().feed(relay.encode(("delta", "", delta, index - 1, index)))
            assert worker is not None
            worker = relay.snapshot_from_delta(worker, message[2])
            changed = sum(len(v) for v in delta[2].values())
            assert changed <= sum(len(v) for v in snap.resources.values())
        node = snap
        assert worker.version == node.version and worker.order == node.order
        assert {t: {n: r.digest for n, r in v.items()} for t, v in worker.resources.items()} == {
            t: {n: r.digest for n, r in v.items()} for t, v in node.resources.items()
        }


def test_a_change_to_one_resource_sends_that_resource_only() -> None:
    first = snapshot(7, "x")
    endpoint = EncodedResource.from_bytes(res.ENDPOINT, "db", b"endpoints-y")
    second = Snapshot("8", {res.CLUSTER: dict(first.resources[res.CLUSTER]), res.ENDPOINT: {"db": endpoint}})
    version, _, changed, removed = relay.snapshot_delta(first, second)
    assert version == "8" and removed == {}
    assert changed == {res.CLUSTER: {}, res.ENDPOINT: {"db": endpoint}}
    third = Snapshot("9", {res.ENDPOINT: {"db": endpoint}})  # the clusters are gone
    _, _, changed, removed = relay.snapshot_delta(second, third)
    assert changed == {res.ENDPOINT: {}} and removed == {}  # a type that is gone is not listed
    assert res.CLUSTER not in relay.snapshot_from_delta(second, relay.snapshot_delta(second, third)).resources


def test_per_node_limits_are_shared_between_workers_per_stream_ones_are_not() -> None:
    limits = XdsLimits(max_streams=1001, admission_rate=2000.0, admission_burst=501)
    share = worker_limits(limits, 2)
    assert (share.max_streams, share.admission_rate, share.admission_burst) == (501, 1000.0, 251)
    assert share.max_streams_per_peer == limits.max_streams_per_peer  # one connection, one worker
    assert share.max_resource_names == limits.max_resource_names


# --- facts -------------------------------------------------------------------------------------


class Worker:
    """A worker's tracker and batcher; `Proxy`s drive streams through it as the server does."""

    def __init__(self, spawn: int = 1) -> None:
        self.passes = 0
        self.batcher = relay.FactBatcher(self._schedule)
        self.tracker = relay.ReportingTracker(self.batcher, control_plane="cp")
        # What an in-process server's tracker would show of the same streams: the node's view
        # of every proxy must be this (the worker's own tracker keeps only what it reads).
        self.reference = ProxyTracker(control_plane="cp")
        self.base = spawn * STREAM_ID_STRIDE

    def _schedule(self) -> None:
        self.passes += 1

    def flush(self) -> bytes:
        """The frame sent at the end of an event-loop pass."""
        facts, guards = self.batcher.drain(self.tracker)
        return relay.encode(("facts", facts, guards))


class Proxy:
    def __init__(self, worker: Worker, n: int, snap: Snapshot, delta: bool = False) -> None:
        self.worker, self.stream_id, self.delta = worker, worker.base + n, delta
        self.stream: SotwStream | DeltaStream = DeltaStream(snap) if delta else SotwStream(snap)
        self.sent: Send | None = None
        node = NodeInfo(f"envoy-{n}")
        worker.tracker.connect(self.stream_id, node, self.stream)
        worker.reference.connect(self.stream_id, node, self.stream)
        if delta:
            self._feed(self.stream.receive(DeltaRequest(res.CLUSTER, subscribe=("*",), node=node)))  # type: ignore[union-attr, arg-type]
        else:
            self._feed(self.stream.receive(SotwRequest(res.CLUSTER, node=node)))  # type: ignore[union-attr, arg-type]

    def _feed(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent = action
        self.worker.tracker.record(self.stream_id, actions)
        self.worker.reference.record(self.stream_id, actions)

    def push(self, snap: Snapshot) -> None:
        self._feed(self.stream.update(snap))

    def answer(self, error: str | None = None) -> None:
        if self.sent is None:
            return
        sent, self.sent = self.sent, None
        if self.delta:
            request: Any = DeltaRequest(res.CLUSTER, response_nonce=sent.nonce, error=error)
        else:
            request = SotwRequest(res.CLUSTER, "" if error else sent.version, sent.nonce, error=error)
        self._feed(self.stream.receive(request))

    def leave(self) -> None:
        self.worker.tracker.disconnect(self.stream_id)
        self.worker.reference.disconnect(self.stream_id)


_TIMES = {"connected_at", "disconnected_at", "sent_at", "acked_at", "nacked_at", "last_ack_latency_seconds"}


def _seen(record: dict[str, Any]) -> dict[str, Any]:
    """What /v1/proxies shows of a proxy, without the times (each process reads its own clock)."""
    out = {k: v for k, v in record.items() if k not in _TIMES and k != "types"}
    out["types"] = {t: {k: v for k, v in s.items() if k not in _TIMES} for t, s in record["types"].items()}
    return out


def test_facts_of_one_pass_go_in_one_frame_and_the_node_sees_what_the_worker_sees() -> None:
    worker, node = Worker(), ProxyTracker(control_plane="cp")
    replay = relay.FactReplay(node)
    decoder = relay.FrameDecoder()
    one, two = Proxy(worker, 1, snapshot(5, "a")), Proxy(worker, 2, snapshot(5, "a"))
    one.answer()
    assert worker.passes == 1  # one schedule per pass, however much happened
    (frame,) = decoder.feed(worker.flush())
    replay.apply(frame[1])
    assert node.low_water() == -1  # two has not ACKed
    assert [_seen(r.to_dict()) for r in node.records.values()] == [
        _seen(worker.reference.records[p.stream_id].to_dict()) for p in (one, two)
    ]
    assert node.records[one.stream_id].synced_index == 5

    woken: list[int] = []
    waiter = node.wait_for(6, on_done=lambda: woken.append(1))
    for proxy in (one, two):
        proxy.push(snapshot(6, "b"))
    replay.apply(decoder.feed(worker.flush())[0][1])
    assert not woken and sorted(b.proxy for b in waiter.lagging()) == [f"envoy-1#{one.stream_id}", f"envoy-2#{two.stream_id}"]
    one.answer()
    two.answer(error="bad cluster")
    replay.apply(decoder.feed(worker.flush())[0][1])
    assert worker.passes == 3
    assert not woken and [b.state for b in waiter.lagging()] == ["nacked"]
    assert node.records[two.stream_id].lag() == ("nacked", "cds: bad cluster")
    two.leave()  # a proxy that is gone is not waited for
    replay.apply(decoder.feed(worker.flush())[0][1])
    assert woken == [1] and not node.records[two.stream_id].connected


def test_a_dead_worker_s_streams_are_disconnected_and_not_waited_for() -> None:
    worker, node = Worker(), ProxyTracker(control_plane="cp")
    replay = relay.FactReplay(node)
    proxies = [Proxy(worker, n, snapshot(5, "a")) for n in range(3)]
    replay.apply(relay.FrameDecoder().feed(worker.flush())[0][1])
    waiter = node.wait_for(5)
    assert len(waiter.lagging()) == 3
    assert replay.lost() == 3
    assert waiter.done and node.connected() == []
    assert all(node.records[p.stream_id].disconnected_at is not None for p in proxies)
    assert replay.lost() == 0


def test_limits_hit_and_refusals_in_a_worker_reach_the_node() -> None:
    worker = Worker()
    worker.batcher.on_limit("admission")
    worker.batcher.on_refusal("plaintext_peer")
    assert worker.passes == 1
    (frame,) = relay.FrameDecoder().feed(worker.flush())
    assert frame == ("facts", [], [("limit", "admission"), ("refusal", "plaintext_peer")])


ops = st.lists(st.tuples(st.sampled_from(["push", "ack", "nack", "flush", "leave"]), st.integers(0, 3)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_after_every_pass_the_node_s_view_is_the_worker_s(steps: list[tuple[str, int]]) -> None:
    worker, node = Worker(spawn=3), ProxyTracker(control_plane="cp")
    replay, decoder = relay.FactReplay(node), relay.FrameDecoder()
    version = 5
    proxies = [Proxy(worker, n, snapshot(version, "0"), delta=n % 2 == 1) for n in range(4)]
    for op, n in steps:
        proxy = proxies[n]
        if op == "push":
            version += 1
            for p in proxies:
                p.push(snapshot(version, str(version)))
        elif op == "ack":
            proxy.answer()
        elif op == "nack":
            proxy.answer(error="no")
        elif op == "leave":
            proxy.leave()
        else:
            for message in decoder.feed(worker.flush()):
                replay.apply(message[1])
            for p in proxies:
                mine, theirs = node.records[p.stream_id], worker.reference.records.get(p.stream_id)
                if theirs is None or not theirs.connected:
                    assert not mine.connected
                    continue
                assert _seen(mine.to_dict()) == _seen(theirs.to_dict())
                assert (mine.synced_index, mine.synced(), mine.excused(version)) == (
                    theirs.synced_index, theirs.synced(), theirs.excused(version))


def test_a_worker_freezes_its_streams_once_their_count_settles() -> None:
    policy = relay.GcPolicy(churn=0.1, floor=100, quiet=1.0)
    policy.changed(0.0, 5000)  # a connect storm
    assert not policy.due(0.5, 5000)  # still moving
    assert policy.due(1.5, 5000) == "full"  # settled: collect and freeze once
    assert not policy.due(2.5, 5000)  # nothing moved since
    policy.changed(3.0, 300)  # a few reconnects: under a tenth of the streams
    assert not policy.due(5.0, 5000)
    policy.changed(6.0, 300)  # 600 in all: collect the closed ones' garbage, freeze again
    assert not policy.due(6.5, 5000) and policy.due(7.0, 5000) == "full"
    few = relay.GcPolicy(floor=100)
    few.changed(0.0, 20)  # a handful of streams is not worth a collection
    assert not few.due(10.0, 20)


def test_a_worker_freezes_what_a_push_left_once_the_push_is_over() -> None:
    policy = relay.GcPolicy(quiet=1.0, settle=0.4, full_every=300.0)
    policy.changed(0.0, 5000)
    assert policy.due(1.0, 5000) == "full"
    policy.active(10.0)  # a push and its ACKs
    policy.active(10.6)
    assert policy.due(10.8, 5000) is None  # still going
    assert policy.due(11.0, 5000) == "young"  # over: the push's survivors are frozen
    assert policy.due(11.5, 5000) is None  # nothing happened since
    policy.active(400.0)  # long after the last full collection: the cyclic garbage goes too
    assert policy.due(401.0, 5000) == "full"
    assert policy.due(402.0, 5000) is None


def test_the_batcher_counts_streams_opened_and_closed() -> None:
    worker = Worker()
    proxies = [Proxy(worker, n, snapshot(5, "a")) for n in range(3)]
    proxies[0].leave()
    assert worker.batcher.churn == 4


@pytest.mark.parametrize(
    ("silent", "state", "gone"),
    [
        (1.0, "T", False),  # not silent long enough, whatever the state
        (3.5, "T", True),  # stopped (SIGSTOP, a paused container): its Envoys must move
        (3.5, "", True),  # cannot tell: as before, leave
        (3.5, "Z", True),
        (3.5, "R", False),  # running: busy (a reconnect storm), not frozen
        (3.5, "S", False),
        (29.0, "D", False),
        (30.0, "S", True),  # a loop wedged for 10 x node_silence
    ],
)
def test_a_worker_leaves_a_stopped_node_and_waits_for_a_busy_one(silent: float, state: str, gone: bool) -> None:
    assert relay.peer_is_gone(silent, 3.0, state) is gone
