"""Cluster-wide views and the CLI's tables (issue 15, items 5 and 6).

Every node's proxies gathered with a bounded wait per node (a node that does not answer is
listed as unreachable), the Raft view by node id with no quorum claimed during an election,
the members' health, offset and lag, a disconnected proxy never synced; the CLI's `--api`
fallback, `failovers ID`, and tables that never split a word at 80 columns.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import PROXY, FakePlane, LiveApi, orders_spec
from rich.console import Console
from test_proxy_progress import Proxy, snapshot

from repstage_mesh.api.cluster import (
    ClusterViews,
    NodeProxies,
    gather_proxies,
    member_health,
    raft_view,
)
from repstage_mesh.api.failovers import failover_operations
from repstage_mesh.api.plane import DIRECT, Caller
from repstage_mesh.cli import main as cli
from repstage_mesh.cli import views
from repstage_mesh.core.errors import ApiUnreachable, NoLeaderKnown, NotLeader
from repstage_mesh.core.models import MeshState, NodeAddress, PutService
from repstage_mesh.core.state import apply
from repstage_mesh.xds.tracker import ProxyTracker


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPSTAGE_API", raising=False)
    monkeypatch.delenv("REPSTAGE_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the API --------------------------------------------------------------------------------------


@pytest.fixture
def plane() -> FakePlane:
    p = FakePlane(services=[orders_spec()])
    p.proxy_list = [PROXY]
    p.peer_answers = [
        NodeProxies("node-2", "127.0.0.1:2", True, [{**PROXY, "node_id": "envoy-2", "control_plane": "node-2"}]),
        NodeProxies("node-3", "127.0.0.1:3", False, error="no answer in time"),
    ]
    p.observed = {"orders": {"members": {
        "a": {"status": "primary", "since": 40.0, "offset": 5000},
        "b": {"status": "replica", "since": 90.0, "offset": 4200, "upstream": "127.0.0.1:9001"},
    }}}  # fmt: skip
    return p


@pytest.fixture
def live(plane: FakePlane) -> Iterator[LiveApi]:
    with LiveApi(plane, extra_operations=failover_operations()) as server:
        yield server


def _get(url: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_proxies_scope_cluster_lists_every_node_and_the_unreachable_one(live: LiveApi) -> None:
    status, local = _get(f"{live.url}/v1/proxies")
    assert status == 200 and [p["node_id"] for p in local] == ["envoy-1"]
    status, body = _get(f"{live.url}/v1/proxies?scope=cluster")
    assert status == 200 and body["scope"] == "cluster" and body["node_id"] == "node-1"
    assert [(p["node_id"], p["control_plane"]) for p in body["proxies"]] == [("envoy-1", "node-1"), ("envoy-2", "node-2")]
    reach = {n["node_id"]: (n["reachable"], n["error"], n["proxies"]) for n in body["nodes"]}
    assert reach == {"node-1": (True, None, 1), "node-2": (True, None, 1), "node-3": (False, "no answer in time", 0)}
    status, body = _get(f"{live.url}/v1/proxies?scope=everything")
    assert status == 400 and body["error"]["field"] == "scope"
    status, body = _get(f"{live.url}/v1/proxies?scoop=cluster")
    assert status == 400 and body["error"]["field"] == "scoop"


def test_members_endpoint_has_health_offset_and_lag(live: LiveApi) -> None:
    status, body = _get(f"{live.url}/v1/members")
    assert status == 200 and body["node_id"] == "node-1" and body["leader"] is True
    rows = {m["member"]: m for m in body["members"]}
    assert (rows["a"]["role"], rows["a"]["health"], rows["a"]["lag"], rows["a"]["since_seconds"]) == ("primary", "primary", 0, 60.0)
    assert (rows["b"]["health"], rows["b"]["offset"], rows["b"]["lag"]) == ("replica", 4200, 800)


def test_member_health_without_observations_is_unobserved() -> None:
    state, _ = apply(MeshState(), PutService(spec=orders_spec()), 1)
    rows = member_health(state, {}, now=5.0)
    assert [(r.member, r.health, r.lag, r.since_seconds) for r in rows] == [
        ("a", "unobserved", None, None), ("b", "unobserved", None, None)]  # fmt: skip


NODES = {
    "cp-1": NodeAddress(node_id="cp-1", raft="127.0.0.1:7001", api="127.0.0.1:8001"),
    "cp-2": NodeAddress(node_id="cp-2", raft="127.0.0.1:7002", api="127.0.0.1:8002"),
}


def test_raft_view_names_nodes_by_id_and_claims_no_quorum_without_a_leader() -> None:
    raw = {"node_id": "cp-1", "address": "127.0.0.1:7001", "leader": "127.0.0.1:7002", "is_leader": False,
           "has_quorum": True, "peers": [{"address": "127.0.0.1:7002", "connected": True}]}  # fmt: skip
    view = raft_view(raw, NODES)
    assert (view["leader"], view["leader_address"], view["has_quorum"]) == ("cp-2", "127.0.0.1:7002", True)
    assert view["peers"] == [{"node_id": "cp-2", "address": "127.0.0.1:7002", "connected": True}]
    election = raft_view({**raw, "leader": None}, NODES)
    assert (election["leader"], election["has_quorum"]) == (None, False)
    single = raft_view({"node_id": "cp-1", "address": None, "leader": None, "is_leader": True, "has_quorum": True}, {})
    assert "address" not in single and single["leader"] == "cp-1" and single["has_quorum"] is True


def test_a_disconnected_proxy_is_never_synced() -> None:
    tracker = ProxyTracker(control_plane="cp-1")
    proxy = Proxy(tracker, 1, snapshot(5, "a"))
    proxy.ack()
    assert tracker.to_list()[0]["synced"] is True
    tracker.disconnect(1)
    row = tracker.to_list()[0]
    assert (row["connected"], row["synced"]) == (False, False)


# --- gathering over real sockets: bounded per node ------------------------------------------------


class Stalled:
    """A TCP listener that accepts and never answers (a frozen node)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_gather_asks_every_node_at_once_and_a_silent_one_is_unreachable() -> None:
    seen: list[str | None] = []

    async def proxies(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        assert request.query.get("scope") == "local"
        return web.json_response([{**PROXY, "node_id": "envoy-2", "control_plane": None}])

    app = web.Application()
    app.router.add_get("/v1/proxies", proxies)
    stalled = Stalled()
    unreachable: list[str] = []
    try:
        async with TestServer(app, host="127.0.0.1") as server:
            peers = [
                NodeAddress(node_id="cp-2", api=f"127.0.0.1:{server.port}"),
                NodeAddress(node_id="cp-3", api=f"127.0.0.1:{stalled.port}"),
                NodeAddress(node_id="cp-4", api=f"127.0.0.1:{_closed_port()}"),
                NodeAddress(node_id="cp-1", api="127.0.0.1:1"),  # the gathering node itself: not asked
            ]
            local = NodeProxies("cp-1", "127.0.0.1:1", True, [PROXY])
            async with asyncio.timeout(20):  # a hang detector, not a speed limit
                answers = await gather_proxies(local, peers, "Bearer t", 0.5, unreachable.append)
    finally:
        stalled.close()
    by_id = {a.node_id: a for a in answers}
    assert [a.node_id for a in answers] == ["cp-1", "cp-2", "cp-3", "cp-4"]
    assert by_id["cp-2"].reachable and by_id["cp-2"].proxies[0]["control_plane"] == "cp-2"
    assert (by_id["cp-3"].reachable, by_id["cp-3"].error) == (False, "no answer in time")
    assert not by_id["cp-4"].reachable and by_id["cp-4"].error
    assert seen == ["Bearer t"] and sorted(unreachable) == ["cp-3", "cp-4"]


# --- the CLI --------------------------------------------------------------------------------------


def test_status_shows_every_node_members_and_every_nodes_proxies(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "status", "--api", live.url)
    assert code == 0, err
    for text in ("Nodes", "node-2", "node-3", "no: no answer in time", "envoy-1", "envoy-2", "Members",
                 "replica", "800", "node-3: unreachable"):  # fmt: skip
        assert text in out, text
    assert "None" not in out and "{'" not in out
    code, out, _ = run(capsys, "status", "--json", "--api", live.url)
    data = json.loads(out)
    assert sorted(p["node_id"] for p in data["proxies"]) == ["envoy-1", "envoy-2"]
    assert [n["node_id"] for n in data["nodes"]] == ["node-1", "node-2", "node-3"]
    assert {m["member"]: m["lag"] for m in data["members"]["members"]} == {"a": 0, "b": 800}


def test_services_get_shows_member_health(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "services", "get", "orders", "--api", live.url)
    assert code == 0 and "HEALTH" in out and "4200" in out and "observed by the leader node-1" in out


RECORD = {
    "id": "node-1-3", "service": "orders", "cause": "probe: a down", "mode": "orchestrate", "kind": "failover",
    "old_primary": "a", "new_primary": "b", "status": "done", "epoch": 9, "fence_epoch": 8,
    "started_at": 100.0, "started_unix": time.time() - 30, "duration_ms": 412.5, "write_unavailable_ms": 380.0,
    "timeline": [{"name": "detected", "at": 100.0, "elapsed_ms": 0.0, "detail": {"member": "a"}},
                 {"name": "fenced", "at": 100.1, "elapsed_ms": 101.5, "detail": {}},
                 {"name": "promoted", "at": 100.3, "elapsed_ms": 305.0, "detail": {"member": "b"}}],
}  # fmt: skip


def test_failovers_id_shows_the_timeline(live: LiveApi, plane: FakePlane, capsys: pytest.CaptureFixture[str]) -> None:
    record = {**RECORD, "started_unix": time.time() - 30}

    async def failover(record_id: str, caller: Any = None) -> dict[str, Any] | None:
        return record if record_id == RECORD["id"] else None

    plane.failover = failover  # type: ignore[method-assign]
    code, out, err = run(capsys, "failovers", "node-1-3", "--api", live.url)
    assert code == 0, err
    assert re.search(r"305\.0 +│ promoted +│ member=b", out), out
    assert "a → b" in out and re.search(r"3\ds ago", out), out
    code, out, _ = run(capsys, "failovers", "node-1-3", "--json", "--api", live.url)
    assert [e["name"] for e in json.loads(out)["timeline"]] == ["detected", "fenced", "promoted"]
    code, _, err = run(capsys, "failovers", "nope", "--api", live.url)
    assert code == 1 and "no failover 'nope'" in err


def test_api_accepts_several_urls_and_tries_the_next(live: LiveApi, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    dead = f"http://127.0.0.1:{_closed_port()}"
    code, out, err = run(capsys, "services", "--json", "--api", f"{dead},{live.url}")
    assert code == 0, err
    assert json.loads(out)["services"][0]["name"] == "orders"
    code, _, err = run(capsys, "services", "--api", dead, "--api", live.url)
    assert code == 0, err
    monkeypatch.setenv("REPSTAGE_API", f"{dead}, {live.url}")
    code, _, err = run(capsys, "switchover", "orders", "--to", "b", "--json")
    assert code == 0, err  # a refused connection never carried the write: the next node gets it
    code, _, err = run(capsys, "services", "--api", f"{dead},{dead}/")
    assert code == 1 and dead in err and "--api URL[,URL...]" in err


def test_a_write_that_may_have_been_received_is_not_sent_to_the_next_node(
    live: LiveApi, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node that took the connection and dropped it may have carried the write out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def drop() -> None:  # every connection taken and dropped, until the listener is closed
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    try:
        code, _, err = run(capsys, "switchover", "orders", "--to", "b", "--epoch", "50",
                           "--api", f"http://127.0.0.1:{port},{live.url}")  # fmt: skip
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)
    assert code == 1 and f"127.0.0.1:{port}" in err and live.url not in err
    assert live.call(lambda: live.plane.submitted) == []
    code, _, err = run(capsys, "services", "--api", f"{live.url}")  # a read would have moved on
    assert code == 0


def test_bootstrap_help_tells_the_default_node_cluster(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    out = tmp_path / "b.yaml"
    assert cli.main(["bootstrap", "--node-id", "e1", "--xds", "127.0.0.1:18000", "--out", str(out)]) == 0
    cluster = yaml.safe_load(out.read_text())["node"]["cluster"]
    code, help_text, _ = run(capsys, "bootstrap", "--help")
    assert code == 0 and f"(default: {cluster})" in " ".join(help_text.split())


# --- tables at 80 columns never split a word ------------------------------------------------------

LONG_PROXY = {
    **PROXY, "node_id": "envoy-frontend-eu-west-1a-7f9c", "control_plane": "cp-frankfurt-1",
    "connected_at": time.time() - 3700,
    "types": {n: {"type_url": f"type.googleapis.com/{n}", "acked_version": "1042-9f8e7d6c5b4a",
                  "nacked_version": "1043-0a1b2c3d4e5f" if n == "lds" else None,
                  "error": "Error adding/updating listener(s) orders-primary: cannot bind '127.0.0.1:15000': "
                           "Address already in use" if n == "lds" else None}
              for n in ("cds", "eds", "lds", "rds")},
}  # fmt: skip
CLUSTER = {"node_id": "cp-frankfurt-1", "leader": "cp-frankfurt-2", "is_leader": False, "term": 12,
           "commit_index": 123456, "applied_index": 123456, "has_quorum": True, "started_at": time.time() - 90000,
           "peers": [{"node_id": "cp-frankfurt-2", "address": "10.0.0.2:7001", "connected": True},
                     {"node_id": "cp-frankfurt-3", "address": "10.0.0.3:7001", "connected": False}],
           "snapshot_version": "123450-0123456789abcdef", "connected_proxies": 12}  # fmt: skip
GATHERED = {"nodes": [{"node_id": f"cp-frankfurt-{i}", "api": f"10.0.0.{i}:8080", "reachable": i != 3,
                       "error": "no answer in time (api.peer_timeout 1 s)" if i == 3 else None, "proxies": 4}
                      for i in (1, 2, 3)]}  # fmt: skip
MEMBERS = {"node_id": "cp-frankfurt-2", "leader": True, "members": [
    {"service": "orders-database", "member": f"postgres-replica-{i}", "address": f"db-{i}.internal.example.com",
     "port": 5432, "role": "replica", "health": "replica", "since_seconds": 4000.0, "offset": 23874561234,
     "lag": 123456} for i in range(3)]}  # fmt: skip
SERVICE = {"name": "orders-database", "protocol": "postgres", "primary": "postgres-replica-0", "epoch": 123400,
           "listen_port": 15432, "read_port": 15433, "changed_at": 123400, "applied_index": 123456,
           "members": [{"name": f"postgres-replica-{i}", "address": f"db-{i}.internal.example.com", "port": 5432,
                        "role": "primary" if i == 0 else "replica"} for i in range(3)]}  # fmt: skip
FAILOVER = {**RECORD, "id": "cp-frankfurt-2-17", "service": "orders-database", "old_primary": "postgres-replica-0",
            "new_primary": "postgres-replica-1", "status": "failed",
            "reason": "no eligible replica: every replica lags more than max_lag_bytes",
            "missed_fence": ["envoy-frontend-eu-west-1a-7f9c#3"], "cause": "probe: postgres-replica-0 down (refused)",
            "timeline": [{"name": "fail_closed_committed", "elapsed_ms": 12.5,
                          "detail": {"epoch": 123401, "note": "fenced the old primary everywhere"}}]}  # fmt: skip


def _renderables() -> dict[str, Any]:
    return {
        "cluster": views.cluster_table(CLUSTER),
        "nodes": views.nodes_table(CLUSTER, GATHERED),
        "services": views.services_table([SERVICE], 123456),
        "members": views.members_table(MEMBERS),
        "service": views.service_detail(SERVICE, MEMBERS),
        "proxies": views.proxies_table([LONG_PROXY, {**LONG_PROXY, "connected": False}], GATHERED["nodes"]),
        "failovers": views.failovers_table([FAILOVER]),
        "failover": views.failover_detail(FAILOVER),
        "generic": views.generic_table("Things", [{"id": "thing-with-a-long-name-1", "note": "a b c " * 30}]),
    }


@pytest.mark.parametrize("name", list(_renderables()))
def test_tables_at_80_columns_never_split_a_word(name: str) -> None:
    """Every token printed is a whole word of the data or of the table's own text, or a word's
    beginning cut with an ellipsis: never a fragment carried to the next line."""
    console = Console(file=io.StringIO(), width=80, color_system=None, legacy_windows=False)
    console.print(_renderables()[name])
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert max(len(line) for line in text.splitlines()) <= 80
    wide = Console(file=io.StringIO(), width=1000, color_system=None)
    wide.print(_renderables()[name])
    whole = set(re.split(r"[\s│┃┏┓┗┛┡┩━─┳┻╇╈┼└┘┌┐┬┴]+", wide.file.getvalue()))  # type: ignore[attr-defined]
    for token in re.split(r"[\s│┃┏┓┗┛┡┩━─┳┻╇╈┼└┘┌┐┬┴]+", text):
        if not token or token in whole:
            continue
        assert token.endswith("…") and any(w.startswith(token[:-1]) for w in whole), (name, token, text)


# --- the members' view: the leader's, asked one hop ----------------------------------------------


class _Peers:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, Any]] = []

    async def call(self, api: str, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        self.calls.append((api, path, kwargs.get("authorization")))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def _views(leader_api: Any, peers: _Peers, leads: bool = False) -> ClusterViews:
    state, _ = apply(MeshState(), PutService(spec=orders_spec()), 1)
    observed = {"orders": {"members": {"a": {"status": "down", "since": time.monotonic() - 5, "offset": 10}}}}
    return ClusterViews("cp-2", lambda: state, list, lambda: observed, leader_api, lambda: leads, peers,  # type: ignore[arg-type]
                        0.5, lambda _n: None)  # fmt: skip


async def test_members_are_asked_of_the_leader_with_the_callers_token() -> None:
    peers = _Peers({"node_id": "cp-1", "leader": True, "members": []})
    answer = await _views(lambda caller: "127.0.0.1:8001", peers).members(Caller(authorization="Bearer t"))
    assert answer["node_id"] == "cp-1" and peers.calls == [("127.0.0.1:8001", "/v1/members", "Bearer t")]


async def test_members_when_the_leader_cannot_be_asked_are_this_nodes_and_say_so() -> None:
    def no_leader(caller: Caller) -> str | None:
        raise NoLeaderKnown("election")

    for leader_api, peers in ((no_leader, _Peers(None)), (lambda c: "127.0.0.1:1", _Peers(ApiUnreachable("gone")))):
        answer = await _views(leader_api, peers).members(DIRECT)
        assert (answer["node_id"], answer["leader"]) == ("cp-2", False)
        rows = {m["member"]: m for m in answer["members"]}
        assert rows["a"]["health"] == "down" and rows["b"]["health"] == "unobserved"
    leader = await _views(lambda c: None, _Peers(None), leads=True).members(DIRECT)
    assert leader["leader"] is True and leader["members"][0]["since_seconds"] >= 5


async def test_a_forwarded_members_request_on_a_follower_is_refused() -> None:
    def refuse(caller: Caller) -> str | None:
        raise NotLeader("forwarded once at most", None)

    with pytest.raises(NotLeader):
        await _views(refuse, _Peers(None)).members(Caller(forwarded_by="cp-3"))


def test_status_through_the_cli_at_80_columns_splits_no_word(
    plane: FakePlane, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`repstage-mesh status` as a user runs it in an 80-column terminal (COLUMNS=80)."""
    plane.proxy_list = [LONG_PROXY]
    plane.peer_answers = [NodeProxies("cp-frankfurt-3", "10.0.0.3:8080", False, error="no answer in time")]
    with LiveApi(plane) as server:
        monkeypatch.setenv("COLUMNS", "1000")
        code, wide, err = run(capsys, "status", "--api", server.url)
        assert code == 0, err
        monkeypatch.setenv("COLUMNS", "80")
        code, narrow, err = run(capsys, "status", "--api", server.url)
        assert code == 0, err
    assert max(len(line) for line in narrow.splitlines()) <= 80
    split = r"[\s│┃┏┓┗┛┡┩━─┳┻╇╈┼└┘┌┐┬┴]+"
    whole = set(re.split(split, wide))
    for token in re.split(split, narrow):
        if token and token not in whole:
            assert token.endswith("…") and any(w.startswith(token[:-1]) for w in whole), (token, narrow)
    assert "envoy-frontend-eu-west-1a-7f9c" in narrow and "cp-frankfurt-3: unreachable" in narrow
