"""Node, the composition root: a real single node (Raft journal under tmp_path, xDS and the REST
API on loopback) and a node forwarding to a fake leader's API.

A single node elects itself (pysyncobj: follower -> candidate -> leader, within about 0.7 s),
seeds the config file's services, announces itself, becomes ready, and its leader engine
activates on those events. Every node a test builds is stopped, even when the test fails.
"""

from __future__ import annotations

import socket
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fakes import eventually, orders_spec

from repstage_mesh.config import load_config
from repstage_mesh.core.errors import (
    ApiRequestError,
    ApiUnreachable,
    DecisionRefused,
    NoLeaderKnown,
    NotReady,
)
from repstage_mesh.core.models import AnnounceNode, MeshState, NodeAddress, PutService
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

    monkeypatch.setattr(node._peers, "call", no_forwarding)

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
        self.app = web.Application()
        self.app.router.add_post("/v1/services/{service}/switchover", self.switchover)
        self.app.router.add_get("/v1/failovers", self.failovers)
        self.app.router.add_get("/v1/failovers/{id}", self.failover)
        self.address = ""

    async def _record(self, request: web.Request) -> None:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, body, request.headers.get("Authorization")))

    async def switchover(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(SWITCHOVER_FAILED, status=409)

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
    monkeypatch.setattr(node, "_leader_api", lambda: address)
    return node


async def test_forwarded_switchover_relays_the_leaders_error(
    make_node: NodeFactory, fake_leader: FakeLeader, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = follower_of(make_node(), fake_leader.address, monkeypatch)
    with pytest.raises(ApiRequestError) as caught:
        await node.switchover("x", "b", 3.0)
    err = caught.value
    assert (err.status, err.code, err.message, err.field) == (409, "switchover_failed", "m", None)
    assert err.details == [{"id": "r1"}]
    assert fake_leader.requests == [
        ("POST", "/v1/services/x/switchover", {"to": "b", "timeout": 3.0}, f"Bearer {WRITER_TOKEN}")
    ]

    # without a timeout, none is sent
    with pytest.raises(ApiRequestError):
        await node.switchover("x", "b", None)
    assert fake_leader.requests[-1][2] == {"to": "b"}


async def test_forwarded_reads_answer_from_the_leader(
    make_node: NodeFactory, fake_leader: FakeLeader, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = follower_of(make_node(), fake_leader.address, monkeypatch)
    assert await node.failovers() == ("cp-2", [{"id": "r1"}])
    assert await node.failover("r1") == {"id": "r1", "status": "done"}
    assert await node.failover("r2") is None  # the leader's 404
    assert [r[:2] for r in fake_leader.requests] == [
        ("GET", "/v1/failovers"), ("GET", "/v1/failovers/r1"), ("GET", "/v1/failovers/r2"),
    ]


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
    with pytest.raises(ApiUnreachable):
        await node.switchover("x", "b", 3.0)
    # reads fall back to this node's own answers
    assert await node.failovers() == ("cp-1", [])
    assert await node.failover("r1") is None



# --- a bind that fails after the pre-checks (a race) ----------------------------------------------


@pytest.mark.parametrize("field", ["xds.listen", "api.listen"])
async def test_a_taken_port_at_start_names_its_field_and_stops_what_started(
    make_node: NodeFactory, field: str
) -> None:
    from repstage_mesh.core.errors import ListenError

    node = make_node()
    host, port = node.settings.host_port(field)
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind((host, port))
        other.listen()
        with pytest.raises(ListenError) as raised:
            await node.start()
    assert raised.value.field == field and f"{host}:{port}" in str(raised.value)
    assert node.store is None  # Raft was stopped: its data directory is free for the next try
    await started(make_node())  # the same data directory, other ports
