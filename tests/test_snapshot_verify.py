"""Restore drills wired end to end (issue 16, item 6), without servers: the replicated record
(`VerifySnapshot`), the leader's `DrillRunner` with a fake drill, the config fields of the
actions and drills, the REST endpoint's refusals, a follower carrying the request, the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from fakes import FakePlane, FakeSnapshots, LiveApi, eventually
from prometheus_client import CollectorRegistry
from test_snapshots import THREE, seeded

from repstage_mesh.api.app import build_app
from repstage_mesh.api.snapshots import snapshot_operations
from repstage_mesh.cli import main as cli
from repstage_mesh.config import ConfigError, SnapshotSettings, load_config
from repstage_mesh.core.errors import CommitTimeout, SnapshotRefused
from repstage_mesh.core.models import (
    Command,
    MeshState,
    Outcome,
    SnapshotEntry,
    SnapshotVerification,
    StartSnapshot,
    UpdateSnapshot,
    VerifySnapshot,
)
from repstage_mesh.core.state import apply, decode_state, encode_state
from repstage_mesh.snapshots.actions.verify import VerifyResult
from repstage_mesh.snapshots.desk import SnapshotDesk
from repstage_mesh.snapshots.drills import DrillDeps, DrillRunner
from repstage_mesh.snapshots.registry import build_snapshot_action, restore_drill
from repstage_mesh.telemetry.metrics import MeshMetrics


def completed(state: MeshState, snapshot_id: str = "s1", member: str = "b") -> MeshState:
    svc = state.services["orders"]
    entry = SnapshotEntry(id=snapshot_id, service="orders", member=member, role=svc.role_of(member),
                          epoch=svc.epoch, kind="redis")
    for command in (StartSnapshot(entry=entry),
                    UpdateSnapshot(id=snapshot_id, status="completed", artifact="file:///snap",
                                   point={"master_repl_offset": "10"})):
        state, outcome = apply(state, command, state.index + 1)
        assert outcome.ok, outcome
    return state


def drill(name: str, status: str = "running", **kw: Any) -> SnapshotVerification:
    return SnapshotVerification(drill=name, status=status, **kw)  # type: ignore[arg-type]


def verify(state: MeshState, snapshot_id: str, v: SnapshotVerification) -> tuple[MeshState, Outcome]:
    return apply(state, VerifySnapshot(id=snapshot_id, verification=v), state.index + 1)


# --- the state machine --------------------------------------------------------------------------


def test_a_drill_is_recorded_with_a_completed_snapshot_one_at_a_time_and_ended_by_its_own_attempt() -> None:
    state = seeded()
    state, outcome = verify(state, "nope", drill("d0"))
    assert not outcome.ok and outcome.rejection is not None and outcome.rejection.code == "not_found"
    svc = state.services["orders"]
    entry = SnapshotEntry(id="run", service="orders", member="b", role=svc.role_of("b"), epoch=svc.epoch)
    state, _ = apply(state, StartSnapshot(entry=entry), state.index + 1)
    state, outcome = verify(state, "run", drill("d1"))  # still running: nothing to restore yet
    assert not outcome.ok and outcome.rejection is not None and outcome.rejection.field == "id"
    assert state.snapshot("run").verification is None  # type: ignore[union-attr]
    state = apply(state, UpdateSnapshot(id="run", status="failed", pool="in"), state.index + 1)[0]
    state = completed(state)
    before = state.last_change
    state, outcome = verify(state, "s1", drill("d2"))
    assert outcome.ok and state.snapshot("s1").verification.status == "running"  # type: ignore[union-attr]
    assert state.last_change == before  # not a change of routing: no new xDS version
    state, outcome = verify(state, "s1", drill("d3"))  # one drill at a time
    assert not outcome.ok and outcome.rejection is not None and outcome.rejection.code == "conflict"
    state, outcome = verify(state, "s1", drill("d3", "ok"))  # only the running attempt may end
    assert not outcome.ok and outcome.rejection is not None and outcome.rejection.field == "drill"
    state, outcome = verify(state, "s1", drill("d2", "ok", counts={"missing": 0}))
    assert outcome.ok and state.snapshot("s1").verification.status == "ok"  # type: ignore[union-attr]
    state, outcome = verify(state, "s1", drill("d2", "failed"))  # the first end wins
    assert not outcome.ok and state.snapshot("s1").verification.status == "ok"  # type: ignore[union-attr]
    state, outcome = verify(state, "s1", drill("d4"))  # verified again later
    assert outcome.ok
    assert decode_state(encode_state(state)) == state


# --- the leader's drill runner ------------------------------------------------------------------


class Plane:
    def __init__(self, state: MeshState) -> None:
        self.state = state
        self.fail_next = False

    async def commit(self, command: Command, timeout: float) -> Outcome:
        if self.fail_next:
            self.fail_next = False
            raise CommitTimeout("maybe")
        self.state, outcome = apply(self.state, command, self.state.index + 1)
        return outcome


class FakeDrill:
    def __init__(self, result: Any = None, block: bool = False) -> None:
        self.result, self.block = result, block
        self.entries: list[SnapshotEntry] = []
        self.release = asyncio.Event()

    async def __call__(self, entry: SnapshotEntry) -> Any:
        self.entries.append(entry)
        if self.block:
            await self.release.wait()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


OK = VerifyResult(ok=True, kind="redis", artifact="file:///snap", point={}, restored=True, compared=True,
                  comparison={"expected": 300, "matched": 300, "counts": {"missing": 0, "extra": 0, "unexplained": 0},
                              "missing": [], "extra": [], "unexplained": []})
DIFFERS = VerifyResult(ok=False, kind="redis", artifact="file:///snap", point={}, restored=True, compared=True,
                       comparison={"expected": 3, "matched": 1, "counts": {"missing": 1, "extra": 1, "unexplained": 0},
                                   "missing": ["w:2"], "extra": ["w:9"], "unexplained": []},
                       error="the restore differs from the ledger")


def drills(plane: Plane, fake: FakeDrill, node: str = "cp-1", **verify_settings: Any) -> DrillRunner:
    settings = SnapshotSettings()
    settings = settings.model_copy(update={"verify": settings.verify.model_copy(update=verify_settings)})
    metrics = MeshMetrics(CollectorRegistry(), node)
    return DrillRunner(DrillDeps(node_id=node, settings=settings, state=lambda: plane.state, commit=plane.commit,
                                 drill=fake, metrics=metrics))


def sample(runner: DrillRunner, name: str, **labels: str) -> float:
    assert runner.deps.metrics is not None
    value = runner.deps.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def test_a_drill_commits_its_start_then_its_result_and_counts_it() -> None:
    plane, fake = Plane(completed(seeded())), FakeDrill(OK, block=True)
    runner = drills(plane, fake)
    entry = await runner.start("orders", "s1")
    assert entry.verification is not None and entry.verification.status == "running"
    assert entry.verification.node == "cp-1" and entry.verification.requested == "request"
    fake.release.set()
    await eventually(lambda: plane.state.snapshot("s1").verification.status == "ok", "the result is committed")  # type: ignore[union-attr]
    v = plane.state.snapshot("s1").verification  # type: ignore[union-attr]
    assert v is not None and v.compared and v.restored and v.expected == 300 and v.counts["missing"] == 0
    assert v.drill == entry.verification.drill and v.finished_at >= v.started_at
    assert fake.entries[0].artifact == "file:///snap"
    await eventually(lambda: not runner.running(), "the drill task ends")
    assert sample(runner, "repstage_snapshot_verifications_total", service="orders", result="ok") == 1
    assert sample(runner, "repstage_snapshot_verification_duration_seconds_count", service="orders", result="ok") == 1


async def test_a_difference_a_timeout_and_refusals_are_recorded_or_answered() -> None:
    plane = Plane(completed(completed(seeded()), "s2", "c"))
    runner = drills(plane, FakeDrill(DIFFERS))
    await runner.start("orders", "s1")
    await eventually(lambda: plane.state.snapshot("s1").verification.status == "failed", "failed")  # type: ignore[union-attr]
    v = plane.state.snapshot("s1").verification  # type: ignore[union-attr]
    assert v is not None and v.missing == ("w:2",) and v.extra == ("w:9",) and "differs" in v.error
    late = drills(plane, FakeDrill(TimeoutError()), timeout=5.0)
    await late.start("orders", "s2")
    await eventually(lambda: plane.state.snapshot("s2").verification.status == "failed", "timed out")  # type: ignore[union-attr]
    assert "snapshots.verify.timeout" in plane.state.snapshot("s2").verification.error  # type: ignore[union-attr]
    assert sample(late, "repstage_snapshot_limits_total", limit="verify_timeout") == 1
    with pytest.raises(SnapshotRefused) as refused:
        await runner.start("orders", "nope")
    assert refused.value.code == "not_found" and refused.value.field == "id"
    with pytest.raises(SnapshotRefused) as refused:
        await runner.start("other", "s1")  # an id of another service
    assert refused.value.code == "not_found"


async def test_drills_beyond_the_concurrency_are_refused_and_counted() -> None:
    plane, fake = Plane(completed(completed(seeded()), "s2", "c")), FakeDrill(OK, block=True)
    runner = drills(plane, fake)
    await runner.start("orders", "s1")
    index = plane.state.index
    with pytest.raises(SnapshotRefused) as refused:
        await runner.start("orders", "s2")
    assert refused.value.code == "conflict" and "snapshots.verify.concurrency" in str(refused.value)
    assert plane.state.index == index  # nothing committed
    assert sample(runner, "repstage_snapshot_limits_total", limit="verify_concurrency") == 1
    fake.release.set()
    await eventually(lambda: not runner.running(), "the first drill ends")


async def test_a_new_leader_marks_a_drill_it_does_not_run_interrupted_and_the_schedule_runs_it_again() -> None:
    plane, stuck = Plane(completed(seeded())), FakeDrill(OK, block=True)
    old = drills(plane, stuck, node="cp-1")
    old.take_over()
    await old.start("orders", "s1")
    await old.stop()  # the old leader is gone: its drill is cancelled, nothing committed
    assert plane.state.snapshot("s1").verification.status == "running"  # type: ignore[union-attr]
    new = drills(plane, FakeDrill(OK), node="cp-2", every=0.05)  # model_copy: below the config's floor
    new.take_over()
    await eventually(lambda: plane.state.snapshot("s1").verification.node == "cp-2"  # type: ignore[union-attr]
                     and plane.state.snapshot("s1").verification.status == "ok", "the schedule verified it again")  # type: ignore[union-attr]
    assert sample(new, "repstage_snapshot_verifications_total", service="orders", result="interrupted") == 1
    v = plane.state.snapshot("s1").verification  # type: ignore[union-attr]
    assert v is not None and v.requested == "schedule"
    assert new.due() == []  # verified: nothing due until a newer snapshot completes
    plane.state = completed(plane.state, "s3", "c")
    assert [e.id for e in new.due()] == ["s3"]
    await new.stop()


async def test_a_result_whose_commit_timed_out_is_committed_again() -> None:
    plane, fake = Plane(completed(seeded())), FakeDrill(OK, block=True)
    runner = drills(plane, fake)
    runner.take_over()
    await runner.start("orders", "s1")
    plane.fail_next = True
    fake.release.set()
    await eventually(lambda: plane.state.snapshot("s1").verification.status == "ok", "committed on a retry", timeout=5)  # type: ignore[union-attr]
    await runner.stop()


# --- config -------------------------------------------------------------------------------------


def config_problems(tmp_path: Path, snapshots: dict[str, Any]) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path / "d")}, "snapshots": snapshots}))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    return str(err.value)


def test_the_actions_and_drills_fields_are_validated_naming_the_field(tmp_path: Path) -> None:
    text = config_problems(tmp_path, {
        "commands": {"orders": ["zfs", "snapshot", "tank@{nope}"], "tcp": []},
        "pg_bindir": "usr/lib/postgresql/15/bin",
        "verify": {"ledgers": {"cache": "ledger.jsonl", "Bad_Name": "/x"}, "every": 1, "run_as": "root; rm",
                   "start_timeout": 0, "concurrency": 0, "bogus": 1, "redis_server": "redis-server"},
    })
    for field in ("snapshots.commands.orders", "snapshots.commands.tcp", "snapshots.pg_bindir",
                  "snapshots.verify.ledgers.cache", "snapshots.verify.every", "snapshots.verify.run_as",
                  "snapshots.verify.start_timeout", "snapshots.verify.concurrency", "snapshots.verify.bogus",
                  "snapshots.verify.redis_server"):
        assert field in text, (field, text)
    assert "unknown placeholder ['nope']" in text and "absolute path" in text


def test_defaults_and_a_good_config(tmp_path: Path) -> None:
    s = SnapshotSettings()
    assert (s.verify.every, s.verify.timeout, s.verify.start_timeout, s.verify.run_as, s.verify.ledgers) == (
        None, 1800.0, 120.0, None, {})
    assert (s.redis_local_rdb, s.pg_bindir, s.commands) == (False, None, {})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path / "d")}, "snapshots": {
        "commands": {"tcp": ["zfs", "snapshot", "tank/{service}@{snapshot_id}"]}, "redis_local_rdb": True,
        "verify": {"ledgers": {"cache": "/var/lib/app/ledger.jsonl"}, "every": 3600, "run_as": "postgres"}}}))
    loaded = load_config(path, env={}).snapshots
    assert loaded.verify.ledgers == {"cache": "/var/lib/app/ledger.jsonl"} and loaded.verify.every == 3600


def test_the_node_builds_actions_from_the_config_fields(tmp_path: Path) -> None:
    s = SnapshotSettings(commands={"orders": ("zfs", "snapshot", "o@{snapshot_id}"), "tcp": ("btrfs", "{member}")},
                         redis_local_rdb=True, pg_bindir="/opt/pg/bin")
    assert build_snapshot_action("tcp", s, tmp_path, "orders").template[0] == "zfs"  # type: ignore[attr-defined]
    assert build_snapshot_action("tcp", s, tmp_path, "web").template[0] == "btrfs"  # type: ignore[attr-defined]
    assert build_snapshot_action("redis", s, tmp_path, "cache").local_rdb  # type: ignore[attr-defined]
    assert build_snapshot_action("postgres", s, tmp_path, "db").bindir == "/opt/pg/bin"  # type: ignore[attr-defined]


async def test_the_drill_uses_the_configured_ledger_of_the_service_only(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, Any]] = []

    async def fake_verify(entry: Any, ledger: Any, **kw: Any) -> VerifyResult:
        seen.append((ledger, kw["options"]))
        return OK

    monkeypatch.setattr("repstage_mesh.snapshots.registry.verify_snapshot", fake_verify)
    s = SnapshotSettings(pg_bindir="/opt/pg/bin", verify={"ledgers": {"orders": "/l/orders.jsonl"},  # type: ignore[arg-type]
                                                          "run_as": "pgscratch", "start_timeout": 7, "pg_user": "admin"})
    run = restore_drill(s)
    state = completed(seeded())
    assert (await run(state.snapshot("s1"))).ok  # type: ignore[arg-type]
    other = state.snapshot("s1").model_copy(update={"service": "cache"})  # type: ignore[union-attr]
    await run(other)
    assert [ledger for ledger, _ in seen] == ["/l/orders.jsonl", None]
    options = seen[0][1]
    assert (options.run_as, options.pg_bindir, options.start_timeout, options.pg_user) == (
        "pgscratch", "/opt/pg/bin", 7, "admin")


# --- REST, forwarding, CLI ----------------------------------------------------------------------


async def error_of(resp: Any, status: int, field: str | None) -> dict[str, Any]:
    body = await resp.json()
    assert resp.status == status, body
    assert body["error"]["field"] == field, body
    return dict(body["error"])


async def test_the_endpoint_refuses_bad_input_and_changes_nothing() -> None:
    plane = FakePlane(services=[THREE])
    plane._state = completed(plane.state())  # a completed snapshot s1 of orders
    snaps = FakeSnapshots(plane)
    async with TestClient(TestServer(build_app(plane, None, snapshot_operations(snaps)))) as client:
        before = plane.state()
        url = "/v1/services/orders/snapshots/s1/verify"
        error = await error_of(await client.post(url, json={"ledger": "/etc/shadow"}), 422, "ledger")
        assert "ledger" in error["message"]
        await error_of(await client.post("/v1/services/orders/snapshots/bad%20id/verify"), 422, "id")
        await error_of(await client.post("/v1/services/orders/snapshots/nope/verify"), 404, "id")
        await error_of(await client.post("/v1/services/Bad/snapshots/s1/verify"), 404, "name")
        assert plane.state() == before
        resp = await client.post(url)
        assert resp.status == 202 and (await resp.json())["verification"]["status"] == "running"
        await error_of(await client.post(url), 409, "id")  # one drill at a time
        got = await (await client.get("/v1/services/orders/snapshots/s1")).json()
        assert got["verification"]["status"] == "running"


async def test_a_follower_carries_the_drill_to_the_leader_with_the_callers_authorization() -> None:
    calls: list[tuple[Any, ...]] = []

    async def call(api: str, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        calls.append((api, method, path, body, kw.get("authorization")))
        return {"id": "x/1"}

    class Caller:
        authorization = "Bearer t"

    desk = SnapshotDesk(None, lambda: MeshState(), call, lambda: False, lambda _c: "10.0.0.2:8080")  # type: ignore[arg-type]
    assert await desk.verify("orders", "x/1", Caller()) == {"id": "x/1"}
    assert calls == [("10.0.0.2:8080", "POST", "/v1/services/orders/snapshots/x%2F1/verify", None, "Bearer t")]


def test_cli_snapshot_verify_follows_the_drill_until_it_ends(capsys: pytest.CaptureFixture[str]) -> None:
    import threading
    import time

    plane = FakePlane(services=[THREE])
    plane._state = completed(plane.state())
    with LiveApi(plane, extra_operations=snapshot_operations(FakeSnapshots(plane))) as live:

        def finish() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                v = plane.state().snapshot("s1").verification  # type: ignore[union-attr]
                if v is not None:
                    ended = v.model_copy(update={"status": "ok", "restored": True, "compared": True, "expected": 5,
                                                 "matched": 5, "counts": {"missing": 0, "extra": 0, "unexplained": 0}})
                    asyncio.run_coroutine_threadsafe(
                        plane.submit(VerifySnapshot(id="s1", verification=ended)), live.loop).result(5)
                    return
                time.sleep(0.01)

        helper = threading.Thread(target=finish)
        helper.start()
        code = cli.main(["snapshot", "verify", "orders", "s1", "--api", live.url])
        helper.join()
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "ok" in out and "5/5 matched, 0 missing, 0 extra, 0 unexplained" in out
        code = cli.main(["snapshots", "orders", "s1", "--api", live.url])
        assert code == 0 and "verify drill-" in capsys.readouterr().out
        code = cli.main(["snapshots", "orders", "--api", live.url])
        listed = capsys.readouterr().out  # the status cell may wrap between its words
        assert code == 0 and "(verify:" in listed and "ok)" in listed
        code = cli.main(["--json", "snapshots", "orders", "s1", "--api", live.url])
        assert code == 0 and json.loads(capsys.readouterr().out)["verification"]["status"] == "ok"
        code = cli.main(["snapshot", "verify", "orders", "--api", live.url])  # the ID is missing
        assert code == 1 and "snapshot verify SERVICE ID" in capsys.readouterr().err
        code = cli.main(["snapshot", "verify", "orders", "nope", "--api", live.url])
        assert code == 1 and "nope" in capsys.readouterr().err


def test_the_composition_root_hands_the_runner_the_configured_actions_and_the_desk_its_drills(tmp_path: Path) -> None:
    from repstage_mesh.node import Node

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"id": "cp-1", "data_dir": str(tmp_path / "d")},
        "snapshots": {"commands": {"orders": ["zfs", "snapshot", "t@{snapshot_id}"]}, "redis_local_rdb": True},
    }))
    node = Node(load_config(path, env={}))
    assert node.snapshots.deps.actions("tcp", "orders").template[0] == "zfs"  # type: ignore[attr-defined]
    assert node.snapshots.deps.actions("redis", "cache").local_rdb  # type: ignore[attr-defined]
    assert node.snapshot_desk.drills is not None


async def test_work_on_its_own_loop_answers_raises_and_is_cancelled_there() -> None:
    import threading

    from repstage_mesh.snapshots.drills import on_own_loop

    async def answer() -> str:
        return threading.current_thread().name

    assert await on_own_loop(answer, "drill-x") == "drill-x"

    async def fail() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await on_own_loop(fail, "drill-y")
    started, cleaned = threading.Event(), threading.Event()

    async def hang() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()  # a scratch server's context manager stops it here

    waiting = asyncio.ensure_future(on_own_loop(hang, "drill-z"))
    await eventually(started.is_set, "the work started on its loop")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await eventually(cleaned.is_set, "the work was cancelled on its own loop")


def test_validate_refuses_programs_that_are_not_there(tmp_path: Path) -> None:
    from repstage_mesh.config.startup import startup_problems

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path / "d")}, "snapshots": {
        "pg_bindir": str(tmp_path / "no-pg"), "verify": {"redis_server": str(tmp_path)}}}))
    fields = [field for field, _ in startup_problems(load_config(path, env={}), env={})]
    assert fields == ["snapshots.pg_bindir", "snapshots.verify.redis_server"]
    path.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path / "d")}, "snapshots": {
        "pg_bindir": str(tmp_path), "verify": {"redis_server": "/bin/sh"}}}))
    assert startup_problems(load_config(path, env={}), env={}) == []
