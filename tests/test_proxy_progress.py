"""Proxy progress without polling (issue 11, items 3 and 4).

The tracker's waiters wake on the ACK that satisfies them (driven here by real `SotwStream`s
fed requests, as the server feeds them); a NACK is "not fenced" and carries Envoy's error; the
leader's `await_proxies` waits on its own proxies and on other nodes' long-polled
`GET /v1/proxies/progress` answers, and reports unreachable nodes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from fakes import FakePlane, eventually

from repstage_mesh.api.app import build_app
from repstage_mesh.api.progress import PeerProgress
from repstage_mesh.failover.proxies import Progress, await_proxies, local_progress
from repstage_mesh.xds import relay
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot
from repstage_mesh.xds.protocol import NodeInfo, Send, SotwRequest, SotwStream
from repstage_mesh.xds.tracker import ProxyTracker


def snapshot(index: int, salt: str) -> Snapshot:
    cluster = EncodedResource.from_bytes(res.CLUSTER, "db", f"cluster-{salt}".encode(), ())
    return Snapshot(str(index), {res.CLUSTER: {"db": cluster}})


class Proxy:
    """One Envoy on one SotW stream, driven through the protocol into the tracker."""

    def __init__(self, tracker: ProxyTracker, stream_id: int, snap: Snapshot) -> None:
        self.tracker = tracker
        self.stream_id = stream_id
        self.stream = SotwStream(snap)
        self.sent: Send | None = None
        self.record = tracker.connect(stream_id, NodeInfo(f"envoy-{stream_id}"), self.stream)
        self._feed(self.stream.receive(SotwRequest(res.CLUSTER, node=NodeInfo(f"envoy-{stream_id}"))))

    def _feed(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent = action
        self.tracker.record(self.stream_id, actions)

    def push(self, snap: Snapshot) -> None:
        self._feed(self.stream.update(snap))

    def ack(self) -> None:
        assert self.sent is not None
        self._feed(self.stream.receive(SotwRequest(res.CLUSTER, self.sent.version, self.sent.nonce)))

    def nack(self, error: str) -> None:
        assert self.sent is not None
        self._feed(self.stream.receive(SotwRequest(res.CLUSTER, "", self.sent.nonce, error=error)))


def test_waiter_wakes_on_the_ack_that_satisfies_it() -> None:
    tracker = ProxyTracker()
    one, two = Proxy(tracker, 1, snapshot(5, "a")), Proxy(tracker, 2, snapshot(5, "a"))
    one.ack()
    two.ack()
    assert tracker.low_water() == 5
    woken: list[int] = []
    waiter = tracker.wait_for(7, on_done=lambda: woken.append(1))
    assert not waiter.done and sorted(waiter.behind) == ["envoy-1#1", "envoy-2#2"]
    one.push(snapshot(7, "b"))
    two.push(snapshot(7, "b"))
    one.ack()
    assert woken == [] and list(waiter.behind) == ["envoy-2#2"] and list(waiter.reached) == ["envoy-1#1"]
    two.ack()
    assert woken == [1] and waiter.done and len(tracker.waiters) == 0
    assert tracker.low_water() == 7


def test_a_waiter_with_nobody_behind_is_done_at_once_and_a_disconnect_releases_it() -> None:
    tracker = ProxyTracker()
    assert tracker.wait_for(3).done  # nobody connected
    proxy = Proxy(tracker, 1, snapshot(3, "a"))
    waiter = tracker.wait_for(3)
    assert not waiter.done  # the first response is in flight
    tracker.disconnect(1)
    assert waiter.done and waiter.reached == {}
    assert proxy.record.synced_index == -1


def test_a_gate_is_waited_for_like_a_proxy_but_never_counted_as_one() -> None:
    """An xDS worker (relay.WorkerGate): until it holds the index, a stream it opened may not be
    known to the node yet; the wait does not end on the proxies the node knows."""
    tracker = ProxyTracker()
    gate = relay.WorkerGate("xds-worker-0")
    gate.synced_index = 5
    tracker.gate_changed(gate)
    assert tracker.wait_for(5).done  # it holds 5
    woken: list[int] = []
    waiter = tracker.wait_for(7, on_done=lambda: woken.append(1))
    assert not waiter.done  # nobody connected, but the worker has not taken 7
    [lag] = waiter.lagging()
    assert (lag.proxy, lag.state, lag.synced_index) == ("xds-worker-0", "pending", 5)
    proxy = Proxy(tracker, 1, snapshot(7, "a"))  # its connect comes with the worker's facts
    gate.synced_index = 7
    tracker.gate_changed(gate)  # ... and the worker's `holds` after them
    assert not waiter.done and list(waiter.behind) == ["envoy-1#1"]
    proxy.ack()
    assert woken == [1] and list(waiter.reached) == ["envoy-1#1"]  # the gate is not a proxy
    assert [r["node_id"] for r in tracker.to_list()] == ["envoy-1"]

    late = tracker.wait_for(9)
    gate.connected = False  # the worker is gone (its streams are marked gone too)
    tracker.gate_changed(gate)
    tracker.disconnect(1)
    assert late.done and tracker.gates == {} and late.reached == {}


def test_a_nack_is_not_fenced_and_carries_envoys_error() -> None:
    tracker = ProxyTracker()
    proxy = Proxy(tracker, 1, snapshot(5, "a"))
    proxy.ack()
    waiter = tracker.wait_for(6)
    proxy.push(snapshot(6, "fence"))
    proxy.nack("duplicate listener port")
    assert not waiter.done
    assert not proxy.record.synced(6) and proxy.record.synced_index == 5
    [lag] = waiter.lagging()
    assert (lag.proxy, lag.state, lag.synced_index) == ("envoy-1#1", "nacked", 5)
    assert "duplicate listener port" in lag.error
    view = tracker.to_list()[0]
    assert view["synced"] is False and view["types"]["cds"]["sync"] == "nacked"
    # newer content it accepts moves it on
    proxy.push(snapshot(7, "fixed"))
    proxy.ack()
    assert waiter.done and proxy.record.synced_index == 7


async def test_local_progress_answers_when_satisfied_or_at_the_deadline() -> None:
    tracker = ProxyTracker()
    proxy = Proxy(tracker, 1, snapshot(5, "a"))
    proxy.ack()
    proxy.push(snapshot(6, "b"))
    waiting = asyncio.ensure_future(local_progress(tracker, "cp-1", 6, wait=30.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    proxy.ack()
    answer = await asyncio.wait_for(waiting, 5.0)
    assert answer.satisfied and list(answer.acked_ago) == ["envoy-1#1"] and answer.behind == []
    late = await local_progress(tracker, "cp-1", 9, wait=0.05)
    assert not late.satisfied and [b.proxy for b in late.behind] == ["envoy-1#1"]
    assert late.low_water == 6 and len(tracker.waiters) == 0


class TrackerPlane(FakePlane):
    """The in-memory plane with a real tracker behind /v1/proxies/progress."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.tracker = ProxyTracker(control_plane=node_id)

    async def proxy_progress(self, min_index: int, wait: float) -> Progress:
        return await local_progress(self.tracker, self.node_id, min_index, wait)


@pytest.fixture
async def peer() -> AsyncIterator[tuple[TrackerPlane, TestClient[Any, Any]]]:
    plane = TrackerPlane("cp-2")
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(plane)))
    await client.start_server()
    try:
        yield plane, client
    finally:
        await client.close()


async def test_progress_endpoint_refuses_bad_input_naming_the_field(peer: Any) -> None:
    _, client = peer
    for query, field in (("", "min_index"), ("?min_index=x", "min_index"), ("?min_index=-1", "min_index"),
                         ("?min_index=1&wait=601", "wait"), ("?min_index=1&wait=nan", "wait"),
                         ("?min_index=1&since=2", "since")):
        resp = await client.get(f"/v1/proxies/progress{query}")
        assert resp.status == 400, query
        assert (await resp.json())["error"]["field"] == field, query


async def test_leader_waits_on_its_own_and_a_peers_proxies_then_reports_nacks_and_unreachable(peer: Any) -> None:
    plane, client = peer
    here = ProxyTracker(control_plane="cp-1")
    mine = Proxy(here, 1, snapshot(5, "a"))
    theirs = Proxy(plane.tracker, 1, snapshot(5, "a"))
    mine.ack()
    theirs.ack()
    api = f"{client.server.host}:{client.server.port}"
    remote = PeerProgress("cp-2", api, None)
    wait = asyncio.ensure_future(await_proxies(here, "cp-1", [remote], 6, timeout=30.0))
    for proxy in (mine, theirs):
        proxy.push(snapshot(6, "fence"))
    mine.ack()
    await eventually(lambda: len(plane.tracker.waiters) == 1, "the peer holds the long-poll open")
    assert not wait.done()
    theirs.ack()  # the peer's ACK answers the long-poll
    acks = await asyncio.wait_for(wait, 10.0)
    assert sorted(acks.acked) == ["cp-2/envoy-1#1", "envoy-1#1"] and acks.missed == ()
    assert all(abs(t - time.monotonic()) < 10.0 for t in acks.acked.values())

    # A NACK on the peer and a node that does not answer: both reported when the deadline comes.
    theirs.push(snapshot(7, "fence2"))
    theirs.nack("route: unknown cluster")
    mine.push(snapshot(7, "fence2"))
    mine.ack()
    dead = PeerProgress("cp-3", "127.0.0.1:9", None)  # discard port: connection refused
    acks = await await_proxies(here, "cp-1", [remote, dead], 7, timeout=0.6)
    assert acks.missed == ("cp-2/envoy-1#1", "cp-3:unreachable")
    assert "unknown cluster" in acks.nacked["cp-2/envoy-1#1"]
    assert acks.unreachable == ("cp-3",)


def test_after_a_nack_a_return_to_the_accepted_content_counts_as_synced() -> None:
    tracker = ProxyTracker()
    proxy = Proxy(tracker, 1, snapshot(5, "a"))
    proxy.ack()
    proxy.push(snapshot(6, "bad"))
    proxy.nack("rejected")
    assert proxy.record.synced_index == 5
    proxy.push(snapshot(7, "a"))  # the content it holds: nothing to send
    assert proxy.sent is not None and proxy.record.synced(7)
    assert proxy.record.synced_index == 7 and tracker.wait_for(7).done
