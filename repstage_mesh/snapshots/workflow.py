"""The snapshot workflow, sans-IO: events in, actions out (one action at a time).

The Raft leader runs one `SnapshotWorkflow` per snapshot (`snapshots/runner.py` executes its
actions). Every step is committed to the replicated state before the next one starts:

    intent (StartSnapshot: member, role, epoch; its Raft index)
    pool=draining   → every proxy of every node ACKed → the member's connections are 0
    pool=out        → every proxy ACKed → undo leased ("post_hook" owed, lease_until)
    pre_hook        → take (the action)  → post_hook
    completed + pool=in (refused by the state machine if role or epoch changed: fencing)

Anything that fails, or an abort committed by a failover (`Aborted`), goes to the undo: the
post-hook if it is owed, then one commit that returns the member to the pool and clears the
lease. `SnapshotWorkflow.resume` is the undo of a snapshot another leader ran: take the lease
and return the member at once, wait until the old lease ends, then run the owed post-hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from repstage_mesh.core.models import (
    Role,
    SnapshotEntry,
    SnapshotStatus,
    SnapshotStep,
    StartSnapshot,
    UpdateSnapshot,
)
from repstage_mesh.snapshots.actions.base import ActionResult

__all__ = [
    "Aborted",
    "AwaitIdle",
    "AwaitProxies",
    "Commit",
    "Committed",
    "Done",
    "Finished",
    "Phase",
    "RunHook",
    "SnapshotPlan",
    "SnapshotWorkflow",
    "Take",
    "Took",
    "WaitUntil",
]

POST_HOOK = "post_hook"


# --- actions (what the runner must do) -------------------------------------------------------


@dataclass(frozen=True)
class Commit:
    command: StartSnapshot | UpdateSnapshot


@dataclass(frozen=True)
class AwaitProxies:
    min_index: int
    timeout: float


@dataclass(frozen=True)
class AwaitIdle:
    """Until the member's active connections through every Envoy are 0."""

    timeout: float


@dataclass(frozen=True)
class RunHook:
    name: str
    which: str  # "pre_hook" | "post_hook"


@dataclass(frozen=True)
class Take:
    timeout: float


@dataclass(frozen=True)
class WaitUntil:
    """Until wall-clock time `at` (the previous leader's lease)."""

    at: float


@dataclass(frozen=True)
class Finished:
    status: str  # a SnapshotStatus, or "unknown" when the last commit did not land
    error: str = ""


Action = Commit | AwaitProxies | AwaitIdle | RunHook | Take | WaitUntil | Finished


# --- events (what happened) ------------------------------------------------------------------


@dataclass(frozen=True)
class Committed:
    ok: bool
    now: float
    index: int = 0
    detail: str = ""


@dataclass(frozen=True)
class Done:
    """The end of AwaitProxies, AwaitIdle, RunHook or WaitUntil."""

    ok: bool
    now: float
    detail: str = ""


@dataclass(frozen=True)
class Took:
    now: float
    result: ActionResult | None = None
    error: str = ""


@dataclass(frozen=True)
class Aborted:
    """The replicated state shows the snapshot aborted (a failover fenced it)."""

    now: float
    reason: str


Event = Committed | Done | Took | Aborted


class Phase(StrEnum):
    INTENT = "intent"
    DRAIN = "drain"
    ACK_DRAINING = "ack_draining"
    IDLE = "idle"
    REMOVE = "remove"
    ACK_REMOVED = "ack_removed"
    LEASE = "lease"
    PRE_HOOK = "pre_hook"
    RECORD_PRE = "record_pre_hook"
    TAKE = "take"
    RECORD_TAKE = "record_take"
    POST_HOOK = "post_hook"
    FINISH = "finish"
    RESUME = "resume"
    RESUME_WAIT = "resume_wait"
    UNDO_HOOK = "undo_post_hook"
    UNDO_FINISH = "undo_finish"
    DONE = "done"


_UNDO_PHASES = {Phase.UNDO_HOOK, Phase.UNDO_FINISH, Phase.RESUME, Phase.RESUME_WAIT, Phase.DONE, Phase.FINISH}


@dataclass(frozen=True)
class SnapshotPlan:
    """What one snapshot is to do (fixed at its start)."""

    snapshot_id: str
    service: str
    member: str
    role: Role
    epoch: int
    kind: str
    node: str
    requested: str = "replica"
    pre_hook: str | None = None
    post_hook: str | None = None
    drain_timeout: float = 30.0
    take_timeout: float = 600.0
    lease_seconds: float = 660.0
    keep: int = 100
    trace: dict[str, str] | None = None


@dataclass
class SnapshotWorkflow:
    plan: SnapshotPlan
    phase: Phase = Phase.INTENT
    status: SnapshotStatus = "running"
    error: str = ""
    owes_post_hook: bool = False
    aborted: bool = False
    pending: list[SnapshotStep] = field(default_factory=list)
    drain_deadline: float = 0.0
    resume_at: float = 0.0

    # --- entry points --------------------------------------------------------------------------

    def start(self, now: float) -> Action:
        plan = self.plan
        entry = SnapshotEntry(
            id=plan.snapshot_id, service=plan.service, member=plan.member, role=plan.role,
            epoch=plan.epoch, kind=plan.kind, requested=plan.requested, lease_holder=plan.node,
            lease_until=now + plan.lease_seconds, trace=plan.trace,
            steps=(SnapshotStep(name="intent", at=now, ok=True, detail=f"by {plan.node}"),),
        )
        self.phase = Phase.INTENT
        return Commit(StartSnapshot(entry=entry, keep=plan.keep))

    @classmethod
    def resume(
        cls, plan: SnapshotPlan, entry: SnapshotEntry, now: float, lease_over: bool = False
    ) -> tuple[SnapshotWorkflow, Action]:
        """The undo of `entry`, which another leader (or this node's own run, cancelled or
        unable to commit) may have left half done. `lease_over`: nothing that held the lease can
        still act (its run ended here), so the owed post-hook need not wait for `lease_until`."""
        wf = cls(plan=plan, phase=Phase.RESUME)
        wf.owes_post_hook = POST_HOOK in entry.undo and plan.post_hook is not None
        wf.resume_at = now if lease_over else entry.lease_until
        wf.aborted = entry.status == "aborted"
        wf.status = "failed" if entry.running else entry.status
        why = ("its undo's commit did not land; undone again" if entry.lease_holder == plan.node
               else f"leader {entry.lease_holder or '?'} stopped leading")
        wf.error = f"interrupted: {why}" if entry.running else entry.error
        step = SnapshotStep(name="takeover", at=now, ok=True, detail=f"{plan.node} took over from {entry.lease_holder or '?'}")
        command = UpdateSnapshot(
            id=entry.id, status="failed" if entry.running else None, pool="in",
            error=wf.error if entry.running else None, lease_holder=plan.node, steps=(step,),
        )
        return wf, Commit(command)

    @property
    def abortable(self) -> bool:
        return not self.aborted and self.phase not in _UNDO_PHASES and self.phase is not Phase.INTENT

    def handle(self, event: Event) -> Action:
        if isinstance(event, Aborted):
            if not self.abortable:
                raise ValueError(f"abort in phase {self.phase}")
            self.aborted, self.status = True, "aborted"
            self.pending.append(SnapshotStep(name="aborted", at=event.now, ok=False, detail=event.reason))
            return self._undo(event.reason, event.now)
        handler = getattr(self, f"_on_{self.phase.value}", None)
        if handler is None:
            raise ValueError(f"no event expected in phase {self.phase}")
        action: Action = handler(event)
        return action

    # --- the forward path ----------------------------------------------------------------------

    def _update(self, now: float, **fields: object) -> Commit:
        steps, self.pending = tuple(self.pending), []
        lease = now + self.plan.lease_seconds
        return Commit(UpdateSnapshot(id=self.plan.snapshot_id, steps=steps, lease_until=lease, **fields))  # type: ignore[arg-type]

    def _step(self, name: str, event: Done | Took | Committed, detail: str) -> None:
        ok = event.ok if isinstance(event, Done | Committed) else event.result is not None
        self.pending.append(SnapshotStep(name=name, at=event.now, ok=ok, detail=detail[:2000]))

    def _on_intent(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            self.phase, self.status, self.error = Phase.DONE, "failed", f"intent refused: {event.detail}"
            return Finished("failed", self.error)
        self.phase = Phase.DRAIN
        self.drain_deadline = event.now + self.plan.drain_timeout
        return self._update(event.now, pool="draining")

    def _on_drain(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            return self._undo(f"drain commit failed: {event.detail}", event.now)
        self.phase = Phase.ACK_DRAINING
        return AwaitProxies(event.index, self._left(event.now))

    def _left(self, now: float) -> float:
        return max(0.0, self.drain_deadline - now)

    def _on_ack_draining(self, event: Event) -> Action:
        assert isinstance(event, Done)
        self._step("proxies_acked_draining", event, event.detail)
        if not event.ok:
            return self._undo(f"drain: proxies did not ACK: {event.detail}", event.now)
        self.phase = Phase.IDLE
        return AwaitIdle(self._left(event.now))

    def _on_idle(self, event: Event) -> Action:
        assert isinstance(event, Done)
        self._step("connections_closed", event, event.detail)
        if not event.ok:
            return self._undo(f"drain: connections still open: {event.detail}", event.now)
        self.phase = Phase.REMOVE
        return self._update(event.now, pool="out")

    def _on_remove(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            return self._undo(f"remove commit failed: {event.detail}", event.now)
        self.phase = Phase.ACK_REMOVED
        return AwaitProxies(event.index, max(self._left(event.now), 0.5))

    def _on_ack_removed(self, event: Event) -> Action:
        assert isinstance(event, Done)
        self._step("proxies_acked_removed", event, event.detail)
        if not event.ok:
            return self._undo(f"drain: proxies did not ACK the removal: {event.detail}", event.now)
        self.phase = Phase.LEASE
        undo = (POST_HOOK,) if self.plan.post_hook else ()
        return self._update(event.now, undo=undo)

    def _on_lease(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            return self._undo(f"lease commit failed: {event.detail}", event.now)
        self.owes_post_hook = self.plan.post_hook is not None
        if self.plan.pre_hook is not None:
            self.phase = Phase.PRE_HOOK
            return RunHook(self.plan.pre_hook, "pre_hook")
        self.phase = Phase.TAKE
        return Take(self.plan.take_timeout)

    def _on_pre_hook(self, event: Event) -> Action:
        assert isinstance(event, Done)
        self._step("pre_hook", event, event.detail)
        if not event.ok:
            return self._undo(f"pre_hook failed: {event.detail}", event.now)
        self.phase = Phase.RECORD_PRE
        return self._update(event.now)

    def _on_record_pre_hook(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            return self._undo(f"commit failed: {event.detail}", event.now)
        self.phase = Phase.TAKE
        return Take(self.plan.take_timeout)

    def _on_take(self, event: Event) -> Action:
        assert isinstance(event, Took)
        result = event.result
        if result is None:
            self._step("take", event, event.error)
            return self._undo(f"take failed: {event.error}", event.now)
        self._step("take", event, f"{result.artifact} ({result.size_bytes} bytes)")
        self.phase = Phase.RECORD_TAKE
        return self._update(event.now, artifact=result.artifact, point=dict(result.point), size_bytes=result.size_bytes)

    def _on_record_take(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            return self._undo(f"commit failed: {event.detail}", event.now)
        if self.owes_post_hook and self.plan.post_hook is not None:
            self.phase = Phase.POST_HOOK
            return RunHook(self.plan.post_hook, "post_hook")
        return self._finish(event.now)

    def _on_post_hook(self, event: Event) -> Action:
        assert isinstance(event, Done)
        self._step("post_hook", event, event.detail)
        self.owes_post_hook = False
        if not event.ok:
            return self._undo(f"post_hook failed: {event.detail}", event.now)
        return self._finish(event.now)

    def _finish(self, now: float) -> Action:
        self.phase = Phase.FINISH
        return self._update(now, status="completed", pool="in", undo=())

    def _on_finish(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if event.ok:
            self.phase, self.status = Phase.DONE, "completed"
            return Finished("completed")
        # Refused: the member's role or epoch changed (fenced), or the leader lost its seat.
        self.pending.append(SnapshotStep(name="complete", at=event.now, ok=False, detail=event.detail[:2000]))
        return self._undo(f"not completed: {event.detail}", event.now)

    # --- the undo ------------------------------------------------------------------------------

    def _undo(self, error: str, now: float) -> Action:
        if self.status == "running":
            self.status = "failed"
        self.error = self.error or error
        if self.owes_post_hook and self.plan.post_hook is not None:
            self.phase = Phase.UNDO_HOOK
            return RunHook(self.plan.post_hook, "post_hook")
        return self._undo_commit(now)

    def _undo_commit(self, now: float) -> Action:
        self.phase = Phase.UNDO_FINISH
        status = None if self.aborted else self.status
        return self._update(now, status=status, pool="in", undo=(), error=self.error)

    def _on_undo_post_hook(self, event: Event) -> Action:
        assert isinstance(event, Done)
        self._step("post_hook", event, event.detail)
        self.owes_post_hook = False
        return self._undo_commit(event.now)

    def _on_undo_finish(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        self.phase = Phase.DONE
        if not event.ok:
            return Finished("unknown", f"{self.error}; the undo's commit failed ({event.detail}): the next leader undoes it")
        return Finished(self.status, self.error)

    def _on_resume(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            self.phase = Phase.DONE
            return Finished("unknown", f"takeover commit failed: {event.detail}")
        if self.owes_post_hook:
            self.phase = Phase.RESUME_WAIT
            return WaitUntil(self.resume_at)
        self.phase = Phase.DONE
        return Finished(self.status, self.error)

    def _on_resume_wait(self, event: Event) -> Action:
        assert isinstance(event, Done)
        assert self.plan.post_hook is not None
        self.phase = Phase.UNDO_HOOK
        return RunHook(self.plan.post_hook, "post_hook")
