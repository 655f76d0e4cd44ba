"""One running failover plan: its phases, the step each phase emits, and `TRANSITIONS`, the
table of every phase change (at the end of this module).

Per service, at most one plan runs at a time. Every plan starts with `ConfirmLeadership` (the
node commits a no-op in its current term; a stale leader keeps `_isLeader()` true for seconds,
see FACTS), and nothing is committed unless that succeeded. A change of primary A -> B is
always break-before-make:

    confirm        ConfirmLeadership
    fence          Commit(SetPrimary(service, None, epoch=current+1))   fail closed
    await_fence    AwaitProxies(fence index, ack_deadline)              no proxy routes to A
    await_close    AwaitClose(close_wait)                               announce: open conns closed
    promote        Promote(service, B)                                   orchestrate / switchover
    commit         Commit(SetPrimary(service, B, epoch=fence+1))
    await_route    AwaitProxies(commit index, ack_deadline)              first_routable, ACKs
                   Done

A planned switchover starts in `catchup` (poll `ReadPositions` until the target's position
reaches the primary's, or its timeout: then nothing changes) and checks again after the fence
(`final_catchup`: the old primary no longer takes writes through the mesh). If the target does
not catch up, or its promotion fails, the old primary is restored (`restore`, `await_restore`).
A failed orchestrated promotion tries the next eligible candidate, then stays fail-closed.
An announce (the caller already promoted B; A may still be up and take writes on its open
connections) runs fence, await_fence, await_close (the health fence's interval: the
proxies close their connections to A), commit, await_route, without confirm: it promotes
nothing, and its first commit (at the epoch it saw + 1) is refused when the state moved or the
leader is stale. That first commit carries the caller's fencing token (`SetPrimary.token`), so a
stale claim is refused before anything moves.

How a result moves a plan (`Planner.step_done`): `_absorb` keeps what the result says about the
members, `result_kind` names it, and `TRANSITIONS[(phase, kind)]` gives the handler that
records it and the phase(s) it may lead to; entering a phase emits that phase's step.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from repstage_mesh.core.models import AuditTag, MeshState, SetPrimary
from repstage_mesh.core.observations import MemberStatus
from repstage_mesh.decide.policy import Choice, count_failover, settled
from repstage_mesh.decide.records import FailoverRecord
from repstage_mesh.decide.steps import (
    AwaitClose,
    AwaitProxies,
    Commit,
    CommitResult,
    ConfirmLeadership,
    Done,
    Positions,
    Promote,
    PromoteResult,
    ProxyAcks,
    ReadPositions,
    Step,
    StepFailed,
    StepResult,
)
from repstage_mesh.decide.view import ServiceView

__all__ = ["TRANSITIONS", "Context", "Finish", "Phase", "Plan", "Planner", "finish"]

Phase = Literal[
    "catchup", "confirm", "fence", "await_fence", "await_close", "final_catchup", "promote",
    "commit", "await_route", "restore", "await_restore",
]

# What a step's result was, as the table sees it (see `result_kind`).
Kind = Literal[
    "confirmed", "unconfirmed",  # ConfirmLeadership
    "committed", "commit_failed",  # Commit
    "acked",  # AwaitProxies (never fails: missed proxies are recorded)
    "closed",  # AwaitClose
    "promoted", "promote_failed",  # Promote
    "caught_up", "behind", "target_down", "timed_out",  # ReadPositions
]


class End(enum.Enum):
    """Where a plan goes when it ends: `Done(ok=True)` or `Done(ok=False)`."""

    DONE = "done"
    FAILED = "failed"


DONE, FAILED = End.DONE, End.FAILED


@dataclass
class Plan:
    """A running plan of one service: where it is, what it aims at, the step it waits for."""

    record: FailoverRecord
    kind: str
    automatic: bool
    base_epoch: int
    old_primary: str | None
    target: str | None
    candidates: list[str]
    promote: bool
    phase: Phase
    deadline: float = math.inf
    fence_epoch: int | None = None
    fenced_at: float | None = None
    outstanding: Step | None = None
    confirmed: bool = False
    catchup_timeout: float = 0.0
    polls: int = 0
    fence: bool = True  # announce: false routes the new primary without fencing first
    token: int | None = None  # announce: the caller's fencing token, carried by the first commit
    close_wait: float = 0.0  # announce: AwaitClose after the fence ACKs
    by: AuditTag | None = None  # announce: who asked, for the audit trail of its commits


@dataclass(frozen=True)
class Finish:
    """A handler's verdict that the plan ends (DONE when ok, else FAILED), and why."""

    ok: bool
    reason: str

    @property
    def end(self) -> End:
        return DONE if self.ok else FAILED


# A handler returns None to take its row's only next phase, a Phase to choose among the row's
# phases, or Finish to end the plan.
Outcome = Phase | Finish | None


class Context(Protocol):
    """What plans read from the decider, live: the committed state and the tunables."""

    state: MeshState
    settle: float
    leadership_retry: float
    poll_interval: float


def finish(s: ServiceView, plan: Plan, now: float, ok: bool, reason: str) -> list[Step]:
    """End `plan` (its record keeps the outcome) and free the service for the next one."""
    rec = plan.record
    rec.end(now, ok, reason)
    rec.event("done" if ok else "failed", now, reason=reason)
    s.plan = None
    return [Done(rec.service, rec.id, ok, reason)]


def _pair(plan: Plan) -> tuple[str, str]:
    """(target, old primary) of a switchover plan."""
    assert plan.target is not None and plan.old_primary is not None
    return plan.target, plan.old_primary


def _offsets(plan: Plan, result: StepResult) -> tuple[int | None, int | None]:
    """ReadPositions' answer for (the target, the old primary)."""
    target, primary = _pair(plan)
    offsets = result.offsets if isinstance(result, Positions) else {}
    return offsets.get(target), offsets.get(primary)


def _acks(result: StepResult) -> tuple[ProxyAcks, str | None]:
    """AwaitProxies' answer, and the error when the wait itself failed."""
    acks = result if isinstance(result, ProxyAcks) else ProxyAcks()
    return acks, result.message if isinstance(result, StepFailed) else None


def _risks(acks: ProxyAcks) -> dict[str, object]:
    """What a proxy wait leaves at risk, for the record: NACKs (with Envoy's error text) and
    control-plane nodes that could not be asked."""
    risks: dict[str, object] = {}
    if acks.nacked:
        risks["nacked"] = dict(acks.nacked)
    if acks.unreachable:
        risks["unreachable"] = list(acks.unreachable)
    return risks


def result_kind(step: Step, result: StepResult, s: ServiceView, plan: Plan, now: float) -> Kind | None:
    """Name a step's result for `TRANSITIONS` (None: a step that no plan waits for)."""
    if isinstance(step, ConfirmLeadership):
        return "confirmed" if result is True else "unconfirmed"
    if isinstance(step, Commit):
        ok = isinstance(result, CommitResult) and result.ok and result.epoch is not None
        return "committed" if ok else "commit_failed"
    if isinstance(step, AwaitProxies):
        return "acked"
    if isinstance(step, AwaitClose):
        return "closed"
    if isinstance(step, Promote):
        return "promoted" if isinstance(result, PromoteResult) and result.ok else "promote_failed"
    if isinstance(step, ReadPositions):
        target, primary = _offsets(plan, result)
        if s.view(_pair(plan)[0]).status is MemberStatus.DOWN:
            return "target_down"
        if target is not None and primary is not None and target >= primary:
            return "caught_up"
        return "timed_out" if now >= plan.deadline else "behind"
    return None


class Planner:
    """Runs plans: emits the step of each phase and moves plans along `TRANSITIONS`."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # --- dispatch -----------------------------------------------------------------------------

    def step_done(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> list[Step]:
        """`step`, the plan's outstanding step, ended with `result`: move the plan on."""
        plan.outstanding = None
        self._absorb(s, plan, step, result, now)
        kind = result_kind(step, result, s, plan, now)
        if kind is None:
            return []
        row = TRANSITIONS[(plan.phase, kind)]
        outcome = row.handler(self, s, plan, step, result, now)
        target = row.target(outcome)
        assert target in row.to, f"{plan.phase} on {kind} -> {target}: not in TRANSITIONS"
        if isinstance(outcome, Finish):
            return finish(s, plan, now, outcome.ok, outcome.reason)
        assert not isinstance(target, End), f"{plan.phase} on {kind}: an end needs a Finish"
        return self.enter(s, plan, target, now)

    def _absorb(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> None:
        """Keep what a result says about the members, whatever it means for the plan."""
        if isinstance(step, Promote) and isinstance(result, PromoteResult) and result.needs_rejoin:
            s.needs_rejoin.update(result.needs_rejoin)
            rec = plan.record
            rec.needs_rejoin = tuple(sorted(set(rec.needs_rejoin) | set(result.needs_rejoin)))
        elif isinstance(step, ReadPositions):
            (target_name, primary_name), (target, primary) = _pair(plan), _offsets(plan, result)
            tv = s.view(target_name)
            if target is not None:
                tv.offset, tv.offset_at = target, now
            if primary is not None:
                s.view(primary_name).offset = primary
                s.view(primary_name).offset_at = now

    # --- entering a phase: the step it emits ----------------------------------------------------

    def enter(self, s: ServiceView, plan: Plan, phase: Phase, now: float) -> list[Step]:
        """Move `plan` to `phase` and emit that phase's step (a catch-up phase polls afresh)."""
        if phase != plan.phase:
            plan.phase, plan.polls = phase, 0
        if phase in ("catchup", "final_catchup"):
            return self.poll(s, plan, now)
        step = self._step_for(plan)
        plan.outstanding = step
        if isinstance(step, AwaitProxies):
            plan.record.event("pushed", now, epoch=step.min_index, purpose=step.purpose)
        return [step]

    def _step_for(self, plan: Plan) -> Step:
        rec = plan.record
        name = rec.service
        base = plan.fence_epoch if plan.fence_epoch is not None else plan.base_epoch
        if plan.phase == "confirm":
            return ConfirmLeadership(name, rec.id)
        if plan.phase == "fence":
            return Commit(name, rec.id, SetPrimary(service=name, member=None, epoch=plan.base_epoch + 1,
                                                   cause=f"fence: {rec.cause}"[:200], token=plan.token,
                                                   by=plan.by))
        if plan.phase == "await_close":
            return AwaitClose(name, rec.id, plan.close_wait)
        if plan.phase == "promote":
            svc = self.ctx.state.service(name)
            assert svc is not None and plan.target is not None
            return Promote(name, rec.id, svc.spec, plan.target, plan.old_primary, base)
        if plan.phase in ("commit", "restore"):
            member = plan.target if plan.phase == "commit" else plan.old_primary
            # An announce of the current primary, or one without a fence, asks for no epoch of
            # ours: the caller's token fences it, and the plan runs alone on the leader.
            unfenced = plan.kind == "announce" and (member == plan.old_primary or plan.fence_epoch is None)
            epoch = None if unfenced else base + 1
            token = plan.token if plan.fence_epoch is None and plan.phase == "commit" else None
            return Commit(name, rec.id, SetPrimary(service=name, member=member, epoch=epoch,
                                                   cause=rec.cause[:200], token=token, by=plan.by))
        if plan.phase in ("await_fence", "await_route", "await_restore"):
            assert rec.epoch is not None  # the commit just made
            purpose: Literal["fence", "route"] = "fence" if plan.phase == "await_fence" else "route"
            return AwaitProxies(name, rec.id, rec.epoch, self._ack_deadline(name), purpose)
        raise AssertionError(f"phase {plan.phase} emits its step elsewhere")

    def poll(self, s: ServiceView, plan: Plan, now: float) -> list[Step]:
        """Catch-up phases poll the positions with ReadPositions until caught up or the deadline."""
        if plan.phase not in ("catchup", "final_catchup") or plan.outstanding is not None:
            return []
        target, old_primary = _pair(plan)
        name = plan.record.service
        svc = self.ctx.state.service(name)
        if svc is None:
            return finish(s, plan, now, False, "service deleted")
        delay = 0.0 if plan.polls == 0 else self.ctx.poll_interval
        plan.polls += 1
        step = ReadPositions(name, plan.record.id, svc.spec, (old_primary, target), delay)
        plan.outstanding = step
        return [step]

    def _ack_deadline(self, name: str) -> float:
        svc = self.ctx.state.service(name)
        return svc.spec.leadership.ack_deadline if svc is not None else 2.0

    # --- handlers: record what a result means; return where the plan goes ----------------------

    def _confirmed(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> Outcome:
        plan.confirmed = True
        plan.record.event("leadership_confirmed", now)
        svc = self.ctx.state.service(step.service)
        if svc is None:
            return Finish(False, "service deleted")
        if svc.epoch != plan.base_epoch:
            s.retry_at = now
            return Finish(False, f"committed state moved (epoch {plan.base_epoch} -> {svc.epoch}) while confirming")
        if plan.automatic:
            intent = Choice(svc, s, now, self.ctx.settle).decide()
            if intent is None or intent.kind != plan.kind:
                return Finish(False, "the condition cleared before anything was committed")
            plan.target = plan.record.new_primary = intent.target
            plan.candidates = list(intent.candidates)
            plan.promote = intent.promote
        if plan.old_primary is not None and plan.fence and plan.old_primary != plan.target:
            return "fence"
        return "promote" if plan.promote else "commit"

    def _unconfirmed(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> Outcome:
        s.retry_at = now + self.ctx.leadership_retry
        return Finish(False, "leadership not confirmed: this node may be a stale leader")

    def _commit_failed(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> Outcome:
        why = result.message if isinstance(result, CommitResult | StepFailed) else repr(result)
        s.retry_at = now + self.ctx.leadership_retry
        if isinstance(result, StepFailed):
            plan.record.error_code = "commit_timeout" if result.unknown else "no_quorum"
        elif isinstance(result, CommitResult):
            plan.record.error_code = result.code
        if plan.phase in ("commit", "restore") and plan.fence_epoch is not None:
            return Finish(False, f"commit of the new primary failed, staying fail-closed: {why}")
        return Finish(False, f"commit failed: {why}")

    def _fenced(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> None:
        assert isinstance(result, CommitResult) and result.epoch is not None
        rec = plan.record
        rec.epoch = result.epoch
        plan.fence_epoch = rec.fence_epoch = result.epoch
        plan.fenced_at = now
        if plan.automatic:
            count_failover(s, self.ctx.state.service(step.service), now)
        rec.event("fenced", now, epoch=result.epoch)

    def _fence_acked(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> Outcome:
        rec = plan.record
        acks, failure = _acks(result)
        rec.missed_fence = acks.missed
        rec.event("proxies_fenced", now, acks={p: round((t - rec.started_at) * 1000.0, 3)
                                               for p, t in sorted(acks.acked.items())},
                  missed=list(acks.missed), **_risks(acks), **({"error": failure} if failure else {}))
        if plan.kind == "fail_closed" or plan.target is None:
            return Finish(True, "fail-closed: no primary is certain")
        if plan.kind == "switchover":
            plan.deadline = now + plan.catchup_timeout
            return "final_catchup"
        if plan.close_wait > 0:
            return "await_close"
        return "promote" if plan.promote else "commit"

    def _closed(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> None:
        plan.record.event("connections_closed", now, waited_ms=round(plan.close_wait * 1000.0, 3))

    def _caught_up(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> None:
        target, primary = _offsets(plan, result)
        plan.record.event("caught_up", now, phase=plan.phase, offset=target, primary_offset=primary)
        plan.deadline = math.inf

    def _behind(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> None:
        """Not caught up yet, deadline not passed: poll again."""

    def _target_down(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> Outcome:
        return self._catchup_failed(plan, f"{plan.target!r} is down")

    def _timed_out(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> Outcome:
        target, primary = _offsets(plan, result)
        lag = (primary - target) if primary is not None and target is not None else None
        failure = f": {result.message}" if isinstance(result, StepFailed) else ""
        return self._catchup_failed(
            plan, f"{plan.target!r} did not catch up with {plan.old_primary!r} (lag {lag}){failure}"
        )

    @staticmethod
    def _catchup_failed(plan: Plan, why: str) -> Outcome:
        if plan.phase == "catchup":
            return Finish(False, f"{why}: nothing changed")
        plan.record.reason = f"{why} after fencing: old primary restored"
        return "restore"

    def _promoted(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> None:
        assert isinstance(step, Promote) and isinstance(result, PromoteResult)
        s.needs_rejoin.discard(step.member)
        plan.record.event("promoted", now, member=step.member, detail=result.detail,
                          repointed=list(result.repointed), failed=list(result.failed))
        for failed in result.failed:
            s.repoint_at.pop(failed, None)
        # What was observed of the promoted and re-pointed members predates their new roles:
        # forget it until the sources report again (UNKNOWN primary = keep, never act on it).
        for member in (step.member, *result.repointed):
            s.forget(member, now)

    def _promote_failed(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> Outcome:
        assert isinstance(step, Promote)
        rec = plan.record
        why = result.detail if isinstance(result, PromoteResult) else getattr(result, "message", repr(result))
        rec.event("promote_failed", now, member=step.member, detail=why)
        if plan.kind == "switchover":
            rec.reason = f"promotion of {step.member!r} failed ({why}): old primary restored"
            return "restore"
        # try the next candidate that is still eligible
        svc = self.ctx.state.service(step.service)
        if step.member in plan.candidates:
            plan.candidates.remove(step.member)
        if svc is not None:
            eligible, _ = Choice(svc, s, now, self.ctx.settle).candidates(exclude=plan.old_primary)
            plan.candidates = [c for c in plan.candidates if c in eligible]
        if plan.candidates:
            plan.target = rec.new_primary = plan.candidates[0]
            plan.promote = not settled(s, plan.target, MemberStatus.PRIMARY, now, self.ctx.settle)
            return "promote" if plan.promote else "commit"
        rec.new_primary = None
        return Finish(False, f"promotion failed for every candidate, staying fail-closed (last: {why})")

    def _primary_committed(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> None:
        assert isinstance(step, Commit) and isinstance(result, CommitResult) and result.epoch is not None
        rec = plan.record
        rec.epoch = result.epoch
        if plan.automatic and plan.promote and plan.fence_epoch is None:
            count_failover(s, self.ctx.state.service(step.service), now)  # promoting into an empty primary counts
        rec.event("committed", now, epoch=result.epoch, member=step.command.member)

    def _committed(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> Outcome:
        """The new primary committed: wait for the proxies, except for an announce without a
        fence, which answers at once (the proxies follow within milliseconds)."""
        self._primary_committed(s, plan, step, result, now)
        if plan.kind == "announce" and not plan.fence:
            return Finish(True, "new primary committed (no fence: not waiting for the proxies)")
        return "await_route"

    def _route_acked(self, s: ServiceView, plan: Plan, step: Step, result: StepResult, now: float) -> Outcome:
        rec = plan.record
        acks, _ = _acks(result)
        rec.missed_route = acks.missed
        if acks.nacked or acks.unreachable:
            rec.event("route_missed", now, missed=list(acks.missed), **_risks(acks))
        for proxy, t in sorted(acks.acked.items(), key=lambda kv: kv[1]):
            rec.event("acked", t, proxy=proxy)
        if acks.acked:
            rec.event("first_routable", min(acks.acked.values()))
        if plan.fenced_at is not None:
            end = max(acks.acked.values()) if acks.acked and not acks.missed else now
            rec.write_unavailable_ms = round((end - plan.fenced_at) * 1000.0, 3)
        if plan.phase == "await_restore":
            return Finish(False, rec.reason or "switchover aborted: old primary restored")
        return Finish(True, "new primary routable")


# --- the phase transitions ---------------------------------------------------------------------

Handler = Callable[[Planner, ServiceView, Plan, Step, StepResult, float], Outcome]


class Transition(NamedTuple):
    handler: Handler  # records what the result means; may choose among `to`
    to: tuple[Phase | End, ...]  # where the plan may go next

    def target(self, outcome: Outcome) -> Phase | End:
        """Where a handler's `outcome` leads (None: this row's only next phase)."""
        if isinstance(outcome, Finish):
            return outcome.end
        if outcome is None:
            assert len(self.to) == 1, f"the handler must choose among {self.to}"
            return self.to[0]
        return outcome


def _on(handler: Handler, *to: Phase | End) -> Transition:
    return Transition(handler, to)


TRANSITIONS: dict[tuple[Phase, Kind], Transition] = {
    # phase           result kind            handler                     next phase(s)
    ("catchup",       "caught_up"):      _on(Planner._caught_up,         "confirm"),
    ("catchup",       "behind"):         _on(Planner._behind,            "catchup"),
    ("catchup",       "target_down"):    _on(Planner._target_down,       FAILED),
    ("catchup",       "timed_out"):      _on(Planner._timed_out,         FAILED),
    ("confirm",       "confirmed"):      _on(Planner._confirmed,         "fence", "promote", "commit", FAILED),
    ("confirm",       "unconfirmed"):    _on(Planner._unconfirmed,       FAILED),
    ("fence",         "committed"):      _on(Planner._fenced,            "await_fence"),
    ("fence",         "commit_failed"):  _on(Planner._commit_failed,     FAILED),
    ("await_fence",   "acked"):          _on(Planner._fence_acked,       "final_catchup", "await_close", "promote", "commit", DONE),
    ("await_close",   "closed"):         _on(Planner._closed,            "commit"),
    ("final_catchup", "caught_up"):      _on(Planner._caught_up,         "promote"),
    ("final_catchup", "behind"):         _on(Planner._behind,            "final_catchup"),
    ("final_catchup", "target_down"):    _on(Planner._target_down,       "restore"),
    ("final_catchup", "timed_out"):      _on(Planner._timed_out,         "restore"),
    ("promote",       "promoted"):       _on(Planner._promoted,          "commit"),
    ("promote",       "promote_failed"): _on(Planner._promote_failed,    "restore", "promote", "commit", FAILED),
    ("commit",        "committed"):      _on(Planner._committed,         "await_route", DONE),
    ("commit",        "commit_failed"):  _on(Planner._commit_failed,     FAILED),
    ("await_route",   "acked"):          _on(Planner._route_acked,       DONE),
    ("restore",       "committed"):      _on(Planner._primary_committed, "await_restore"),
    ("restore",       "commit_failed"):  _on(Planner._commit_failed,     FAILED),
    ("await_restore", "acked"):          _on(Planner._route_acked,       FAILED),
}
