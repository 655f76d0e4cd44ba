"""Node, the composition root: a real single node (Raft journal under tmp_path, xDS and the REST
API on loopback) and a node forwarding to a fake leader's API.

A single node elects itself (pysyncobj: follower -> candidate -> leader, within about 0.7 s),
seeds the config file's services, announces itself, becomes ready, and its leader engine
activates on those events. Every node a test builds is stopped, even when the test fails.
"""

from __future__ import annotations

import asyncio
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fakes import eventually, orders_spec

from repstage_mesh.api.peers import FORWARDED_HEADER, ApiNoAnswer
from repstage_mesh.api.plane import Caller
from repstage_mesh.config import load_config
from repstage_mesh.core.errors import (
    ApiRequestError,
    ApiUnreachable,
    CommitTimeout,
    DecisionRefused,
    NoLeaderKnown,
    NoQuorum,
    NotLeader,
    NotReady,
    SwitchoverRunning,
    SwitchoverUnknown,
)
from repstage_mesh.core.models import (
    Announcement,
    AnnounceNode,
    FailoverEntry,
    MeshState,
    NodeAddress,
    PutService,
)
from repstage_mesh.core.state import apply
from repstage_mesh.node import SNAPSHOT_GROUP, Node
from repstage_mesh.xds import resources as res

DEADLINE = 10.0  # a single node is elected within ~0.7 s; slack for a loaded machine
WRITER_TOKEN = "writer-token"

ORDERS = """
services:
  - name: orders
    protocol: tcp
    listen_port: 15000
    members:
      - {name: a, address: 127.0.0.1, port: 9001}
      - {name: b, address: 127.0.0.1, port: 9002}
    primary: a
"""



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_otel_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing reads OTEL_* from the environment: keep a developer's exporter out of the tests."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")


NodeFactory = Callable[..., Node]


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Builds Nodes from a config file under tmp_path; stops every one of them at teardown."""
    nodes: list[Node] = []

    def make(name: str = "cp-1", services: str = "") -> Node:
        text = textwrap.dedent(f"""
            node: {{id: {name}, data_dir: "{tmp_path / name / 'data'}"}}
            xds: {{listen: "127.0.0.1:{free_port()}"}}
            api:
              listen: "127.0.0.1:{free_port()}"
              tokens: {{read_write: [{WRITER_TOKEN}]}}
            """) + textwrap.dedent(services)
        path = tmp_path / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        node = Node(load_config(path, env={}))
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        for node in nodes:
            await node.stop()


async def started(node: Node) -> Node:
    await node.start()
    await eventually(node.ready, "the node is ready")
    await eventually(lambda: node.engine.active, "the leader engine activates")
    return node


# --- a real single node -------------------------------------------------------------------------


async def test_single_node_leads_and_engine_activates(make_node: NodeFactory) -> None:
    node = await started(make_node(services=ORDERS))
    assert node.store is not None and node.store.is_leader()
    assert node._leader_api() is None  # this node leads
    state = node.state()
    assert state.service("orders") is not None  # seeded from the config file
    me = state.nodes["cp-1"]
    assert me.api == f"127.0.0.1:{node.api_port}" and me.xds == f"127.0.0.1:{node.xds_port}"
    # the engine's runner holds the applied state
    assert node.runner.decider.state.service("orders") is not None
    follow = node.engine._follow
    assert follow is not None and not follow.done()


async def test_announce_runs_a_recorded_plan_and_a_retry_with_its_key_changes_nothing(
    make_node: NodeFactory,
) -> None:
    """Issue 14 item 1 on a real node: the announce is a failover record in the replicated
    history (fence before route), and the same idempotency key answers the first change."""
    node = await started(make_node(services=ORDERS))
    first = await node.announce("orders", Announcement(member="b", token=7, key="k-1", cause="patroni"))
    record = first["failover"]
    assert (first["primary"], first["previous_primary"], first["changed"], first["replayed"]) == ("b", "a", True, False)
    names = [e["name"] for e in record["timeline"]]
    assert names.index("fenced") < names.index("proxies_fenced") < names.index("connections_closed") < names.index("committed")
    assert record["status"] == "done" and record["kind"] == "announce" and record["claim"] == 7
    await eventually(lambda: (e := node.state().failover(record["id"])) is not None and e.record["status"] == "done",
                     "the finished record is in the replicated history")
    index = node.state().services["orders"].epoch
    again = await node.announce("orders", Announcement(member="b", token=7, key="k-1", cause="patroni"))
    assert again["replayed"] is True and again["failover"]["id"] == record["id"]
    assert node.state().services["orders"].epoch == index  # nothing applied twice
    with pytest.raises(DecisionRefused) as caught:  # the key, reused for another change
        await node.announce("orders", Announcement(member="a", token=8, key="k-1"))
    assert caught.value.field == "idempotency_key"
    _, history = await node.failovers()
    assert [r["id"] for r in history] == [record["id"]]


async def test_submit_is_applied_and_rendered_into_the_xds_cache(make_node: NodeFactory) -> None:
    node = await started(make_node())
    await eventually(lambda: node.cache.get(SNAPSHOT_GROUP) is not None, "a first snapshot")
    before = node.cache.get(SNAPSHOT_GROUP)
    assert before is not None

    spec = orders_spec(name="payments", listen_port=15020, read_port=15021)
    outcome = await node.submit(PutService(spec=spec), timeout=5.0)
    assert outcome.ok
    assert node.state().service("payments") is not None

    def rendered() -> bool:
        snap = node.cache.get(SNAPSHOT_GROUP)
        return snap is not None and snap.index > before.index

    await eventually(rendered, "the new state is rendered into the cache")
    snap = node.cache.get(SNAPSHOT_GROUP)
    assert snap is not None and snap.index == node.state().last_change
    assert "payments-primary" in snap.get(res.CLUSTER)
    assert "payments-primary-listener" in snap.get(res.LISTENER)
    # the engine (hence the decider) saw the applied state too
    assert node.runner.decider.state.service("payments") is not None


async def test_leader_answers_failovers_switchovers_and_proxy_waits_itself(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await started(make_node(services=ORDERS))

    async def no_forwarding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a leader must not call another node: {args}")

    monkeypatch.setattr(node._forwarder.peers, "call", no_forwarding)

    # the decider refuses: follow mode, unknown service, unknown member
    with pytest.raises(DecisionRefused) as refused:
        await node.switchover("orders", "b", None)
    assert (refused.value.code, refused.value.field) == ("invalid", "service")
    assert "follow mode" in str(refused.value)
    with pytest.raises(DecisionRefused) as refused:
        await node.switchover("nope", "b", None)
    assert (refused.value.code, refused.value.field) == ("not_found", "service")
    with pytest.raises(DecisionRefused) as refused:
        await node.switchover("orders", "zz", None)
    assert (refused.value.code, refused.value.field) == ("not_found", "to")

    # nothing ran, and the single node answers for its own history
    assert await node.failovers() == ("cp-1", [])
    assert await node.failover("no-such-record") is None

    # no proxies connected and no other node: nothing to wait for
    started_at = time.monotonic()
    acks = await node.await_proxies(node.state().last_change, timeout=5.0)
    assert time.monotonic() - started_at < 1.0
    assert acks.missed == () and dict(acks.acked) == {}


# --- leader lookup, with a fake store (no Raft) ------------------------------------------------


class FakeStore:
    """What `_leader_api` and `switchover` read of the replicated store."""

    def __init__(self, leader: bool, leader_address: str | None, state: MeshState | None = None) -> None:
        self.leader_flag = leader
        self.leader_address = leader_address
        self.state = state if state is not None else MeshState()
        self.closed = False

    def is_leader(self) -> bool:
        return self.leader_flag

    def leader(self) -> str | None:
        return self.leader_address

    def close(self) -> None:  # Node.stop closes its store
        self.closed = True


def with_peer(node_id: str, raft: str, api: str) -> MeshState:
    state, outcome = apply(MeshState(), AnnounceNode(node=NodeAddress(node_id=node_id, raft=raft, api=api)), 1)
    assert outcome.ok
    return state


async def test_leader_api_raises_no_leader_known(make_node: NodeFactory) -> None:
    node = make_node()
    node.store = FakeStore(leader=False, leader_address=None)  # type: ignore[assignment]
    with pytest.raises(NoLeaderKnown):
        node._leader_api()
    with pytest.raises(NoLeaderKnown):
        await node.switchover("orders", "b", None)
    # failovers() answers from this node when it cannot reach a leader
    assert await node.failovers() == ("cp-1", [])

    # a leader is known to Raft, but no announced node has that Raft address
    node.store = FakeStore(False, "127.0.0.1:7009", with_peer("cp-2", "127.0.0.1:7002", "127.0.0.1:1"))  # type: ignore[assignment]
    with pytest.raises(NoLeaderKnown):
        node._leader_api()

    # the announced node whose Raft address is the leader's: its API
    node.store = FakeStore(False, "127.0.0.1:7002", with_peer("cp-2", "127.0.0.1:7002", "127.0.0.1:8002"))  # type: ignore[assignment]
    assert node._leader_api() == "127.0.0.1:8002"


async def test_leader_not_yet_deciding_raises_not_ready(make_node: NodeFactory) -> None:
    node = make_node()
    node.store = FakeStore(leader=True, leader_address="local:cp-1")  # type: ignore[assignment]
    assert node._leader_api() is None
    assert not node.engine.active
    with pytest.raises(NotReady):
        await node.switchover("orders", "b", None)


# --- forwarding to a fake leader -----------------------------------------------------------------


SWITCHOVER_FAILED = {
    "error": {"code": "switchover_failed", "message": "m", "field": None, "details": [{"id": "r1"}]}
}


class FakeLeader:
    """The leader's REST API, in so far as a follower calls it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any, str | None]] = []
        self.forwarded_by: list[str | None] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/services/{service}/switchover", self.switchover)
        self.app.router.add_get("/v1/failovers", self.failovers)
        self.app.router.add_get("/v1/failovers/{id}", self.failover)
        self.app.router.add_post("/v1/services/{service}/primary", self.announce)
        self.address = ""
        self.traceparents: list[str | None] = []

    async def _record(self, request: web.Request) -> None:
        self.forwarded_by.append(request.headers.get(FORWARDED_HEADER))
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, body, request.headers.get("Authorization")))

    async def switchover(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(SWITCHOVER_FAILED, status=409)

    async def announce(self, request: web.Request) -> web.Response:
        await self._record(request)
        self.traceparents.append(request.headers.get("traceparent"))
        return web.json_response({"service": "x", "primary": "b", "epoch": 9, "previous_primary": "a",
                                  "changed": True, "applied_index": 9, "failover": None})

    async def failovers(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"node_id": "cp-2", "failovers": [{"id": "r1"}]})

    async def failover(self, request: web.Request) -> web.Response:
        await self._record(request)
        if request.match_info["id"] != "r1":
            return web.json_response({"error": {"code": "not_found", "message": "no such record"}}, status=404)
        return web.json_response({"id": "r1", "status": "done"})


@pytest.fixture
async def fake_leader() -> AsyncIterator[FakeLeader]:
    leader = FakeLeader()
    runner = web.AppRunner(leader.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    leader.address = f"{host}:{port}"
    try:
        yield leader
    finally:
        await runner.cleanup()


def follower_of(node: Node, address: str, monkeypatch: pytest.MonkeyPatch) -> Node:
    monkeypatch.setattr(node, "_leader_api", lambda caller=None: address)
    return node


async def test_forwarded_switchover_relays_the_leaders_error(
    make_node: NodeFactory, fake_leader: FakeLeader, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = follower_of(make_node(), fake_leader.address, monkeypatch)
    caller = Caller(authorization="Bearer the-callers-own")
    with pytest.raises(ApiRequestError) as caught:
        await node.switchover("x", "b", 3.0, wait=7.0, caller=caller)
    err = caught.value
    assert (err.status, err.code, err.message, err.field) == (409, "switchover_failed", "m", None)
    assert err.details == [{"id": "r1"}]
    # the caller's own Authorization header, never this node's token; marked as forwarded
    assert fake_leader.requests == [
        ("POST", "/v1/services/x/switchover", {"to": "b", "timeout": 3.0, "wait": 7.0}, "Bearer the-callers-own")
    ]
    assert fake_leader.forwarded_by == ["cp-1"]

    # without a timeout, none is sent; the wait defaults to (and is capped by) api.switchover_wait
    with pytest.raises(ApiRequestError):
        await node.switchover("x", "b", None, wait=10_000.0)
    assert fake_leader.requests[-1][2] == {"to": "b", "wait": node.settings.api.switchover_wait}
    assert fake_leader.requests[-1][3] is None  # no caller's header: none sent


async def test_reads_answer_from_the_local_replica(
    make_node: NodeFactory, fake_leader: FakeLeader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11 item 5: the history is replicated; a follower answers from its own copy."""
    node = follower_of(make_node(), fake_leader.address, monkeypatch)
    entries = tuple(FailoverEntry(id=f"cp-2-{n}", rev=1, record={"id": f"cp-2-{n}", "status": "done"})
                    for n in (1, 2))
    monkeypatch.setattr(node, "state", lambda: MeshState(failovers=entries))
    node_id, records = await node.failovers()
    assert node_id == "cp-1" and [r["id"] for r in records] == ["cp-2-2", "cp-2-1"]  # newest first
    assert await node.failover("cp-2-1") == {"id": "cp-2-1", "status": "done"}
    assert await node.failover("r2") is None
    assert fake_leader.requests == []  # nothing was carried to the leader


async def test_forwarded_announce_carries_key_and_trace(
    make_node: NodeFactory, fake_leader: FakeLeader, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = follower_of(make_node(), fake_leader.address, monkeypatch)
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    caller = Caller(authorization=f"Bearer {WRITER_TOKEN}")  # the caller's own token travels
    answer = await node.announce("x", Announcement(member="b", token=7, cause="patroni", key="k-1", trace=trace), caller)
    assert answer["primary"] == "b"
    method, path, body, auth = fake_leader.requests[-1]
    assert (method, path, auth) == ("POST", "/v1/services/x/primary", f"Bearer {WRITER_TOKEN}")
    assert body == {"member": "b", "cause": "patroni", "fence": True, "epoch": 7, "idempotency_key": "k-1"}
    assert fake_leader.traceparents == [trace["traceparent"]]


async def test_a_forwarded_announce_does_not_wait_for_the_read_barrier(
    make_node: NodeFactory, fake_leader: FakeLeader, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = follower_of(make_node(), fake_leader.address, monkeypatch)
    never = asyncio.Event()

    async def slow_barrier(consistent: bool = False) -> MeshState:
        await never.wait()  # a barrier that has not committed yet
        return MeshState()

    monkeypatch.setattr(node, "read_state", slow_barrier)
    async with asyncio.timeout(5):
        answer = await node.announce("x", Announcement(member="b"))
    assert answer["primary"] == "b" and len(fake_leader.requests) == 1


async def test_a_forwarded_announce_is_unknown_when_the_barrier_fails_first(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as silent:  # listens, never answers: a frozen leader
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        node = follower_of(make_node(), f"127.0.0.1:{silent.getsockname()[1]}", monkeypatch)

        async def lost(consistent: bool = False) -> MeshState:
            await asyncio.sleep(0.05)
            raise NoQuorum("this node reaches 1 of 3 nodes")

        monkeypatch.setattr(node, "read_state", lost)
        started = time.monotonic()
        with pytest.raises(CommitTimeout) as caught:  # 504: it may have reached the leader
            await node.announce("x", Announcement(member="b"))
        assert time.monotonic() - started < 5
        assert not isinstance(caught.value, NoQuorum)


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A loopback port that is bound but not listening: a connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def test_forwarding_to_an_unreachable_leader(
    make_node: NodeFactory, dead_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = follower_of(make_node(), dead_address, monkeypatch)
    with pytest.raises(ApiUnreachable) as caught:
        await node.switchover("x", "b", 3.0)
    assert not isinstance(caught.value, ApiNoAnswer)  # never reached the leader: not started
    # reads fall back to this node's own answers
    assert await node.failovers() == ("cp-1", [])
    assert await node.failover("r1") is None



async def test_forwarded_request_on_a_follower_is_refused_not_forwarded_again(make_node: NodeFactory) -> None:
    node = make_node()
    node.store = FakeStore(False, "127.0.0.1:7002", with_peer("cp-2", "127.0.0.1:7002", "127.0.0.1:8002"))  # type: ignore[assignment]
    forwarded = Caller(forwarded_by="cp-3")
    with pytest.raises(NotLeader) as caught:
        await node.switchover("orders", "b", None, caller=forwarded)
    assert "cp-3" in str(caught.value) and "127.0.0.1:7002" in str(caught.value)
    assert caught.value.leader == "127.0.0.1:7002"
    with pytest.raises(NotLeader):
        await node.announce("orders", Announcement(member="b"), forwarded)
    # the failover history is replicated: every node answers reads from its own copy
    assert await node.failovers(forwarded) == ("cp-1", [])
    assert await node.failover("cp-2-1", forwarded) is None
    # a leader announcing this node's own API (a misconfigured advertise) is not forwarded to
    own = node.settings.api.advertised(node.api_port)
    node.store = FakeStore(False, "127.0.0.1:7002", with_peer("cp-2", "127.0.0.1:7002", own))  # type: ignore[assignment]
    with pytest.raises(NotLeader):
        node._leader_api()


class SlowLeader:
    """A leader that accepts the request and never answers."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_post("/v1/services/{service}/switchover", self.hang)

    async def hang(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3600)  # never answers within the test
        raise AssertionError("unreachable")


async def test_forwarded_switchover_without_an_answer_is_unknown_not_500(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("repstage_mesh.api.forwarding.FORWARD_MARGIN", 0.2)
    runner = web.AppRunner(SlowLeader().app, shutdown_timeout=0.5)  # its handler never ends
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        node = follower_of(make_node(), f"{host}:{port}", monkeypatch)
        with pytest.raises(SwitchoverUnknown) as caught:
            await node.switchover("x", "b", None, wait=0.1)
        assert "GET /v1/failovers" in str(caught.value)
    finally:
        await runner.cleanup()


async def test_a_switchover_still_running_after_the_wait_is_answered_with_its_record(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    node = make_node()
    node.store = FakeStore(leader=True, leader_address="local:cp-1")  # type: ignore[assignment]
    monkeypatch.setattr(node.engine, "active", True)
    waits: list[float | None] = []

    async def running(service: str, to: str, timeout: float | None, wait: float | None = None, **_: Any) -> Any:
        waits.append(wait)
        return SimpleNamespace(id="cp-1-4", status="running", as_dict=lambda: {"id": "cp-1-4", "status": "running"})

    monkeypatch.setattr(node.runner, "switchover", running)
    with pytest.raises(SwitchoverRunning) as caught:
        await node.switchover("orders", "b", None, wait=10_000.0)
    assert caught.value.record == {"id": "cp-1-4", "status": "running"}
    assert "GET /v1/failovers/cp-1-4" in str(caught.value)
    assert waits == [node.settings.api.switchover_wait]  # capped


async def test_config_drift_is_reported_by_cluster_and_logged_at_start(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    node = await started(make_node(services=ORDERS))
    assert node.cluster()["config_drift"] == []
    spec = node.state().service("orders").spec  # type: ignore[union-attr]
    outcome = await node.submit(PutService(spec=spec.model_copy(update={"listen_port": 15100})))
    assert outcome.ok
    assert node.cluster()["config_drift"] == [{"service": "orders", "kind": "changed", "fields": ["listen_port"]}]
    await node.stop()

    caplog.set_level("WARNING", logger="repstage_mesh.node")
    again = await started(make_node(services=ORDERS))  # the same file and data directory
    assert again.state().service("orders").spec.listen_port == 15100  # type: ignore[union-attr]
    drift_lines = [r.getMessage() for r in caplog.records if "config drift" in r.getMessage()]
    assert drift_lines and "service orders" in drift_lines[0] and "listen_port" in drift_lines[0]


# --- a bind that fails after the pre-checks (a race) ----------------------------------------------


@pytest.mark.parametrize("field", ["xds.listen", "api.listen"])
async def test_a_taken_port_at_start_names_its_field_and_stops_what_started(
    make_node: NodeFactory, field: str
) -> None:
    from repstage_mesh.cli.serve import start_node
    from repstage_mesh.core.errors import ListenError

    node = make_node()
    host, port = node.settings.host_port(field)
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind((host, port))
        other.listen()
        with pytest.raises(ListenError) as raised:
            await start_node(node.settings)
    assert raised.value.field == field and f"{host}:{port}" in str(raised.value)
    # Raft was stopped: its data directory is free for the next try
    await started(make_node())  # the same data directory, other ports


async def test_a_fence_port_moved_onto_a_replicated_service_is_logged_at_start(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from repstage_mesh.cli.serve import start_node

    first = await started(make_node(services=ORDERS))  # orders listens on 15000
    await first.stop()
    moved = make_node(services="envoy: {fence_port: 15000}\n")  # the file no longer lists orders
    caplog.set_level("ERROR", logger="repstage_mesh.node")
    node = await start_node(moved.settings)
    expected = "envoy.fence_port: port 15000 is also the listen_port of the replicated service 'orders'"
    try:
        await eventually(lambda: any(r.getMessage().startswith(expected) for r in caplog.records),
                         "the conflict is logged")
        await eventually(node.ready, "the node is ready")
        assert sum(r.getMessage().startswith(expected) for r in caplog.records) == 1  # once
    finally:
        await node.stop()


async def test_a_held_http_route_is_rendered_until_the_committed_deadline_then_dropped_by_the_nodes_clock(
    make_node: NodeFactory,
) -> None:
    """Issue 16 item 5: no commit ends the hold here (as when its leader died): the node renders
    the 503 route while `hold_until` is ahead and re-renders without it when it passes."""

    from repstage_mesh.core.models import HoldEntry, StartHold, UpdateHold

    node = await started(make_node())
    spec = orders_spec(name="web", protocol="http", listen_port=15030, read_port=None)
    assert (await node.submit(PutService(spec=spec), timeout=5.0)).ok

    def routes() -> bytes | None:
        snap = node.cache.get(SNAPSHOT_GROUP)
        found = snap.get(res.ROUTE).get("web-primary-routes") if snap is not None else None
        return found.digest if found is not None else None

    await eventually(lambda: routes() is not None, "the web routes rendered")
    free = routes()
    assert (await node.submit(StartHold(entry=HoldEntry(id="p1", services=("web",), window_ms=500)), timeout=5.0)).ok
    until = time.time() + 0.5
    assert (await node.submit(UpdateHold(id="p1", status="holding", hold_until=until), timeout=5.0)).ok
    await eventually(lambda: routes() != free, "the hold route rendered")
    assert time.time() < until
    await eventually(lambda: routes() == free, "the hold dropped at the deadline", timeout=5.0)
    assert time.time() >= until and node.state().hold("p1").status == "holding"  # type: ignore[union-attr]
