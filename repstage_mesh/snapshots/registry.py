"""How the node builds its snapshot parts (`build_snapshots`: the runner, a leader companion of
the engine and an apply listener, and the desk the REST endpoints use), and the actions'
factory: `repstage_mesh.snapshots.actions.build_action(kind, settings)` with the storage's
`<data_dir>` resolved; a kind with no action gets one that fails its take with the reason."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repstage_mesh.config import Settings, SnapshotSettings
from repstage_mesh.core.models import Command, CommandEnvelope, MeshState, Outcome, SnapshotEntry
from repstage_mesh.core.observations import MemberStatus
from repstage_mesh.decide import Decider, ProxyAcks
from repstage_mesh.failover.engine import LeaderEngine
from repstage_mesh.snapshots.actions import build_action, verify_snapshot
from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotAction, SnapshotTarget
from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed
from repstage_mesh.snapshots.actions.scratch import ScratchOptions
from repstage_mesh.snapshots.actions.verify import VerifyResult
from repstage_mesh.snapshots.choice import MemberReport
from repstage_mesh.snapshots.desk import SnapshotDesk
from repstage_mesh.snapshots.drills import DrillDeps, DrillRunner, on_own_loop
from repstage_mesh.snapshots.edges import EnvoyAdminCounters, NoCounters
from repstage_mesh.snapshots.points import PointDeps, PointRunner
from repstage_mesh.snapshots.runner import SnapshotDeps, SnapshotRunner
from repstage_mesh.telemetry import Tracing
from repstage_mesh.telemetry.metrics import MeshMetrics

__all__ = ["SnapshotWiring", "UnavailableAction", "build_snapshot_action", "build_snapshots", "member_reports",
           "restore_drill"]


class UnavailableAction:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult:
        raise RuntimeError(self.reason)


def build_snapshot_action(kind: str, settings: SnapshotSettings, data_dir: str | Path, service: str = "") -> SnapshotAction:
    """The action for members of `kind` (snapshots/actions), storing under `settings.storage`
    with `<data_dir>` resolved; the operator's command template of `service` (or of `kind`),
    `redis_local_rdb` and `pg_bindir` from the settings. A kind with no action (e.g. a tcp
    service without a command template) fails its take with the reason instead of failing the node."""
    resolved = settings.model_copy(update={"storage": settings.storage_uri(data_dir)})
    try:
        return build_action(kind, resolved, command=settings.command_for(service, kind),
                            pg_bindir=settings.pg_bindir, redis_local_rdb=settings.redis_local_rdb)
    except SnapshotActionFailed as exc:
        return UnavailableAction(str(exc))


def restore_drill(settings: SnapshotSettings) -> Callable[[SnapshotEntry], Awaitable[VerifyResult]]:
    """The leader's drill of one snapshot: `verify_snapshot` with the service's ledger from the
    config (never from a request), bounded by `verify.timeout`. It runs on its own event loop in
    a thread of its own, so reading and comparing a large ledger never stalls the node's loop
    (Raft, xDS); a leader that steps down cancels it there (its scratch server is stopped)."""
    v = settings.verify
    options = ScratchOptions(run_as=v.run_as, pg_bindir=settings.pg_bindir, start_timeout=v.start_timeout,
                             pg_user=v.pg_user, redis_server=v.redis_server)

    async def bounded_drill(entry: SnapshotEntry) -> VerifyResult:
        async with asyncio.timeout(v.timeout):
            return await verify_snapshot(entry, v.ledgers.get(entry.service),
                                         s3_endpoint_url=settings.s3_endpoint_url, options=options)

    async def drill(entry: SnapshotEntry) -> VerifyResult:
        return await on_own_loop(lambda: bounded_drill(entry), f"drill-{entry.id}")

    return drill


def member_reports(decider: Decider, service: str) -> dict[str, MemberReport]:
    """What the leader's sources say of each member (healthy replica? offset)."""
    return {
        m: MemberReport(replica=v.status is MemberStatus.REPLICA, offset=v.offset)
        for m, v in decider.member_views(service).items()
    }


@dataclass(frozen=True)
class SnapshotWiring:
    """What the node hands its snapshot parts (`Node.__init__`)."""

    node_id: str
    settings: Settings
    state: Callable[[], MeshState]
    commit: Callable[[CommandEnvelope, float], Awaitable[Outcome]]
    await_proxies: Callable[[int, float], Awaitable[ProxyAcks]]
    decider: Decider
    engine: LeaderEngine
    tracing: Tracing
    metrics: MeshMetrics
    call: Callable[..., Awaitable[Any]]  # api/peers.PeerClient.call
    leader_api: Callable[[Any], str | None]  # Node._leader_api(caller)
    on_apply: Callable[[Callable[[MeshState], None]], None]


def build_snapshots(w: SnapshotWiring) -> tuple[SnapshotRunner, SnapshotDesk]:
    """The runner (only the leader runs it: an engine companion; every applied state reaches it,
    so a failover's abort cancels the running step), the consistent points' runner (another
    companion) and the desk."""
    snap = w.settings.snapshots

    async def commit(command: Command, timeout: float) -> Outcome:
        return await w.commit(CommandEnvelope(command=command, request_id=uuid.uuid4().hex), timeout)

    runner = SnapshotRunner(SnapshotDeps(
        node_id=w.node_id, settings=snap, state=w.state, commit=commit, await_proxies=w.await_proxies,
        actions=lambda kind, service: build_snapshot_action(kind, snap, w.settings.node.data_dir, service),
        hooks=w.settings.hooks.get,
        reports=lambda service: member_reports(w.decider, service),
        connections=EnvoyAdminCounters(snap.envoy_admins) if snap.envoy_admins else NoCounters(),
        tracing=w.tracing, metrics=w.metrics, secrets=w.settings.secret_store(),
    ))
    points = PointRunner(PointDeps(
        node_id=w.node_id, settings=snap, state=w.state, commit=commit, await_proxies=w.await_proxies,
        actions=runner.deps.actions, reports=runner.deps.reports, tracing=w.tracing, metrics=w.metrics,
        secrets=runner.deps.secrets,
    ))
    runner.owned_elsewhere = points.owns
    w.on_apply(runner.on_state)
    w.engine.add_companion(runner.take_over, runner.stop)
    drills = DrillRunner(DrillDeps(node_id=w.node_id, settings=snap, state=w.state, commit=commit,
                                   drill=restore_drill(snap), metrics=w.metrics))
    w.engine.add_companion(drills.take_over, drills.stop)
    w.engine.add_companion(points.take_over, points.stop)
    desk = SnapshotDesk(runner, w.state, w.call, lambda: w.engine.active, w.leader_api, points, drills=drills)
    return runner, desk
