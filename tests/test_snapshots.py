"""Snapshots (issue 16): the replicated entries and their epoch fencing, the drained read pool,
the member choice and the sans-IO workflow."""

from __future__ import annotations

import pytest
from envoy_data_plane.envoy.config.core.v3 import HealthStatus
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from fakes import orders_spec

from repstage_mesh.core import naming
from repstage_mesh.core.errors import SnapshotRefused
from repstage_mesh.core.models import (
    MeshState,
    PutService,
    Role,
    SetPrimary,
    SnapshotEntry,
    StartSnapshot,
    UpdateSnapshot,
)
from repstage_mesh.core.state import apply, replay
from repstage_mesh.filters import CLUSTER_LOAD_ASSIGNMENT
from repstage_mesh.render.envoy import render
from repstage_mesh.snapshots.actions.base import ActionResult
from repstage_mesh.snapshots.choice import MemberReport, choose_member
from repstage_mesh.snapshots.edges import cx_active
from repstage_mesh.snapshots.workflow import (
    Aborted,
    AwaitIdle,
    AwaitProxies,
    Commit,
    Committed,
    Done,
    Finished,
    RunHook,
    SnapshotPlan,
    SnapshotWorkflow,
    Take,
    Took,
)

THREE = orders_spec(members=[
    {"name": "a", "address": "127.0.0.1", "port": 9001},
    {"name": "b", "address": "127.0.0.1", "port": 9002},
    {"name": "c", "address": "127.0.0.1", "port": 9003},
])


def seeded() -> MeshState:
    state, _ = replay([PutService(spec=THREE)])
    return state


def intent(state: MeshState, member: str = "b", snapshot_id: str = "s1") -> SnapshotEntry:
    svc = state.services["orders"]
    return SnapshotEntry(id=snapshot_id, service="orders", member=member, role=svc.role_of(member), epoch=svc.epoch)


def run(state: MeshState, *commands: object) -> tuple[MeshState, list[object]]:
    outcomes = []
    for command in commands:
        state, outcome = apply(state, command, state.index + 1)  # type: ignore[arg-type]
        outcomes.append(outcome)
    return state, outcomes


# --- the state machine --------------------------------------------------------------------------


def test_intent_is_refused_unless_role_and_epoch_hold_and_one_runs_per_service() -> None:
    state = seeded()
    stale = intent(state).model_copy(update={"epoch": state.services["orders"].epoch + 5})
    state, (outcome,) = run(state, StartSnapshot(entry=stale))
    assert not outcome.ok and outcome.rejection.code == "stale_epoch"  # type: ignore[attr-defined]
    wrong_role = intent(state).model_copy(update={"role": Role.PRIMARY})
    state, (outcome,) = run(state, StartSnapshot(entry=wrong_role))
    assert not outcome.ok and outcome.rejection.field == "epoch"  # type: ignore[attr-defined]
    state, (first, second) = run(state, StartSnapshot(entry=intent(state)), StartSnapshot(entry=intent(state, "c", "s2")))
    assert first.ok and first.result["intent_index"] == state.index - 1  # type: ignore[attr-defined]
    assert not second.ok and second.rejection.code == "conflict"  # type: ignore[attr-defined]
    assert [s.id for s in state.snapshots] == ["s1"]


def test_pool_changes_move_the_xds_version_and_steps_do_not() -> None:
    state, _ = run(seeded(), StartSnapshot(entry=intent(seeded())))
    before = state.last_change
    state, _ = run(state, UpdateSnapshot(id="s1", pool="draining"))
    assert state.last_change == state.index > before and state.pool_of("orders", "b") == "draining"
    moved = state.last_change
    state, _ = run(state, UpdateSnapshot(id="s1", undo=("post_hook",)))
    assert state.last_change == moved


def test_a_failover_aborts_the_snapshot_in_the_same_entry_and_returns_the_member() -> None:
    state, _ = run(seeded(), StartSnapshot(entry=intent(seeded())), UpdateSnapshot(id="s1", pool="out"))
    state, (outcome,) = run(state, SetPrimary(service="orders", member="b"))
    entry = state.snapshot("s1")
    assert entry is not None and entry.status == "aborted" and entry.pool == "in"
    assert outcome.result["aborted_snapshots"] == ["s1"]  # type: ignore[attr-defined]
    assert f"Raft index {state.index}" in entry.error
    # never completes, never leaves the pool again; its undo still records
    state, (done, out, undo) = run(
        state, UpdateSnapshot(id="s1", status="completed", pool="in"), UpdateSnapshot(id="s1", pool="out"),
        UpdateSnapshot(id="s1", status="failed", undo=(), pool="in"),
    )
    assert not done.ok and done.rejection.code == "conflict"  # type: ignore[attr-defined]
    assert not out.ok and undo.ok
    assert state.snapshot("s1").status == "aborted"  # type: ignore[union-attr]


def test_a_claim_that_keeps_primary_and_epoch_does_not_abort() -> None:
    state, _ = run(seeded(), StartSnapshot(entry=intent(seeded())))
    state, (outcome,) = run(state, SetPrimary(service="orders", member="a", token=7))
    assert outcome.ok and state.snapshot("s1").running  # type: ignore[union-attr]
    state, (done,) = run(state, UpdateSnapshot(id="s1", status="completed"))
    assert done.ok and state.snapshot("s1").status == "completed"  # type: ignore[union-attr]


def test_removing_the_member_aborts_and_finished_snapshots_are_bounded() -> None:
    state, _ = run(seeded(), StartSnapshot(entry=intent(seeded())))
    state, _ = run(state, PutService(spec=orders_spec()))  # c leaves, b stays
    assert state.snapshot("s1").running  # type: ignore[union-attr]
    state, _ = run(state, PutService(spec=orders_spec(members=[{"name": "a", "address": "127.0.0.1", "port": 9001}])))
    assert state.snapshot("s1").status == "aborted"  # type: ignore[union-attr]
    entry = SnapshotEntry(id="s2", service="orders", member="a", role=Role.PRIMARY, epoch=state.services["orders"].epoch)
    state, (outcome,) = run(state, StartSnapshot(entry=entry, keep=1))
    assert outcome.ok and [s.id for s in state.snapshots] == ["s2"]


# --- the renderer ---------------------------------------------------------------------------


def read_hosts(state: MeshState) -> dict[int, HealthStatus]:
    assignment = render(state)[CLUSTER_LOAD_ASSIGNMENT][naming.read_cluster("orders")]
    assert isinstance(assignment, ClusterLoadAssignment)
    return {
        lb.endpoint.address.socket_address.port_value: lb.health_status  # type: ignore[union-attr]
        for locality in assignment.endpoints for lb in locality.lb_endpoints
    }


def test_a_draining_member_is_draining_in_the_read_cluster_then_absent() -> None:
    state, _ = run(seeded(), StartSnapshot(entry=intent(seeded())))
    assert set(read_hosts(state)) == {9001, 9002, 9003}
    state, _ = run(state, UpdateSnapshot(id="s1", pool="draining"))
    assert read_hosts(state)[9002] == HealthStatus.DRAINING and read_hosts(state)[9003] == HealthStatus.HEALTHY
    state, _ = run(state, UpdateSnapshot(id="s1", pool="out"))
    assert set(read_hosts(state)) == {9001, 9003}
    state, _ = run(state, UpdateSnapshot(id="s1", pool="in", status="failed"))
    assert set(read_hosts(state)) == {9001, 9002, 9003}


# --- member choice --------------------------------------------------------------------------


def test_choice_takes_the_most_caught_up_replica_within_the_bound() -> None:
    svc = seeded().services["orders"]
    reports = {"a": MemberReport(False, 1000), "b": MemberReport(True, 900), "c": MemberReport(True, 990)}
    assert choose_member(svc, reports, 100).member == "c"
    reports["c"] = MemberReport(False, 999)  # down
    assert choose_member(svc, reports, 100).member == "b"
    fallback = choose_member(svc, reports, 50)
    assert fallback.member == "a" and fallback.fallback and "b: 100 bytes behind > lag_bound_bytes 50" in fallback.reason
    assert choose_member(svc, reports, 100, "primary").role is Role.PRIMARY
    assert choose_member(svc, reports, 100, "c").member == "c"
    with pytest.raises(SnapshotRefused) as refused:
        choose_member(svc, reports, 100, "zz")
    assert refused.value.field == "member"


# --- the workflow ---------------------------------------------------------------------------


PLAN = SnapshotPlan(
    snapshot_id="s1", service="orders", member="b", role=Role.REPLICA, epoch=0, kind="redis",
    node="cp-1", pre_hook="pre", post_hook="post", drain_timeout=10, take_timeout=60,
)
RESULT = ActionResult(artifact="file:///x/s1.rdb", point={"offset": "42"}, size_bytes=10)


def answer(action: object, *, hook_ok: bool = True, take_ok: bool = True) -> object:
    if isinstance(action, Commit):
        return Committed(True, 1.0, index=7)
    if isinstance(action, AwaitProxies | AwaitIdle):
        return Done(True, 1.0, "ok")
    if isinstance(action, RunHook):
        return Done(hook_ok if action.which == "pre_hook" else True, 1.0, action.which)
    if isinstance(action, Take):
        return Took(1.0, RESULT) if take_ok else Took(1.0, error="boom")
    raise AssertionError(action)


def drive(wf: SnapshotWorkflow, **kw: bool) -> tuple[list[object], Finished]:
    action = wf.start(0.0)
    seen = []
    while not isinstance(action, Finished):
        seen.append(action)
        action = wf.handle(answer(action, **kw))  # type: ignore[arg-type]
    return seen, action


def names(actions: list[object]) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, Commit):
            cmd = a.command
            out.append("intent" if isinstance(cmd, StartSnapshot) else f"commit:{cmd.pool or cmd.status or '-'}")
        else:
            out.append(getattr(a, "which", type(a).__name__))
    return out


def test_the_workflow_drains_proves_it_then_hooks_and_takes_in_order() -> None:
    actions, end = drive(SnapshotWorkflow(PLAN))
    assert names(actions) == [
        "intent", "commit:draining", "AwaitProxies", "AwaitIdle", "commit:out", "AwaitProxies",
        "commit:-", "pre_hook", "commit:-", "Take", "commit:-", "post_hook", "commit:in",
    ]
    final = actions[-1].command  # type: ignore[attr-defined]
    assert final.status == "completed" and final.pool == "in" and final.undo == ()
    lease = actions[6].command  # type: ignore[attr-defined]
    assert lease.undo == ("post_hook",)  # owed before the pre-hook runs
    assert end.status == "completed"


def test_a_failing_pre_hook_takes_nothing_and_still_returns_the_member() -> None:
    actions, end = drive(SnapshotWorkflow(PLAN), hook_ok=False)
    assert "Take" not in names(actions) and names(actions)[-2:] == ["post_hook", "commit:in"]
    final = actions[-1].command  # type: ignore[attr-defined]
    assert final.status == "failed" and "pre_hook failed" in final.error
    assert end.status == "failed"


def test_an_abort_during_the_take_runs_the_undo_without_completing() -> None:
    wf = SnapshotWorkflow(PLAN)
    action = wf.start(0.0)
    while not isinstance(action, Take):
        action = wf.handle(answer(action))  # type: ignore[arg-type]
    assert wf.abortable
    action = wf.handle(Aborted(2.0, "failover at index 9"))
    assert isinstance(action, RunHook) and action.which == "post_hook"
    action = wf.handle(Done(True, 3.0, "post"))
    assert isinstance(action, Commit) and action.command.status is None and action.command.pool == "in"  # type: ignore[union-attr]
    assert wf.handle(Committed(True, 3.0, 9)) == Finished("aborted", "failover at index 9")


def test_a_refused_completion_is_undone_and_a_lost_undo_is_left_to_the_next_leader() -> None:
    wf = SnapshotWorkflow(PLAN)
    action = wf.start(0.0)
    while not (isinstance(action, Commit) and getattr(action.command, "status", None) == "completed"):
        action = wf.handle(answer(action))  # type: ignore[arg-type]
    action = wf.handle(Committed(False, 2.0, detail="cannot complete: b was replica at epoch 0"))
    assert isinstance(action, Commit) and action.command.status == "failed" and action.command.pool == "in"  # type: ignore[union-attr]
    end = wf.handle(Committed(False, 2.0, detail="not leader"))
    assert isinstance(end, Finished) and end.status == "unknown"


def test_resume_returns_the_member_at_once_then_waits_for_the_lease_before_the_post_hook() -> None:
    entry = SnapshotEntry(id="s1", service="orders", member="b", role=Role.REPLICA, epoch=0, pool="out",
                          undo=("post_hook",), lease_holder="cp-1", lease_until=50.0)
    plan = SnapshotPlan(**{**PLAN.__dict__, "node": "cp-2"})
    wf, action = SnapshotWorkflow.resume(plan, entry, 10.0)
    assert isinstance(action, Commit)
    first = action.command
    assert first.pool == "in" and first.status == "failed" and first.lease_holder == "cp-2"  # type: ignore[union-attr]
    wait = wf.handle(Committed(True, 10.0, 12))
    assert wait.at == 50.0  # type: ignore[union-attr]
    hook = wf.handle(Done(True, 50.0))
    assert isinstance(hook, RunHook) and hook.name == "post"
    last = wf.handle(Done(True, 51.0, "post ok"))
    assert isinstance(last, Commit) and last.command.undo == ()  # type: ignore[union-attr]
    assert wf.handle(Committed(True, 51.0, 13)).status == "failed"  # type: ignore[union-attr]


def test_envoy_cx_active_is_read_per_host_and_a_zero_may_be_left_out() -> None:
    body = {"cluster_statuses": [{"name": "orders-read", "host_statuses": [
        {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9002}},
         "stats": [{"name": "cx_active", "type": "GAUGE", "value": "3"}]},
        {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9003}}, "stats": [{"name": "cx_active"}]},
    ]}]}
    member = THREE.members[1]
    assert cx_active(body, naming.read_cluster("orders"), member) == 3
    assert cx_active(body, naming.read_cluster("orders"), THREE.members[2]) == 0
    assert cx_active(body, naming.read_cluster("orders"), THREE.members[0]) is None


def test_snapshot_settings_are_checked_with_the_field_named(tmp_path: object) -> None:
    from pathlib import Path

    from repstage_mesh.config import ConfigError, load_config

    path = Path(str(tmp_path)) / "c.yaml"
    path.write_text("snapshots: {drain_timeout: -1, envoy_admins: ['nope']}\n")
    with pytest.raises(ConfigError) as bad:
        load_config(str(path))
    text = str(bad.value)
    assert "snapshots.drain_timeout" in text and "snapshots.envoy_admins" in text
    path.write_text("snapshots: {pre_hook: quiesce}\n")
    with pytest.raises(ConfigError) as unknown:
        load_config(str(path))
    assert "snapshots.pre_hook: no hook named 'quiesce'" in str(unknown.value)
    path.write_text("node: {data_dir: /tmp/d}\nsnapshots: {pre_hook: quiesce}\n"
                    "hooks: {quiesce: {command: [/bin/true]}}\n")
    settings = load_config(str(path))
    assert settings.snapshots.pre_hook == "quiesce"
    assert settings.snapshots.storage_uri(settings.node.data_dir) == "file:///tmp/d/snapshots"
