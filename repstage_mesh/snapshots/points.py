"""The leader's consistent points: executes `PointWorkflow`'s actions (`consistent.py`).

- `start` checks the request, chooses each service's member (`choice.py`: a caught-up replica
  by default), commits the intent and answers with it; the rest runs in the background.
- `take_over` (this node starts leading): a point the state shows open (intent or holding)
  that no task here runs is ended: `CLIENT UNPAUSE` on its Redis primaries (Redis ended the
  pause by itself at the window anyway) and `aborted` committed. Its snapshots are ended by the
  `SnapshotRunner`'s own takeover ("interrupted").
- `stop` (leadership lost): the tasks are cancelled, open transfers closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from repstage_mesh.config import SnapshotSettings
from repstage_mesh.config.operator import Secrets
from repstage_mesh.core.errors import MeshError, SnapshotRefused
from repstage_mesh.core.models import (
    Command,
    HoldEntry,
    MeshState,
    Outcome,
    Role,
    ServiceProtocol,
    SnapshotEntry,
)
from repstage_mesh.decide.steps import ProxyAcks
from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotAction, SnapshotTarget
from repstage_mesh.snapshots.actions.redis_point import (
    OpenFork,
    Paused,
    open_fork,
    pause_and_read,
    release,
    unpause,
)
from repstage_mesh.snapshots.choice import MemberReport, choose_member
from repstage_mesh.snapshots.consistent import (
    Action,
    Event,
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
from repstage_mesh.snapshots.edges import target_of
from repstage_mesh.snapshots.workflow import AwaitProxies, Committed, Done, Finished
from repstage_mesh.telemetry import Tracing
from repstage_mesh.telemetry.failover_trace import FailoverTrace
from repstage_mesh.telemetry.metrics import MeshMetrics

__all__ = ["PointDeps", "PointRunner"]

log = logging.getLogger("repstage_mesh.snapshots")

COMMIT_TIMEOUT = 5.0
HELD_KINDS = {ServiceProtocol.REDIS: "redis", ServiceProtocol.HTTP: "http"}


@dataclass
class PointDeps:
    node_id: str
    settings: SnapshotSettings
    state: Callable[[], MeshState]
    commit: Callable[[Command, float], Awaitable[Outcome]]
    await_proxies: Callable[[int, float], Awaitable[ProxyAcks]]
    actions: Callable[[str, str], SnapshotAction]  # (kind, service)
    reports: Callable[[str], Mapping[str, MemberReport]] = lambda _service: {}
    tracing: Tracing = field(default_factory=Tracing.disabled)
    metrics: MeshMetrics | None = None
    secrets: Secrets | None = None


@dataclass
class _Run:
    workflow: PointWorkflow
    trace: FailoverTrace
    forks: dict[str, OpenFork] = field(default_factory=dict)
    paused: dict[str, Paused] = field(default_factory=dict)  # service -> its paused primary
    taken: dict[str, ActionResult | str] = field(default_factory=dict)  # http services, in the hold
    task: asyncio.Task[None] | None = None

    def close(self) -> None:
        for fork in self.forks.values():
            fork.close()
        self.forks.clear()


class PointRunner:
    def __init__(self, deps: PointDeps) -> None:
        self.deps = deps
        self._runs: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def owns(self, snapshot_id: str) -> bool:
        """A snapshot of a point this node runs (the SnapshotRunner leaves it alone)."""
        return any(s.snapshot_id == snapshot_id for r in self._runs.values() for s in r.workflow.plan.services)

    # --- the request ---------------------------------------------------------------------------

    def _services(self, state: MeshState, services: list[str], member: str) -> tuple[ServicePlan, ...]:
        if not services:
            raise SnapshotRefused("invalid", "name at least one service", "services")
        if len(set(services)) != len(services):
            raise SnapshotRefused("invalid", "a service is named twice", "services")
        open_hold = next((h for h in state.holds if h.open), None)
        if open_hold is not None:
            raise SnapshotRefused("conflict", f"consistent point {open_hold.id} is still {open_hold.status}", "services")
        plans = []
        stamp = f"{int(time.time())}-{uuid.uuid4().hex[:6]}"
        for name in services:
            svc = state.service(name)
            if svc is None:
                raise SnapshotRefused("not_found", f"no service named {name!r}", "services")
            kind = HELD_KINDS.get(svc.spec.protocol)
            if kind is None:
                raise SnapshotRefused("invalid", f"{name!r} is a {svc.spec.protocol.value} service: a consistent point "
                                      "holds writes of redis and http services only (README, Honest limits)", "services")
            if svc.primary is None:
                raise SnapshotRefused("conflict", f"{name!r} has no primary (failed closed)", "services")
            running = state.running_snapshot(name)
            if running is not None:
                raise SnapshotRefused("conflict", f"snapshot {running.id} of {name!r} is still running", "services")
            if kind == "redis":
                choice = choose_member(svc, self.deps.reports(name), self.deps.settings.lag_bound_bytes, member)
                chosen, role, reason = choice.member, choice.role, choice.reason
            else:
                chosen, role, reason = svc.primary, Role.PRIMARY, "the primary (http)"
            plans.append(ServicePlan(name, chosen, role, svc.epoch, kind, f"{self.deps.node_id}-{stamp}-{name}", reason))
        return tuple(plans)

    async def start(self, services: list[str], member: str = "replica") -> HoldEntry:
        state = self.deps.state()
        for orphan in [h for h in state.holds if h.open and h.id not in self._runs]:
            await self._resume(orphan)  # left open (its release did not land): end it first
            state = self.deps.state()
        s = self.deps.settings
        plans = self._services(state, services, member)
        hold_id = f"{self.deps.node_id}-point-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        trace = self.deps.tracing.start_snapshot(",".join(services), "consistent-point", hold_id, consistent=True)
        plan = PointPlan(hold_id, self.deps.node_id, plans, s.consistent_hold_ms, take_timeout=s.take_timeout,
                         ack_timeout=s.drain_timeout, keep=s.keep, trace=trace.context())
        wf = PointWorkflow(plan)
        run = _Run(wf, trace)
        self._runs[hold_id] = run
        action = wf.handle(await self._execute(run, wf.start(time.time())))
        if isinstance(action, Finished):
            self._runs.pop(hold_id, None)
            trace.end(error=wf.error)
            raise SnapshotRefused("conflict", wf.error, "services")
        run.task = asyncio.create_task(self._drive(run, action), name=f"point-{hold_id}")
        entry = self.deps.state().hold(hold_id)
        assert entry is not None
        return entry

    # --- leadership ----------------------------------------------------------------------------

    def take_over(self) -> None:
        for entry in self.deps.state().holds:
            if entry.open and entry.id not in self._runs:
                task = asyncio.create_task(self._resume(entry), name=f"point-undo-{entry.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _resume(self, entry: HoldEntry) -> None:
        services, command = resume_hold(entry, self.deps.node_id, time.time())
        redis = tuple(s for s in services if self._kind(s) == "redis")
        detail = await self._unpause(redis)
        log.info("consistent point %s left open by %s: %s", entry.id, entry.leader, detail)
        for _ in range(10):
            done = await self._commit(command)
            now = self.deps.state().hold(entry.id)
            if done.ok or now is None or not now.open:
                return
            await asyncio.sleep(1.0)  # the commit did not land: try again while leading

    async def stop(self) -> None:
        runs, self._runs = list(self._runs.values()), {}
        tasks = [r.task for r in runs if r.task is not None] + list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for run in runs:
            if run.paused:  # cancelled while holding: release now rather than at the window
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await self._unpause(tuple(run.paused), run.paused)
            run.close()
            run.trace.end(error="this node stopped leading")

    # --- execution -----------------------------------------------------------------------------

    async def _drive(self, run: _Run, action: Action) -> None:
        wf = run.workflow
        try:
            while not isinstance(action, Finished):
                action = wf.handle(await self._execute(run, action))
        except Exception:
            log.exception("consistent point %s: the workflow failed", wf.plan.hold_id)
            action = Finished("unknown", "internal error; the next leader ends it")
            with contextlib.suppress(Exception):
                await self._unpause(tuple(run.paused), run.paused)
        finally:
            run.close()
            self._runs.pop(wf.plan.hold_id, None)
        run.trace.end(error=action.error or None)
        if self.deps.metrics is not None:
            self.deps.metrics.observe_consistent_hold(action.status, wf.held_ms / 1000)
            if "consistent_hold" in wf.error:  # the window ended first: the cap was hit
                self.deps.metrics.observe_snapshot_limit("consistent_hold")
        log.info("consistent point %s (%s): %s held %.1f ms %s", wf.plan.hold_id, ",".join(s.service for s in wf.plan.services),
                 action.status, wf.held_ms, action.error)

    async def _execute(self, run: _Run, action: Action) -> Event:
        started = time.time()
        event = await self._io(run, action)
        ok = getattr(event, "ok", not getattr(event, "error", ""))
        detail = getattr(event, "detail", "") or getattr(event, "error", "")
        name = type(action.command).__name__ if isinstance(action, HoldCommit) else type(action).__name__
        run.trace.record(name, start=started, end=time.time(), ok=bool(ok), detail=str(detail))
        return event

    async def _io(self, run: _Run, action: Action) -> Event:
        if isinstance(action, HoldCommit):
            return await self._commit(action.command)
        if isinstance(action, AwaitProxies):
            acks = await self.deps.await_proxies(action.min_index, action.timeout)
            detail = f"{len(acks.acked)} proxies ACKed index {action.min_index}"
            return Done(not acks.missed, time.time(), detail + (f"; missed: {', '.join(acks.missed)}" if acks.missed else ""))
        if isinstance(action, Pause):
            return await self._pause(run, action)
        if isinstance(action, TakePoints):
            return await self._points(run, action.deadline)
        if isinstance(action, Unpause):
            detail = await self._unpause(action.services, run.paused)
            return Done(not detail.startswith("failed"), time.time(), detail)
        if isinstance(action, FinishTakes):
            return await self._finish(run, action.timeout)
        raise TypeError(f"not an action: {action!r}")

    async def _commit(self, command: Any) -> Committed:
        try:
            outcome = await self.deps.commit(command, COMMIT_TIMEOUT)
        except MeshError as exc:
            return Committed(False, time.time(), detail=f"{type(exc).__name__}: {exc}")
        if not outcome.ok:
            return Committed(False, time.time(), detail=outcome.rejection.message if outcome.rejection else "rejected")
        return Committed(True, time.time(), index=self.deps.state().last_change)

    # --- Redis and the takes -------------------------------------------------------------------

    def _kind(self, service: str) -> str | None:
        svc = self.deps.state().service(service)
        return HELD_KINDS.get(svc.spec.protocol) if svc is not None else None

    def _target(self, service: str, member: str, role: Role, snapshot_id: str) -> SnapshotTarget:
        svc = self.deps.state().service(service)
        if svc is None or svc.spec.member(member) is None:
            raise SnapshotRefused("not_found", f"{service}/{member} is gone", "services")
        entry = SnapshotEntry(id=snapshot_id, service=service, member=member, role=role, epoch=svc.epoch)
        return target_of(svc.spec, entry, self.deps.secrets)

    def _primary(self, service: str) -> SnapshotTarget:
        svc = self.deps.state().service(service)
        if svc is None or svc.primary is None:
            raise SnapshotRefused("conflict", f"{service!r} has no primary now", "services")
        return self._target(service, svc.primary, Role.PRIMARY, "pause")

    async def _pause(self, run: _Run, action: Pause) -> Done:
        try:
            targets = [self._primary(s) for s in action.services]
            async with asyncio.timeout(action.ms / 1000):  # a silent primary cannot outlast the window
                paused = await asyncio.gather(*(pause_and_read(t, action.ms) for t in targets))
            run.paused.update(zip(action.services, paused, strict=True))
        except TimeoutError:
            return Done(False, time.time(), f"consistent_hold: CLIENT PAUSE got no answer within the window of {action.ms} ms")
        except Exception as exc:
            return Done(False, time.time(), f"CLIENT PAUSE: {type(exc).__name__}: {exc}")
        return Done(True, time.time(), f"CLIENT PAUSE {action.ms} WRITE on {', '.join(t.member for t in targets)}")

    async def _unpause_one(self, service: str, paused: Paused | None) -> str | None:
        try:
            if paused is not None:
                await release(paused)  # on the pausing connection
            else:
                await unpause(self._primary(service))
        except Exception as exc:  # the pause ends by itself at the window
            return f"{service}: {type(exc).__name__}: {exc}"
        return None

    async def _unpause(self, services: tuple[str, ...], paused: dict[str, Paused] | None = None) -> str:
        held = paused if paused is not None else {}
        answers = await asyncio.gather(*(self._unpause_one(s, held.pop(s, None)) for s in services))
        failed = [a for a in answers if a is not None]
        return f"failed: {'; '.join(failed)} (Redis ends the pause at the window)" if failed else f"CLIENT UNPAUSE on {len(services)} primaries"

    async def _point(self, run: _Run, plan: ServicePlan, deadline: float) -> dict[str, str]:
        held_at = f"{time.time():.6f}"
        if plan.kind == "http":
            target = self._target(plan.service, plan.member, plan.role, plan.snapshot_id)
            try:  # the operator's command (a file-system snapshot) runs while writes are held
                run.taken[plan.service] = await self.deps.actions("tcp", plan.service).take(target, max(0.001, deadline - time.time()))
            except Exception as exc:
                run.taken[plan.service] = f"{type(exc).__name__}: {exc}"
            return {"held_at": held_at}
        replid, offset = run.paused[plan.service].replid, run.paused[plan.service].offset
        member = self._target(plan.service, plan.member, plan.role, plan.snapshot_id)
        fork = run.forks[plan.service] = await open_fork(member, replid, offset, deadline)
        return {"master_replid": fork.replid, "master_repl_offset": str(fork.offset), "held_offset": str(offset),
                "held_at": held_at}

    async def _points(self, run: _Run, deadline: float) -> PointsTaken:
        plans = run.workflow.plan.services
        try:
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                got = await asyncio.gather(*(self._point(run, p, deadline) for p in plans))
        except TimeoutError:
            run.close()
            window = run.workflow.plan.window_ms
            return PointsTaken(time.time(), error=f"consistent_hold: the points were not taken within the window of {window} ms")
        except Exception as exc:
            run.close()
            return PointsTaken(time.time(), error=f"{type(exc).__name__}: {exc}")
        return PointsTaken(time.time(), {p.service: point for p, point in zip(plans, got, strict=True)})

    async def _finish_one(self, plan: ServicePlan, fork: OpenFork, timeout: float) -> ActionResult | str:
        finish = getattr(self.deps.actions("redis", plan.service), "finish_fork", None)
        if finish is None:
            fork.close()
            return "the redis action cannot read a transfer"
        try:
            target = self._target(plan.service, plan.member, plan.role, plan.snapshot_id)
            result: ActionResult = await finish(fork, target, timeout)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return result

    async def _finish(self, run: _Run, timeout: float) -> Taken:
        """The transfers forked at the point, read in parallel now that writes flow again."""
        results: dict[str, ActionResult | str] = dict(run.taken)
        plans = [p for p in run.workflow.plan.services if p.service in run.forks]
        got = await asyncio.gather(*(self._finish_one(p, run.forks.pop(p.service), timeout) for p in plans))
        results.update({p.service: r for p, r in zip(plans, got, strict=True)})
        return Taken(time.time(), results)
