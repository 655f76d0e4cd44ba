"""Consistent points (issue 16 item 5), without sockets: the state machine's rules for a hold,
the sans-IO workflow (every path ends with the pause released), the HTTP hold route the renderer
draws until the committed deadline, the runner on an in-memory state (Redis I/O replaced), the
takeover of a point a dead leader left open, and the REST endpoints."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakes import FakePlane, FakeSnapshots, eventually, orders_spec

from repstage_mesh.config import SnapshotSettings
from repstage_mesh.core.models import (
    Command,
    HoldEntry,
    MeshState,
    Outcome,
    PutService,
    Role,
    StartHold,
    UpdateHold,
)
from repstage_mesh.core.state import apply, replay
from repstage_mesh.decide.steps import ProxyAcks
from repstage_mesh.filters.type_urls import ROUTE_CONFIGURATION
from repstage_mesh.render.envoy import render
from repstage_mesh.snapshots import points as points_module
from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotTarget
from repstage_mesh.snapshots.consistent import (
    FinishTakes,
    HoldCommit,
    Pause,
    PointPlan,
    PointsTaken,
    PointWorkflow,
    ServicePlan,
    Taken,
    TakePoints,
    Unpause,
    resume_hold,
)
from repstage_mesh.snapshots.points import PointDeps, PointRunner
from repstage_mesh.snapshots.workflow import AwaitProxies, Committed, Done, Finished

CACHE = orders_spec(name="cache", protocol="redis", listen_port=15100, read_port=15101)
WEB = orders_spec(name="web", protocol="http", listen_port=15200, read_port=None)
DB = orders_spec(name="db", protocol="postgres", listen_port=15300, read_port=None)


def seeded() -> MeshState:
    state, _ = replay([PutService(spec=CACHE), PutService(spec=WEB), PutService(spec=DB)])
    return state


def hold(hold_id: str = "p1", services: tuple[str, ...] = ("cache", "web")) -> HoldEntry:
    return HoldEntry(id=hold_id, services=services, window_ms=200)


def step(state: MeshState, command: Command) -> tuple[MeshState, Outcome]:
    return apply(state, command, state.index + 1)


# --- the state machine ------------------------------------------------------------------------


def test_a_hold_moves_intent_holding_released_and_only_holding_is_held_until_its_deadline() -> None:
    state, out = step(seeded(), StartHold(entry=hold()))
    assert out.ok and state.hold("p1").status == "intent" and state.hold("p1").intent_index == state.index  # type: ignore[union-attr]
    assert state.held_services(0.0) == frozenset()
    before = state.last_change
    state, out = step(state, UpdateHold(id="p1", status="holding", hold_until=1000.0))
    assert out.ok and state.last_change == state.index > before  # a new xDS version
    assert state.held_services(999.9) == {"cache", "web"}
    assert state.held_services(1000.0) == frozenset()  # the deadline ends it, whoever leads
    state, out = step(state, UpdateHold(id="p1", status="released", held_ms=12.5))
    assert out.ok and state.held_services(999.0) == frozenset() and state.last_change == state.index
    state, out = step(state, UpdateHold(id="p1", status="holding", hold_until=2000.0))
    assert not out.ok and out.rejection is not None and out.rejection.code == "conflict"


def test_a_hold_is_refused_for_an_unknown_service_while_another_is_open_and_without_a_deadline() -> None:
    state = seeded()
    _, out = step(state, StartHold(entry=hold(services=("cache", "nope"))))
    assert not out.ok and out.rejection is not None and out.rejection.field == "services"
    state, out = step(state, StartHold(entry=hold()))
    assert out.ok
    again, out = step(state, StartHold(entry=hold("p2")))
    assert not out.ok and out.rejection is not None and out.rejection.code == "conflict" and again.holds == state.holds
    _, out = step(state, UpdateHold(id="p1", status="holding"))
    assert not out.ok and out.rejection is not None and out.rejection.field == "hold_until"
    state, out = step(state, UpdateHold(id="p1", status="aborted", error="x"))
    assert out.ok
    _, out = step(state, StartHold(entry=hold("p2")))
    assert out.ok  # the first one is over


# --- the workflow -----------------------------------------------------------------------------


def plan(*kinds: str) -> PointPlan:
    services = tuple(
        ServicePlan(f"s{i}", "b", Role.REPLICA if k == "redis" else Role.PRIMARY, 3, k, f"snap-{i}")
        for i, k in enumerate(kinds)
    )
    return PointPlan("p1", "cp-1", services, window_ms=200, take_timeout=60.0)


def ok(now: float, index: int = 10) -> Committed:
    return Committed(True, now, index=index)


def through_intents(wf: PointWorkflow, now: float) -> Any:
    action = wf.handle(ok(now))  # StartHold
    while isinstance(action, HoldCommit) and action.command.kind == "start_snapshot":
        assert action.command.entry.group == "p1"
        action = wf.handle(ok(now))
    return action


def test_the_happy_path_holds_pauses_takes_the_points_unpauses_releases_then_records() -> None:
    wf = PointWorkflow(plan("redis", "http"))
    first = wf.start(100.0)
    assert isinstance(first, HoldCommit) and first.command.kind == "start_hold"
    holding = through_intents(wf, 100.0)
    assert isinstance(holding, HoldCommit) and holding.command.status == "holding"
    assert holding.command.hold_until == pytest.approx(100.2)
    acks = wf.handle(ok(100.01, index=42))
    assert isinstance(acks, AwaitProxies) and acks.min_index == 42 and acks.timeout <= 0.2
    pause = wf.handle(Done(True, 100.05))
    assert isinstance(pause, Pause) and pause.services == ("s0",) and 140 <= pause.ms <= 150
    take = wf.handle(Done(True, 100.06, "paused"))
    assert isinstance(take, TakePoints) and take.deadline == pytest.approx(100.2)
    unpause = wf.handle(PointsTaken(100.08, {"s0": {"master_repl_offset": "7"}, "s1": {"held_at": "100.07"}}))
    assert isinstance(unpause, Unpause) and unpause.services == ("s0",)
    release = wf.handle(Done(True, 100.09))
    assert isinstance(release, HoldCommit) and release.command.status == "released"
    assert release.command.points == {"s0": {"master_repl_offset": "7"}, "s1": {"held_at": "100.07"}}
    assert release.command.held_ms == pytest.approx(40.0)  # from the pause to the unpause
    assert [s.name for s in release.command.steps] == ["proxies_acked_hold", "paused", "points", "unpaused"]
    finish = wf.handle(ok(100.1))
    assert isinstance(finish, FinishTakes)
    result = ActionResult("file:///x/dump.rdb", {"master_repl_offset": "7"}, 10)
    first_record = wf.handle(Taken(101.0, {"s0": result, "s1": ActionResult("cmd", {}, 0)}))
    assert isinstance(first_record, HoldCommit) and first_record.command.status == "completed"
    assert first_record.command.point == {"master_repl_offset": "7", "group": "p1"}
    wf.handle(ok(101.0))
    assert wf.handle(ok(101.0)) == Finished("completed", "")


def test_points_not_taken_in_the_window_unpause_first_then_abort_and_fail_every_snapshot() -> None:
    wf = PointWorkflow(plan("redis", "redis"))
    wf.start(100.0)
    through_intents(wf, 100.0)
    pause = wf.handle(ok(100.01))  # no http service: no ACK wait
    assert isinstance(pause, Pause) and pause.services == ("s0", "s1")
    wf.handle(Done(True, 100.02))
    unpause = wf.handle(PointsTaken(100.2, error="consistent_hold: not within 200 ms"))
    assert isinstance(unpause, Unpause) and unpause.services == ("s0", "s1")
    abort = wf.handle(Done(True, 100.21))
    assert isinstance(abort, HoldCommit) and abort.command.status == "aborted" and "consistent_hold" in (abort.command.error or "")
    records = [wf.handle(Committed(False, 100.22, detail="no quorum"))]  # the abort did not land: the deadline releases
    records.append(wf.handle(ok(100.23)))
    assert all(isinstance(r, HoldCommit) and r.command.status == "failed" for r in records)
    end = wf.handle(ok(100.24))
    assert isinstance(end, Finished) and end.status == "aborted"


def test_a_failed_pause_or_a_missed_ack_still_unpauses() -> None:
    wf = PointWorkflow(plan("redis", "http"))
    wf.start(100.0)
    through_intents(wf, 100.0)
    wf.handle(ok(100.01))
    unpause = wf.handle(Done(False, 100.2, "missed: envoy-2"))
    assert isinstance(unpause, Unpause) and unpause.services == ("s0",)
    wf = PointWorkflow(plan("redis"))
    wf.start(100.0)
    through_intents(wf, 100.0)
    wf.handle(ok(100.01))
    assert isinstance(wf.handle(Done(False, 100.02, "connection refused")), Unpause)


def test_a_refused_intent_ends_at_once_and_a_refused_snapshot_intent_aborts() -> None:
    wf = PointWorkflow(plan("redis"))
    wf.start(100.0)
    assert wf.handle(Committed(False, 100.0, detail="consistent point p0 is still holding")).status == "failed"  # type: ignore[union-attr]
    wf = PointWorkflow(plan("redis", "redis"))
    wf.start(100.0)
    wf.handle(ok(100.0))
    wf.handle(ok(100.0))  # the first snapshot intent
    abort = wf.handle(Committed(False, 100.0, detail="snapshot s of s1 is still running"))
    assert isinstance(abort, HoldCommit) and abort.command.status == "aborted"
    record = wf.handle(ok(100.0))
    assert isinstance(record, HoldCommit) and record.command.id == "snap-0" and record.command.status == "failed"
    assert isinstance(wf.handle(ok(100.0)), Finished)  # s1's intent never landed: nothing to record


def test_a_new_leader_unpauses_and_aborts_a_point_left_open() -> None:
    entry = hold().model_copy(update={"status": "holding", "hold_until": 5.0, "leader": "cp-1"})
    services, command = resume_hold(entry, "cp-2", 6.0)
    assert services == ("cache", "web")
    assert command.status == "aborted" and "cp-1" in (command.error or "") and command.leader == "cp-2"


# --- the HTTP hold route ------------------------------------------------------------------------


def test_a_held_http_service_answers_writes_503_with_retry_after_and_reads_go_to_the_primary() -> None:
    state = seeded()
    held = render(state, held=frozenset({"web", "cache"}))[ROUTE_CONFIGURATION]["web-primary-routes"]
    free = render(state)[ROUTE_CONFIGURATION]["web-primary-routes"]
    first = held.virtual_hosts[0].routes[0]
    assert first.direct_response.status == 503
    assert first.match.headers[0].name == ":method"
    assert first.match.headers[0].string_match.safe_regex.regex == "^(DELETE|PATCH|POST|PUT)$"
    assert [(h.header.key, h.header.value) for h in first.response_headers_to_add] == [("retry-after", "1")]
    assert held.virtual_hosts[0].routes[1] == free.virtual_hosts[0].routes[0]  # everything else as before
    assert len(free.virtual_hosts[0].routes) == 1


# --- the runner -------------------------------------------------------------------------------


class Replicated:
    def __init__(self) -> None:
        self.state = seeded()
        self.acked: list[int] = []

    async def commit(self, command: Command, timeout: float) -> Outcome:
        self.state, outcome = apply(self.state, command, self.state.index + 1)
        return outcome

    async def await_proxies(self, min_index: int, timeout: float) -> ProxyAcks:
        self.acked.append(min_index)
        return ProxyAcks(acked={"envoy-1#1": 0.0})


class Command_:
    """The operator's command action (a file-system snapshot) for the http service."""

    def __init__(self) -> None:
        self.targets: list[SnapshotTarget] = []

    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult:
        self.targets.append(target)
        return ActionResult(f"zfs://tank@{target.snapshot_id}", {"finished_at": "1"}, 0)


def runner(replicated: Replicated, action: Command_, hold_ms: int = 200, **deps: Any) -> PointRunner:
    settings = SnapshotSettings(consistent_hold_ms=hold_ms)
    return PointRunner(PointDeps(
        node_id="cp-1", settings=settings, state=lambda: replicated.state, commit=replicated.commit,
        await_proxies=replicated.await_proxies, actions=lambda _kind, _service: action,  # type: ignore[arg-type,return-value]
        **deps,
    ))


async def test_an_http_point_holds_until_the_proxies_acked_takes_inside_the_hold_and_completes() -> None:
    replicated, action = Replicated(), Command_()
    points = runner(replicated, action)
    entry = await points.start(["web"])
    assert entry.status == "intent" and entry.members == {"web": "a"}
    await eventually(lambda: replicated.state.hold(entry.id).status == "released", "the point released")  # type: ignore[union-attr]
    snapshot_id = entry.snapshots["web"]
    await eventually(lambda: replicated.state.snapshot(snapshot_id).status == "completed", "the snapshot completed")  # type: ignore[union-attr]
    done = replicated.state.hold(entry.id)
    snapshot = replicated.state.snapshot(snapshot_id)
    assert done is not None and snapshot is not None
    assert snapshot.group == entry.id and snapshot.point["group"] == entry.id and "held_at" in snapshot.point
    assert replicated.acked and action.targets[0].member == "a"
    assert replicated.state.held_services(0.0) == frozenset()


async def test_one_trace_per_point_and_the_hold_metric() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry

    from repstage_mesh.telemetry import Tracing
    from repstage_mesh.telemetry.metrics import MeshMetrics

    exporter = InMemorySpanExporter()
    tracing = Tracing.setup(None, "cp-1", exporter=exporter)
    registry = CollectorRegistry()
    replicated = Replicated()
    points = runner(replicated, Command_(), tracing=tracing, metrics=MeshMetrics(registry, "cp-1"))
    entry = await points.start(["web"])
    await eventually(lambda: registry.get_sample_value("repstage_consistent_hold_seconds_count", {"status": "completed"}) == 1,
                     "the hold observed")
    assert tracing.flush()
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "snapshot"]
    assert root.attributes["repstage.snapshot"] == entry.id  # type: ignore[index]
    children = {s.name for s in spans if s.parent is not None and s.context.trace_id == root.context.trace_id}  # type: ignore[union-attr]
    assert {"StartHold", "StartSnapshot", "UpdateHold", "AwaitProxies", "TakePoints", "Unpause", "FinishTakes"} <= children
    tracing.shutdown()


async def test_requests_are_refused_for_tcp_or_postgres_services_unknown_ones_and_twice_named() -> None:
    points = runner(Replicated(), Command_())
    from repstage_mesh.core.errors import SnapshotRefused

    for services, field, code in ((["db"], "services", "invalid"), (["nope"], "services", "not_found"),
                                  (["web", "web"], "services", "invalid"), ([], "services", "invalid")):
        with pytest.raises(SnapshotRefused) as refused:
            await points.start(services)
        assert (refused.value.field, refused.value.code) == (field, code)


async def test_redis_points_pause_every_primary_and_unpause_even_when_a_fork_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []

    async def pause_and_read(target: SnapshotTarget, ms: int) -> Any:
        calls.append(("pause", (target.member, ms)))
        return points_module.Paused(client=None, replid="r" * 40, offset=77)  # type: ignore[arg-type]

    async def release(paused: Any) -> None:
        calls.append(("unpause", paused.offset))

    async def open_fork(member: SnapshotTarget, replid: str, offset: int, deadline: float) -> Any:
        raise RuntimeError("b forked at 70, not at the held point")

    for name, fake in (("pause_and_read", pause_and_read), ("release", release), ("open_fork", open_fork)):
        monkeypatch.setattr(points_module, name, fake)
    replicated = Replicated()
    points = runner(replicated, Command_())
    entry = await points.start(["cache"], "primary")
    await eventually(lambda: not replicated.state.hold(entry.id).open, "the point ended")  # type: ignore[union-attr]
    done = replicated.state.hold(entry.id)
    assert done is not None and done.status == "aborted" and "held point" in done.error
    assert [c[0] for c in calls] == ["pause", "unpause"] and 0 < calls[0][1][1] <= 200
    await eventually(lambda: replicated.state.snapshot(entry.snapshots["cache"]).status == "failed", "its snapshot failed")  # type: ignore[union-attr]


async def test_take_over_unpauses_and_aborts_an_open_point(monkeypatch: pytest.MonkeyPatch) -> None:
    unpaused: list[str] = []

    async def unpause(target: SnapshotTarget) -> None:
        unpaused.append(target.member)

    monkeypatch.setattr(points_module, "unpause", unpause)
    replicated = Replicated()
    replicated.state, _ = step(replicated.state, StartHold(entry=hold(services=("cache", "web"))))
    replicated.state, _ = step(replicated.state, UpdateHold(id="p1", status="holding", hold_until=1e12))
    points = runner(replicated, Command_())
    points.take_over()
    await eventually(lambda: replicated.state.hold("p1").status == "aborted", "the new leader aborted it")  # type: ignore[union-attr]
    assert unpaused == ["a"]  # the redis service's primary; the http hold goes with the commit
    assert replicated.state.held_services(0.0) == frozenset()
    await points.stop()


# --- REST -------------------------------------------------------------------------------------


async def test_rest_starts_lists_and_gets_points_and_refuses_bad_input() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from repstage_mesh.api.app import build_app
    from repstage_mesh.api.snapshots import snapshot_operations

    plane = FakePlane(services=[orders_spec(), orders_spec(name="web", protocol="http", listen_port=15200, read_port=None)])
    async with TestClient(TestServer(build_app(plane, extra_operations=snapshot_operations(FakeSnapshots(plane))))) as client:
        started = await client.post("/v1/consistent-points", json={"services": ["orders", "web"], "consistent": True})
        body = await started.json()
        assert started.status == 202 and body["status"] == "intent" and body["services"] == ["orders", "web"]
        again = await client.post("/v1/consistent-points", json={"services": ["web"]})
        assert again.status == 409
        for bad, field in (({"services": ["web"], "consistent": False}, "consistent"), ({"services": []}, "services"),
                           ({"services": ["web"], "member": "b"}, "member")):
            answer = await client.post("/v1/consistent-points", json=bad)
            assert answer.status == 422 and (await answer.json())["error"]["field"] == field, bad
        listed = await (await client.get("/v1/consistent-points")).json()
        assert [p["id"] for p in listed["points"]] == [body["id"]]
        assert (await client.get(f"/v1/consistent-points/{body['id']}")).status == 200
        assert (await client.get("/v1/consistent-points/nope")).status == 404
    await asyncio.sleep(0)


async def test_a_point_whose_release_did_not_land_is_ended_before_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    async def unpause(target: SnapshotTarget) -> None:
        pass

    monkeypatch.setattr(points_module, "unpause", unpause)
    replicated = Replicated()
    replicated.state, _ = step(replicated.state, StartHold(entry=hold(services=("web",))))
    replicated.state, _ = step(replicated.state, UpdateHold(id="p1", status="holding", hold_until=1.0))
    points = runner(replicated, Command_())
    entry = await points.start(["web"])
    assert replicated.state.hold("p1").status == "aborted"  # type: ignore[union-attr]
    await eventually(lambda: replicated.state.hold(entry.id).status == "released", "the new point released")  # type: ignore[union-attr]


async def test_points_not_taken_within_the_window_count_a_cap_hit_and_release(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    from repstage_mesh.telemetry.metrics import MeshMetrics

    released: list[int] = []

    async def pause_and_read(target: SnapshotTarget, ms: int) -> Any:
        return points_module.Paused(client=None, replid="r" * 40, offset=77)  # type: ignore[arg-type]

    async def release(paused: Any) -> None:
        released.append(paused.offset)

    async def open_fork(member: SnapshotTarget, replid: str, offset: int, deadline: float) -> Any:
        await asyncio.sleep(10)  # a replica that never gets there

    for name, fake in (("pause_and_read", pause_and_read), ("release", release), ("open_fork", open_fork)):
        monkeypatch.setattr(points_module, name, fake)
    registry = CollectorRegistry()
    replicated = Replicated()
    points = runner(replicated, Command_(), hold_ms=50, metrics=MeshMetrics(registry, "cp-1"))
    entry = await points.start(["cache"])
    await eventually(lambda: registry.get_sample_value("repstage_snapshot_limits_total", {"limit": "consistent_hold"}) == 1,
                     "the cap hit counted")
    done = replicated.state.hold(entry.id)
    assert done is not None and done.status == "aborted" and done.error.startswith("consistent_hold")
    assert released == [77]


def test_a_route_entry_refuses_a_method_that_is_not_an_upper_case_word() -> None:
    from repstage_mesh.filters import DirectResponse, RouteEntry

    for bad in ("post", "PO ST", ""):
        with pytest.raises(ValueError, match="methods"):
            RouteEntry(prefix="/", methods=(bad,), target=DirectResponse(503))
