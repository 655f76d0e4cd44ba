"""The leader's snapshot runner against an in-memory replicated state (the real `apply`), a fake
action and real command hooks: completion, a failover's abort, a hanging pre-hook, a takeover."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fakes import eventually
from test_snapshots import THREE

from repstage_mesh.config import SnapshotSettings
from repstage_mesh.core.errors import CommitTimeout
from repstage_mesh.core.models import Command, HookSpec, Member, Outcome, PutService, SetPrimary
from repstage_mesh.core.state import apply, replay
from repstage_mesh.decide.steps import ProxyAcks
from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotTarget
from repstage_mesh.snapshots.choice import MemberReport
from repstage_mesh.snapshots.runner import SnapshotDeps, SnapshotRunner


class Replicated:
    """One state every runner commits to (Raft left out); each applied state reaches them."""

    def __init__(self) -> None:
        self.state, _ = replay([PutService(spec=THREE)])
        self.runners: list[SnapshotRunner] = []
        self.acked: list[int] = []
        self.fail_when: Any = None  # a predicate on the command: that commit times out once

    async def commit(self, command: Command, timeout: float) -> Outcome:
        if self.fail_when is not None and self.fail_when(command):
            self.fail_when = None
            raise CommitTimeout("the commit may or may not have happened")
        self.state, outcome = apply(self.state, command, self.state.index + 1)
        for runner in self.runners:
            runner.on_state(self.state)
        return outcome

    async def await_proxies(self, min_index: int, timeout: float) -> ProxyAcks:
        self.acked.append(min_index)
        return ProxyAcks(acked={"envoy-1#1": 0.0})


class FakeAction:
    """Blocks until released (or forever); records its targets."""

    def __init__(self, block: bool = False) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.block = block
        self.targets: list[SnapshotTarget] = []
        self.cancelled = False

    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult:
        self.targets.append(target)
        self.started.set()
        if self.block:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return ActionResult(artifact=f"file:///snap/{target.snapshot_id}", point={"offset": "7"}, size_bytes=3)


class Counts:
    def __init__(self, *counts: int) -> None:
        self.counts = list(counts)

    async def active(self, service: str, member: Member) -> tuple[int | None, str]:
        return (self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]), "fake counter"


def hooks(tmp_path: Path, pre: str = "exit 0", pre_timeout: float = 1.0) -> dict[str, HookSpec]:
    return {
        "pre": HookSpec(command=("sh", "-c", pre), timeout=pre_timeout),
        "post": HookSpec(command=("sh", "-c", f"echo {{snapshot}} >> {tmp_path}/post"), timeout=1.0),
    }


def runner(
    plane: Replicated, action: FakeAction, tmp_path: Path, node: str = "cp-1", **kw: Any
) -> SnapshotRunner:
    settings = SnapshotSettings(pre_hook="pre", post_hook="post", drain_timeout=kw.pop("drain_timeout", 2.0),
                                take_timeout=kw.pop("take_timeout", 30.0))
    specs = kw.pop("hooks", None) or hooks(tmp_path)
    r = SnapshotRunner(SnapshotDeps(
        node_id=node, settings=settings, state=lambda: plane.state, commit=plane.commit,
        await_proxies=plane.await_proxies, actions=lambda kind, service: action, hooks=specs.get,
        reports=lambda _s: {"a": MemberReport(False, 100), "b": MemberReport(True, 90), "c": MemberReport(True, 99)},
        lease_margin=0.0, **kw,
    ))
    plane.runners.append(r)
    return r


def entry(plane: Replicated, snapshot_id: str) -> Any:
    return plane.state.snapshot(snapshot_id)


async def test_a_snapshot_drains_proves_the_drain_takes_and_returns_the_member(tmp_path: Path) -> None:
    plane, action = Replicated(), FakeAction()
    r = runner(plane, action, tmp_path, connections=Counts(2, 1, 0))
    started = await r.start("orders")
    assert started.member == "c" and started.role.value == "replica" and started.intent_index > 0
    await eventually(lambda: entry(plane, started.id).status != "running", "the snapshot ends")
    await eventually(lambda: not r.running(), "the runner is done")
    done = entry(plane, started.id)
    assert done.status == "completed" and done.pool == "in" and done.undo == ()
    assert done.artifact == f"file:///snap/{started.id}" and done.point == {"offset": "7"}
    assert [s.name for s in done.steps] == [
        "intent", "proxies_acked_draining", "connections_closed", "proxies_acked_removed", "pre_hook", "take", "post_hook",
    ]
    assert action.targets[0].member == "c" and action.targets[0].kind == "tcp"
    assert len(plane.acked) == 2  # the DRAINING version, then the removal, ACKed before any hook
    assert (tmp_path / "post").read_text().split() == [started.id]


async def test_a_failover_during_the_take_aborts_it_and_nothing_completes(tmp_path: Path) -> None:
    plane, action = Replicated(), FakeAction(block=True)
    r = runner(plane, action, tmp_path)
    started = await r.start("orders")
    await asyncio.wait_for(action.started.wait(), 10)
    assert entry(plane, started.id).pool == "out"
    await plane.commit(SetPrimary(service="orders", member="c"), 5.0)  # the snapshotted replica promoted
    aborted = entry(plane, started.id)
    assert aborted.status == "aborted" and aborted.pool == "in"  # in the failover's own entry
    await eventually(lambda: not r.running(), "the runner ran the undo")
    assert action.cancelled
    final = entry(plane, started.id)
    assert final.status == "aborted" and final.undo == () and final.artifact == ""
    assert (tmp_path / "post").read_text().split() == [started.id]


async def test_a_hanging_pre_hook_is_killed_takes_nothing_and_returns_the_member(tmp_path: Path) -> None:
    plane, action = Replicated(), FakeAction()
    r = runner(plane, action, tmp_path, hooks=hooks(tmp_path, pre="sleep 30", pre_timeout=0.3))
    started = await r.start("orders")
    await eventually(lambda: not r.running(), "the runner is done")
    final = entry(plane, started.id)
    assert final.status == "failed" and "pre_hook failed" in final.error and "killed after 0.3 s" in final.error
    assert final.pool == "in" and not action.targets
    assert (tmp_path / "post").exists()


async def test_a_new_leader_undoes_what_the_old_one_left(tmp_path: Path) -> None:
    plane, action = Replicated(), FakeAction(block=True)
    old = runner(plane, action, tmp_path, take_timeout=0.5, drain_timeout=0.5)
    started = await old.start("orders")
    await asyncio.wait_for(action.started.wait(), 10)
    plane.runners.remove(old)
    await old.stop()  # the old leader lost its seat mid-take
    left = entry(plane, started.id)
    assert left.running and left.pool == "out" and left.undo == ("post_hook",)
    new = runner(plane, FakeAction(), tmp_path, node="cp-2", take_timeout=0.5, drain_timeout=0.5)
    new.take_over()
    await eventually(lambda: entry(plane, started.id).pool == "in", "the member is back at once", timeout=1.0)
    assert not (tmp_path / "post").exists()  # the post-hook waits for the old lease
    await eventually(lambda: not new.running(), "the undo finished", timeout=15)
    final = entry(plane, started.id)
    assert final.status == "failed" and "interrupted" in final.error and final.lease_holder == "cp-2"
    assert final.undo == () and (tmp_path / "post").read_text().split() == [started.id]


async def test_a_second_snapshot_of_a_service_is_refused_while_one_runs(tmp_path: Path) -> None:
    from repstage_mesh.core.errors import SnapshotRefused

    plane, action = Replicated(), FakeAction(block=True)
    r = runner(plane, action, tmp_path)
    await r.start("orders")
    with pytest.raises(SnapshotRefused) as refused:
        await r.start("orders")
    assert refused.value.code == "conflict"
    with pytest.raises(SnapshotRefused):
        await r.start("nope")
    await r.stop()


# --- REST ------------------------------------------------------------------------------------


async def test_rest_starts_lists_and_gets_snapshots_and_refuses_bad_input() -> None:
    from aiohttp.test_utils import TestClient, TestServer
    from fakes import FakePlane, FakeSnapshots, orders_spec

    from repstage_mesh.api.app import build_app
    from repstage_mesh.api.snapshots import snapshot_operations

    plane = FakePlane(services=[orders_spec()])
    async with TestClient(TestServer(build_app(plane, extra_operations=snapshot_operations(FakeSnapshots(plane))))) as client:
        started = await client.post("/v1/services/orders/snapshots", json={})
        body = await started.json()
        assert started.status == 202 and body["member"] == "a" and body["status"] == "running"
        assert body["intent_index"] == plane.state().index
        again = await client.post("/v1/services/orders/snapshots", json={"member": "b"})
        assert again.status == 409 and (await again.json())["error"]["code"] == "conflict"
        bad = await client.post("/v1/services/orders/snapshots", json={"member": "B!"})
        assert bad.status == 422 and (await bad.json())["error"]["field"] == "member"
        listed = await (await client.get("/v1/services/orders/snapshots")).json()
        assert [s["id"] for s in listed["snapshots"]] == [body["id"]]
        one = await client.get(f"/v1/services/orders/snapshots/{body['id']}")
        assert one.status == 200 and (await one.json())["epoch"] == body["epoch"]
        assert (await client.get("/v1/services/orders/snapshots/nope")).status == 404
        assert (await client.get("/v1/services/nope/snapshots")).status == 404
        assert (await client.post("/v1/services/nope/snapshots", json={})).status == 404
        openapi = await (await client.get("/openapi.json")).json()
        assert "/v1/services/{name}/snapshots/{id}" in openapi["paths"]


async def test_one_trace_per_snapshot_and_its_metrics(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry

    from repstage_mesh.telemetry import Tracing
    from repstage_mesh.telemetry.metrics import MeshMetrics

    exporter = InMemorySpanExporter()
    tracing = Tracing.setup(None, "cp-1", exporter=exporter)
    registry = CollectorRegistry()
    metrics = MeshMetrics(registry, "cp-1")
    plane = Replicated()
    r = runner(plane, FakeAction(), tmp_path, tracing=tracing, metrics=metrics)
    started = await r.start("orders")
    await eventually(lambda: not r.running(), "the snapshot ends")
    assert tracing.flush()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "snapshot"]
    assert len(roots) == 1 and roots[0].attributes["repstage.snapshot"] == started.id  # type: ignore[index]
    trace_id = roots[0].context.trace_id  # type: ignore[union-attr]
    children = [s.name for s in spans if s.parent is not None and s.context.trace_id == trace_id]  # type: ignore[union-attr]
    assert {"await_proxies", "await_idle", "pre_hook", "take", "post_hook", "raft.commit"} <= set(children)
    assert entry(plane, started.id).trace["traceparent"].split("-")[1] == f"{trace_id:032x}"
    assert registry.get_sample_value("repstage_snapshots_total", {"service": "orders", "status": "completed"}) == 1
    tracing.shutdown()


async def test_an_undo_whose_commit_did_not_land_is_tried_again_while_leading(tmp_path: Path) -> None:
    plane, action = Replicated(), FakeAction()
    r = runner(plane, action, tmp_path, hooks=hooks(tmp_path, pre="exit 1"))
    r.take_over()  # this node leads (nothing to resume yet)
    plane.fail_when = lambda c: getattr(c, "status", None) == "failed"
    started = await r.start("orders")
    await eventually(lambda: entry(plane, started.id).pool == "in" and not r.running(), "the retried undo returns the member")
    final = entry(plane, started.id)
    assert final.status == "failed" and "undo's commit did not land" in final.error and final.undo == ()
    assert [s.name for s in final.steps][-2:] == ["takeover", "post_hook"]  # at least once
    await r.stop()


async def test_an_abort_during_the_pre_hook_lets_it_end_before_the_post_hook(tmp_path: Path) -> None:
    order = tmp_path / "order"
    specs = {"pre": HookSpec(command=("sh", "-c", f"sleep 0.5; echo pre >> {order}"), timeout=5.0),
             "post": HookSpec(command=("sh", "-c", f"echo post >> {order}"), timeout=5.0)}
    plane, action = Replicated(), FakeAction()
    r = runner(plane, action, tmp_path, hooks=specs)
    started = await r.start("orders")
    await eventually(lambda: entry(plane, started.id).undo == ("post_hook",), "the pre-hook is running")
    await plane.commit(SetPrimary(service="orders", member="b"), 5.0)
    assert entry(plane, started.id).status == "aborted"
    await eventually(lambda: not r.running(), "the undo finished")
    assert order.read_text().split() == ["pre", "post"] and not action.targets


def test_the_node_builds_real_actions_with_the_data_dir_resolved(tmp_path: Path) -> None:
    from repstage_mesh.config import SnapshotSettings
    from repstage_mesh.snapshots.registry import UnavailableAction, build_snapshot_action

    redis = build_snapshot_action("redis", SnapshotSettings(), tmp_path)
    assert not isinstance(redis, UnavailableAction)
    assert redis.storage.root == tmp_path.resolve() / "snapshots"  # type: ignore[attr-defined]
    tcp = build_snapshot_action("tcp", SnapshotSettings(), tmp_path)  # no command template
    assert isinstance(tcp, UnavailableAction) and "tcp" in tcp.reason
