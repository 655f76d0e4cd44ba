"""The leader's snapshot runner: executes `SnapshotWorkflow`'s actions (commits, proxy waits,
connection counts, hooks, the action), one task per snapshot.

- `start` chooses the member (`choice.py`), commits the intent and answers with the entry; the
  rest runs in the background.
- `on_state` (every applied state): a running snapshot the state shows aborted (a failover
  fenced it) gets its current action cancelled and its workflow the `Aborted` event.
- `take_over` (when this node starts leading): every snapshot the state shows running or owing
  an undo that no task here runs is resumed (`SnapshotWorkflow.resume`).
- `stop` (leadership lost): the tasks are cancelled; the next leader undoes what is left.
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
    HookSpec,
    MeshState,
    Outcome,
    ServiceSpec,
    SnapshotEntry,
)
from repstage_mesh.decide.steps import ProxyAcks
from repstage_mesh.failover.timeouts import bounded
from repstage_mesh.snapshots.actions.base import SnapshotAction
from repstage_mesh.snapshots.choice import MemberReport, choose_member
from repstage_mesh.snapshots.edges import (
    ConnectionCounter,
    NoCounters,
    hook_values,
    run_hook,
    target_of,
)
from repstage_mesh.snapshots.workflow import (
    Aborted,
    Action,
    AwaitIdle,
    AwaitProxies,
    Commit,
    Committed,
    Done,
    Event,
    Finished,
    RunHook,
    SnapshotPlan,
    SnapshotWorkflow,
    Take,
    Took,
    WaitUntil,
)
from repstage_mesh.telemetry import Tracing
from repstage_mesh.telemetry.failover_trace import FailoverTrace
from repstage_mesh.telemetry.metrics import MeshMetrics

__all__ = ["SnapshotDeps", "SnapshotRunner"]

log = logging.getLogger("repstage_mesh.snapshots")

COMMIT_TIMEOUT = 5.0
_SPAN_NAMES = {Commit: "raft.commit", AwaitProxies: "await_proxies", AwaitIdle: "await_idle", Take: "take",
               WaitUntil: "await_previous_lease"}
RETRY_UNDO = 1.0  # seconds before an undo whose commit did not land is tried again
IDLE_POLL = 0.05  # seconds between looks at Envoy's counters while connections remain


@dataclass
class SnapshotDeps:
    """What the runner may use of the node (the composition root wires them)."""

    node_id: str
    settings: SnapshotSettings
    state: Callable[[], MeshState]
    commit: Callable[[Command, float], Awaitable[Outcome]]
    await_proxies: Callable[[int, float], Awaitable[ProxyAcks]]
    actions: Callable[[str, str], SnapshotAction]  # (kind, service)
    hooks: Callable[[str], HookSpec | None]
    reports: Callable[[str], Mapping[str, MemberReport]] = lambda _service: {}
    connections: ConnectionCounter = field(default_factory=NoCounters)
    tracing: Tracing = field(default_factory=Tracing.disabled)
    metrics: MeshMetrics | None = None
    secrets: Secrets | None = None
    lease_margin: float = 2 * COMMIT_TIMEOUT  # added to the lease beyond the steps' own timeouts


@dataclass
class _Run:
    workflow: SnapshotWorkflow
    trace: FailoverTrace
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    task: asyncio.Task[None] | None = None


class SnapshotRunner:
    def __init__(self, deps: SnapshotDeps) -> None:
        self.deps = deps
        self._runs: dict[str, _Run] = {}
        self._leading = False
        self.owned_elsewhere: Callable[[str], bool] = lambda _id: False  # a consistent point's snapshots

    # --- requests ------------------------------------------------------------------------------

    def _plan(self, entry_id: str, service: str, member: str, **fields: Any) -> SnapshotPlan:
        s = self.deps.settings
        hook_timeout = sum(h.timeout for h in (self.deps.hooks(n) for n in (s.pre_hook, s.post_hook) if n) if h)
        return SnapshotPlan(
            snapshot_id=entry_id, service=service, member=member, node=self.deps.node_id,
            pre_hook=s.pre_hook, post_hook=s.post_hook, drain_timeout=s.drain_timeout,
            take_timeout=s.take_timeout, keep=s.keep,
            lease_seconds=s.drain_timeout * 2 + s.take_timeout + hook_timeout + self.deps.lease_margin, **fields,
        )

    async def start(self, service: str, ask: str = "replica") -> SnapshotEntry:
        """Choose the member, commit the intent, run the rest in the background; the entry."""
        state = self.deps.state()
        svc = state.service(service)
        if svc is None:
            raise SnapshotRefused("not_found", f"no service named {service!r}", "service")
        running = state.running_snapshot(service)
        if running is not None:
            raise SnapshotRefused("conflict", f"snapshot {running.id} of {service!r} is still running", "service")
        choice = choose_member(svc, self.deps.reports(service), self.deps.settings.lag_bound_bytes, ask)
        if choice.fallback and self.deps.metrics is not None:
            self.deps.metrics.observe_snapshot_limit("lag_bound")
        snapshot_id = f"{self.deps.node_id}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        trace = self.deps.tracing.start_snapshot(service, choice.member, snapshot_id, role=choice.role.value)
        kind = svc.spec.protocol.value if svc.spec.protocol.value in ("redis", "postgres") else "tcp"
        plan = self._plan(
            snapshot_id, service, choice.member, role=choice.role, epoch=svc.epoch, kind=kind,
            requested=f"{ask}: {choice.reason}"[:64], trace=trace.context(),
        )
        wf = SnapshotWorkflow(plan)
        run = _Run(wf, trace)
        self._runs[snapshot_id] = run
        first = await self._execute(run, wf.start(time.time()))
        action = wf.handle(first)
        if isinstance(action, Finished):
            self._runs.pop(snapshot_id, None)
            trace.end(error=wf.error)
            raise SnapshotRefused("conflict", wf.error, "member")
        run.task = asyncio.create_task(self._drive(run, action), name=f"snapshot-{snapshot_id}")
        entry = self.deps.state().snapshot(snapshot_id)
        assert entry is not None
        return entry

    def running(self) -> list[str]:
        return sorted(self._runs)

    # --- state and leadership ------------------------------------------------------------------

    def on_state(self, state: MeshState) -> None:
        for snapshot_id, run in list(self._runs.items()):
            entry = state.snapshot(snapshot_id)
            if entry is not None and entry.status == "aborted" and not run.abort.is_set():
                run.reason = entry.error
                run.abort.set()

    def take_over(self, lease_over: tuple[str, ...] = ()) -> None:
        """Resume every snapshot the state shows unfinished (running, or an undo owed) that no
        task of this node runs: return its member, take its lease, run its owed post-hook (after
        the old lease, except for the ids in `lease_over`, whose run ended here)."""
        self._leading = True
        for entry in self.deps.state().snapshots:
            if entry.id in self._runs or self.owned_elsewhere(entry.id) or not (entry.running or entry.undo or entry.pool != "in"):
                continue
            trace = self.deps.tracing.start_snapshot(entry.service, entry.member, entry.id, resumed=True)
            plan = self._plan(entry.id, entry.service, entry.member, role=entry.role, epoch=entry.epoch, kind=entry.kind)
            wf, action = SnapshotWorkflow.resume(plan, entry, time.time(), lease_over=entry.id in lease_over)
            run = _Run(wf, trace)
            self._runs[entry.id] = run
            run.task = asyncio.create_task(self._drive(run, action), name=f"snapshot-undo-{entry.id}")

    async def stop(self) -> None:
        self._leading = False
        runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            if run.task is not None:
                run.task.cancel()
        for run in runs:
            if run.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run.task
            run.trace.end(error="this node stopped leading")

    # --- execution -----------------------------------------------------------------------------

    async def _drive(self, run: _Run, action: Action) -> None:
        wf = run.workflow
        try:
            while not isinstance(action, Finished):
                if run.abort.is_set() and wf.abortable:
                    action = wf.handle(Aborted(time.time(), run.reason))
                    continue
                event = await self._execute(run, action)
                action = wf.handle(event)
        except Exception:
            log.exception("snapshot %s: the workflow failed", wf.plan.snapshot_id)
            action = Finished("unknown", "internal error; the next leader undoes it")
        finally:
            self._runs.pop(wf.plan.snapshot_id, None)
        assert isinstance(action, Finished)
        if action.status == "unknown" and self._leading:
            # The undo's last commit did not land (a commit timeout while still leading): try
            # again, as a new leader would, until the state shows the member back.
            asyncio.get_running_loop().call_later(RETRY_UNDO, self.take_over, (wf.plan.snapshot_id,))
        seconds = run.trace.end(error=action.error or None)
        if self.deps.metrics is not None:
            self.deps.metrics.observe_snapshot(wf.plan.service, action.status, seconds)
        log.info("snapshot %s of %s/%s: %s %s", wf.plan.snapshot_id, wf.plan.service, wf.plan.member,
                 action.status, action.error)

    async def _execute(self, run: _Run, action: Action) -> Event:
        started = time.time()
        if isinstance(action, Commit):
            event: Event = await self._commit(action)
        elif run.workflow.abortable and not isinstance(action, RunHook):
            # A hook is never cut short by an abort (it runs to its end or its timeout): the
            # post-hook must not start while the pre-hook still runs.
            event = await self._abortable(run, action)
        else:
            event = await self._io(run, action)
        name = getattr(action, "which", None) or _SPAN_NAMES.get(type(action), type(action).__name__)
        ok = getattr(event, "ok", not isinstance(event, Aborted) and getattr(event, "result", None) is not None)
        run.trace.record(str(name), start=started, end=time.time(), ok=bool(ok),
                         detail=getattr(event, "detail", "") or getattr(event, "error", "") or getattr(event, "reason", ""))
        return event

    async def _abortable(self, run: _Run, action: Action) -> Event:
        work = asyncio.ensure_future(self._io(run, action))
        aborted = asyncio.ensure_future(run.abort.wait())
        try:
            await asyncio.wait({work, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        return Aborted(time.time(), run.reason)

    async def _commit(self, action: Commit) -> Committed:
        try:
            outcome = await self.deps.commit(action.command, COMMIT_TIMEOUT)
        except MeshError as exc:
            return Committed(False, time.time(), detail=f"{type(exc).__name__}: {exc}")
        if not outcome.ok:
            rejection = outcome.rejection
            return Committed(False, time.time(), detail=rejection.message if rejection else "rejected")
        if outcome.result.get("dropped") and self.deps.metrics is not None:
            self.deps.metrics.observe_snapshot_limit("keep")
        return Committed(True, time.time(), index=self.deps.state().last_change)

    async def _io(self, run: _Run, action: Action) -> Event:
        if isinstance(action, AwaitProxies):
            acks = await self.deps.await_proxies(action.min_index, action.timeout)
            if acks.missed and self.deps.metrics is not None:
                self.deps.metrics.observe_snapshot_limit("drain_timeout")
            detail = f"{len(acks.acked)} proxies ACKed index {action.min_index}"
            return Done(not acks.missed, time.time(), detail + (f"; missed: {', '.join(acks.missed)}" if acks.missed else ""))
        if isinstance(action, AwaitIdle):
            return await self._await_idle(run, action.timeout)
        if isinstance(action, RunHook):
            return await self._hook(run, action)
        if isinstance(action, Take):
            return await self._take(run, action)
        if isinstance(action, WaitUntil):
            await asyncio.sleep(max(0.0, action.at - time.time()))  # the previous leader's lease
            return Done(True, time.time(), "previous lease over")
        raise TypeError(f"not an action: {action!r}")

    async def _await_idle(self, run: _Run, timeout: float) -> Done:
        plan = run.workflow.plan
        svc = self.deps.state().service(plan.service)
        member = svc.spec.member(plan.member) if svc is not None else None
        if member is None:
            return Done(False, time.time(), f"{plan.member!r} is no longer a member")
        deadline = time.monotonic() + timeout
        while True:
            count, detail = await self.deps.connections.active(plan.service, member)
            if count == 0:
                return Done(True, time.time(), detail)
            if time.monotonic() >= deadline:
                if self.deps.metrics is not None:
                    self.deps.metrics.observe_snapshot_limit("drain_timeout")
                return Done(False, time.time(), f"after {timeout:g} s: {detail}")
            await asyncio.sleep(IDLE_POLL)  # Envoy's counters have no change feed

    def _entry_and_spec(self, run: _Run) -> tuple[SnapshotEntry, ServiceSpec] | None:
        state = self.deps.state()
        entry = state.snapshot(run.workflow.plan.snapshot_id)
        svc = state.service(run.workflow.plan.service)
        return (entry, svc.spec) if entry is not None and svc is not None else None

    async def _hook(self, run: _Run, action: RunHook) -> Done:
        spec = self.deps.hooks(action.name)
        if spec is None:
            return Done(False, time.time(), f"{action.which}: no hook named {action.name!r} in hooks:")
        found = self._entry_and_spec(run)
        if found is None:
            return Done(False, time.time(), f"{action.which}: the snapshot or its service is gone")
        result = await run_hook(spec, hook_values(found[1], found[0]), self.deps.secrets, name=action.name)
        return Done(result.ok, time.time(), f"{action.which}: {result.detail}")

    async def _take(self, run: _Run, action: Take) -> Took:
        found = self._entry_and_spec(run)
        if found is None:
            return Took(time.time(), error="the snapshot or its service is gone")
        entry, service_spec = found
        try:
            taker = self.deps.actions(entry.kind, entry.service)
            target = target_of(service_spec, entry, self.deps.secrets)
            result = await bounded(taker.take(target, action.timeout), action.timeout)
        except TimeoutError:
            if self.deps.metrics is not None:
                self.deps.metrics.observe_snapshot_limit("take_timeout")
            return Took(time.time(), error=f"take_timeout: no result within {action.timeout:g} s")
        except Exception as exc:
            return Took(time.time(), error=f"{type(exc).__name__}: {exc}")
        return Took(time.time(), result=result)
