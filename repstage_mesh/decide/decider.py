"""The failover decider (sans-IO): who should be primary, and the break-before-make plan to get there.

No asyncio, no clock, no I/O: committed state comes in through `on_state`, what the sources
see comes in through `observe`, time comes in as `now` (monotonic seconds, the same clock as
`Observation.at`), and decisions go out as `Step`s. Whoever executes a step (failover.py's
`FailoverRunner`, or a test) reports its result with `step_done`, which returns the next steps.

Per service, at most one plan runs at a time. Every plan starts with `ConfirmLeadership` (the
node commits a no-op in its current term; a stale leader keeps `_isLeader()` true for seconds,
see FACTS), and nothing is committed unless that succeeded. A change of primary A -> B is
always break-before-make:

    ConfirmLeadership
    Commit(SetPrimary(service, None, epoch=current+1))   fence: fail closed
    AwaitProxies(fence index, ack_deadline)              every proxy stopped routing to A
    Promote(service, B)                                   orchestrate / switchover only
    Commit(SetPrimary(service, B, epoch=fence+1))
    AwaitProxies(commit index, ack_deadline)              first_routable, per-proxy ACKs
    Done

A planned switchover (`switchover(service, target, now)`) first polls `ReadPositions` until the
target's position reaches the primary's (or its timeout: then nothing changes), then runs the
same plan with a second catch-up check after the fence (the old primary no longer takes writes
through the mesh; if the target does not catch up, the old primary is restored) and reports the
write-unavailable window: fence committed -> the new primary's commit ACKed by every proxy.

Decisions are made only from committed state plus observations:

- follow (someone else promotes): the member observed PRIMARY becomes the committed primary.
  When two members claim PRIMARY, the committed one is kept unless it reports a lower offset or
  replicates from the other. The committed primary DOWN (or REPLICA) and nobody claiming
  PRIMARY: fail closed. Never route to a guess.
- orchestrate (RepStage promotes): the committed primary DOWN -> the replica with the highest
  offset (ties: member order), refusing DOWN/UNKNOWN members, members not settled in their
  status, and members further behind than `max_lag_bytes`. A failed promotion tries the next
  candidate, then stays fail-closed. An old primary that comes back claiming PRIMARY, or a
  replica that follows another upstream than the committed primary, gets a `Repoint` step
  (rate-limited per member; nothing is committed for it). After a promotion, what was observed
  of the promoted and re-pointed members is forgotten (UNKNOWN) until the sources report again,
  so a stale "replica" observation cannot undo the promotion.
- announce: never decided here (the API commits the announced primary, fenced by the epoch).

Hysteresis: a plan that moves the primary away from a member, or promotes one, is an automatic
failover; at most one per service per `min_failover_interval` (a later one is deferred, not
dropped: `tick` retries it). Filling an empty primary with a member that stably claims PRIMARY
is not a failover (it ends a fail-closed period). A candidate must have been in its status for
`settle` seconds. Together with the sources' fall/rise debouncing, a flapping primary causes at
most one failover per interval; and failovers in a row (each within twice the current
interval of the last) double the interval each time, up to 32x, so a primary that keeps
flapping does not ping-pong forever (the streak ends after a quiet period).

Failover records live in a bounded history on the node that ran the plan (the Raft leader at
the time); they are not replicated, so a new leader starts with an empty history.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from repstage_mesh.core.errors import DecisionRefused
from repstage_mesh.core.models import (
    LeadershipMode,
    LeadershipSource,
    MeshState,
    ServiceSpec,
    ServiceState,
    SetPrimary,
)
from repstage_mesh.core.observations import MemberStatus, Observation

__all__ = [
    "AwaitProxies",
    "Commit",
    "CommitResult",
    "ConfirmLeadership",
    "Decider",
    "DecisionRefused",
    "Done",
    "FailoverRecord",
    "Positions",
    "Promote",
    "PromoteResult",
    "ProxyAcks",
    "ReadPositions",
    "Repoint",
    "Step",
    "StepFailed",
    "StepResult",
    "TimelineEvent",
]


# --- steps: what the decider asks the node to do ----------------------------------------------


@dataclass(frozen=True)
class ConfirmLeadership:
    """Commit a no-op in the current term; result: bool (True only if still leader after it)."""

    service: str
    record_id: str


@dataclass(frozen=True)
class Commit:
    """Commit `command` through the Raft log; result: CommitResult (or StepFailed)."""

    service: str
    record_id: str
    command: SetPrimary


@dataclass(frozen=True)
class AwaitProxies:
    """Wait until every connected proxy ACKed a snapshot whose version (a Raft index) is at least
    `min_index`, or `deadline` seconds passed; result: ProxyAcks (never fails on the deadline)."""

    service: str
    record_id: str
    min_index: int
    deadline: float
    purpose: Literal["fence", "route"]


@dataclass(frozen=True)
class Promote:
    """Make `member` the primary of the data store and re-point the other members to it;
    result: PromoteResult. `epoch` is the fencing epoch (every claim at or below it is refused)."""

    service: str
    record_id: str
    spec: ServiceSpec
    member: str
    old_primary: str | None
    epoch: int


@dataclass(frozen=True)
class Repoint:
    """Make `member` (an old primary that came back claiming PRIMARY) a replica of
    `new_primary`; result: PromoteResult."""

    service: str
    record_id: str
    spec: ServiceSpec
    member: str
    new_primary: str


@dataclass(frozen=True)
class ReadPositions:
    """Read the replication positions (Redis offset, PostgreSQL LSN) of `members` now, after
    waiting `delay` seconds (a poll interval); result: Positions. Used by a switchover to wait for
    the target to catch up (observations carry offsets only now and then)."""

    service: str
    record_id: str
    spec: ServiceSpec
    members: tuple[str, ...]
    delay: float


@dataclass(frozen=True)
class Done:
    """The plan ended (nothing to execute)."""

    service: str
    record_id: str
    ok: bool
    reason: str


Step = ConfirmLeadership | Commit | AwaitProxies | Promote | Repoint | ReadPositions | Done


# --- step results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitResult:
    """What a Commit produced. `epoch` is the committed epoch (the entry's Raft index) when ok."""

    ok: bool
    epoch: int | None = None
    message: str = ""
    code: str | None = None  # the Rejection code when the state machine refused it


@dataclass(frozen=True)
class ProxyAcks:
    """AwaitProxies' answer: when each proxy ACKed (same clock as `now`), and who did not."""

    acked: dict[str, float] = field(default_factory=dict)
    missed: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromoteResult:
    ok: bool
    detail: str = ""
    repointed: tuple[str, ...] = ()  # members now replicating from the new primary
    failed: tuple[str, ...] = ()  # members that could not be re-pointed (down: Repoint later)
    needs_rejoin: tuple[str, ...] = ()  # members an operator must re-join (PostgreSQL)


@dataclass(frozen=True)
class Positions:
    """ReadPositions' answer: each member's position, None when it could not be read."""

    offsets: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class StepFailed:
    """A step raised or ran out of time. `unknown` = a commit may or may not have been applied."""

    message: str
    unknown: bool = False


StepResult = bool | CommitResult | ProxyAcks | PromoteResult | Positions | StepFailed | None


# --- records ------------------------------------------------------------------------------------


@dataclass
class TimelineEvent:
    name: str
    at: float  # the decider's clock (monotonic seconds)
    elapsed_ms: float  # since the record started
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class FailoverRecord:
    """One failover, fail-closed period or switchover, as the node that ran it saw it.

    Timeline event names: detected, decided, leadership_confirmed, caught_up, fenced,
    proxies_fenced, promoted, promote_failed, committed, pushed, acked (one per proxy),
    first_routable, repointed, done, failed.
    """

    id: str
    service: str
    cause: str
    mode: str  # follow | orchestrate | switchover
    kind: str  # failover | fail_closed | adopt | switchover | repoint
    old_primary: str | None
    new_primary: str | None
    started_at: float
    epoch: int | None = None  # the epoch of the last commit the plan made
    fence_epoch: int | None = None
    status: str = "running"  # running | done | failed
    reason: str = ""
    started_unix: float | None = None
    timeline: list[TimelineEvent] = field(default_factory=list)
    missed_fence: tuple[str, ...] = ()  # proxies that had not ACKed the fence by the deadline
    missed_route: tuple[str, ...] = ()
    needs_rejoin: tuple[str, ...] = ()
    write_unavailable_ms: float | None = None  # fence committed -> new primary ACKed
    duration_ms: float | None = None

    def event(self, name: str, at: float, **detail: Any) -> None:
        elapsed = round((at - self.started_at) * 1000.0, 3)
        self.timeline.append(TimelineEvent(name, at, elapsed, detail))

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable."""
        data = asdict(self)
        data["missed_fence"] = list(self.missed_fence)
        data["missed_route"] = list(self.missed_route)
        data["needs_rejoin"] = list(self.needs_rejoin)
        return data


# --- internal bookkeeping -------------------------------------------------------------------------


@dataclass
class _View:
    """What the latest observations say about one member."""

    status: MemberStatus = MemberStatus.UNKNOWN
    since: float = -math.inf  # when `status` began
    seen: bool = False
    offset: int | None = None  # last known offset (kept across DOWN)
    offset_at: float = -math.inf
    upstream: str | None = None
    detail: str = ""


Phase = Literal[
    "catchup", "confirm", "fence", "await_fence", "final_catchup", "promote", "commit",
    "await_route", "restore", "await_restore",
]


@dataclass
class _Plan:
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


MAX_BACKOFF = 32  # the interval grows at most to 32 x min_failover_interval


def _backoff(interval: float, streak: int) -> float:
    """A primary that keeps failing right after each failover (flapping) waits longer each
    time, like Sentinel's doubling failover timeout: interval x 2^(streak - 1), capped."""
    return interval * min(MAX_BACKOFF, 2 ** max(0, streak - 1))


def _count_failover(s: _Service, svc: ServiceState | None, now: float) -> None:
    base = svc.spec.leadership.min_failover_interval if svc is not None else 0.0
    recent = now - s.last_failover_at < 2 * _backoff(base, s.streak)
    s.streak = s.streak + 1 if recent else 1
    s.last_failover_at = now


@dataclass
class _Service:
    views: dict[str, _View] = field(default_factory=dict)
    plan: _Plan | None = None
    last_failover_at: float = -math.inf
    streak: int = 0  # automatic failovers in a row, each within twice the interval of the last
    retry_at: float = -math.inf
    repoint_at: dict[str, float] = field(default_factory=dict)
    needs_rejoin: set[str] = field(default_factory=set)
    blocked: str = ""

    def view(self, member: str) -> _View:
        v = self.views.get(member)
        if v is None:
            v = self.views[member] = _View()
        return v


@dataclass(frozen=True)
class _Intent:
    kind: Literal["failover", "fail_closed", "adopt"]
    target: str | None
    candidates: tuple[str, ...]
    promote: bool
    cause: str
    detected_at: float | None


class Decider:
    """Decides failovers for every service in the committed state (see the module docstring).

    `settle`: seconds a candidate must have held its status before it is chosen.
    `catchup_timeout`: default longest wait for a switchover target to catch up.
    `leadership_retry`: seconds to wait after a failed ConfirmLeadership or an aborted plan.
    `repoint_retry`: seconds between Repoint attempts for one member.
    `poll_interval`: seconds between ReadPositions while a switchover waits for catch-up.
    `history`: how many records to keep. `wall_offset`: unix time minus the `now` clock, used
    only to fill `FailoverRecord.started_unix`.
    """

    def __init__(
        self,
        node_id: str,
        *,
        settle: float = 0.2,
        catchup_timeout: float = 10.0,
        leadership_retry: float = 0.5,
        repoint_retry: float = 2.0,
        poll_interval: float = 0.05,
        history: int = 100,
        wall_offset: float | None = None,
    ) -> None:
        if not node_id:
            raise ValueError("node_id: must not be empty")
        for name, value in (("settle", settle), ("catchup_timeout", catchup_timeout),
                            ("leadership_retry", leadership_retry), ("repoint_retry", repoint_retry),
                            ("poll_interval", poll_interval)):
            if value < 0 or math.isnan(value):
                raise ValueError(f"{name}: must not be negative, got {value}")
        if history < 1:
            raise ValueError(f"history: must be at least 1, got {history}")
        self.node_id = node_id
        self.settle = settle
        self.catchup_timeout = catchup_timeout
        self.leadership_retry = leadership_retry
        self.repoint_retry = repoint_retry
        self.poll_interval = poll_interval
        self.wall_offset = wall_offset
        self.state = MeshState()
        self._services: dict[str, _Service] = {}
        self._records: deque[FailoverRecord] = deque(maxlen=history)
        self._seq = itertools.count(1)

    # --- inputs -----------------------------------------------------------------------------

    def on_state(self, state: MeshState) -> None:
        """The committed state changed (call on every apply, in log order)."""
        if state.index < self.state.index:
            return  # an older state delivered late: keep the newer one
        self.state = state
        for name in list(self._services):
            svc = state.service(name)
            if svc is None and self._services[name].plan is None:
                del self._services[name]
            elif svc is not None:
                members = {m.name for m in svc.spec.members}
                views = self._services[name].views
                for gone in set(views) - members:
                    del views[gone]

    def observe(self, obs: Observation) -> list[Step]:
        """Take one observation; returns the steps to execute now (often none)."""
        svc = self.state.service(obs.service)
        if svc is None or svc.spec.member(obs.member) is None:
            return []
        s = self._svc(obs.service)
        v = s.view(obs.member)
        if not v.seen or v.status is not obs.status:
            v.status = obs.status
            v.since = obs.at
            v.seen = True
        if obs.offset is not None:
            v.offset = obs.offset
            v.offset_at = obs.at
        if obs.status is not MemberStatus.DOWN:
            v.upstream = obs.upstream
        v.detail = obs.detail
        if obs.status is MemberStatus.REPLICA:
            s.needs_rejoin.discard(obs.member)  # an operator (or a hook) re-joined it
        return self._evaluate(obs.service, obs.at)

    def tick(self, now: float) -> list[Step]:
        """Time passed: settle windows, deferred failovers, switchover catch-up deadlines."""
        steps: list[Step] = []
        for name in sorted(set(self.state.services) | set(self._services)):
            steps.extend(self._evaluate(name, now))
        return steps

    def switchover(
        self, service: str, target: str, now: float, *, timeout: float | None = None,
        cause: str = "planned switchover",
    ) -> tuple[str, list[Step]]:
        """Start a planned switchover to `target`: wait (up to `timeout`, default
        `catchup_timeout`) until its offset reaches the primary's, then break-before-make with
        a promotion. Returns (record id, steps). Raises DecisionRefused and changes nothing when
        the request cannot run."""
        svc = self.state.service(service)
        if svc is None:
            raise DecisionRefused("not_found", f"no service named {service!r}", "service")
        if svc.spec.member(target) is None:
            members = [m.name for m in svc.spec.members]
            raise DecisionRefused("not_found", f"{target!r} is not a member of service {service!r} (members: {members})", "to")
        if svc.spec.leadership.mode is not LeadershipMode.ORCHESTRATE:
            raise DecisionRefused(
                "invalid",
                f"service {service!r} is in follow mode: its own orchestrator promotes; announce the "
                "new primary instead, or set leadership.mode to orchestrate",
                "service",
            )
        if svc.primary is None:
            raise DecisionRefused("conflict", f"service {service!r} has no primary to switch over from", "service")
        if svc.primary == target:
            raise DecisionRefused("conflict", f"{target!r} is already the primary of {service!r}", "to")
        if timeout is not None and (timeout <= 0 or math.isnan(timeout)):
            raise DecisionRefused("invalid", f"timeout: must be positive, got {timeout}", "timeout")
        s = self._svc(service)
        if s.plan is not None:
            raise DecisionRefused(
                "conflict", f"a failover of {service!r} is already running ({s.plan.record.id})", "service"
            )
        view = s.views.get(target)
        if view is None or view.status is not MemberStatus.REPLICA:
            status = view.status.value if view is not None and view.seen else "not observed"
            raise DecisionRefused("conflict", f"{target!r} is {status}, not a replica that can take over", "to")
        record = self._new_record(svc, "switchover", "switchover", cause, svc.primary, target, now)
        plan = _Plan(
            record=record, kind="switchover", automatic=False, base_epoch=svc.epoch,
            old_primary=svc.primary, target=target, candidates=[], promote=True, phase="catchup",
            deadline=now + (timeout if timeout is not None else self.catchup_timeout),
            catchup_timeout=timeout if timeout is not None else self.catchup_timeout,
        )
        s.plan = plan
        record.event("decided", now, target=target, timeout=plan.deadline - now)
        return record.id, self._advance(service, s, plan, now)

    def step_done(self, step: Step, result: StepResult, now: float) -> list[Step]:
        """Report the result of an executed step; returns the next steps."""
        if isinstance(step, Repoint):
            return self._repoint_done(step, result, now)
        s = self._services.get(step.service)
        plan = s.plan if s is not None else None
        if s is None or plan is None or plan.record.id != step.record_id or plan.outstanding != step:
            return []  # not the step we wait for (a late answer of an ended plan)
        plan.outstanding = None
        rec = plan.record
        if isinstance(step, ConfirmLeadership):
            if result is not True:
                s.retry_at = now + self.leadership_retry
                return self._finish(s, plan, now, False, "leadership not confirmed: this node may be a stale leader")
            plan.confirmed = True
            rec.event("leadership_confirmed", now)
            return self._after_confirm(step.service, s, plan, now)
        if isinstance(step, Commit):
            return self._commit_done(step, s, plan, result, now)
        if isinstance(step, AwaitProxies):
            acks = result if isinstance(result, ProxyAcks) else ProxyAcks()
            return self._acks_done(step, s, plan, acks, result, now)
        if isinstance(step, Promote):
            return self._promote_done(step, s, plan, result, now)
        if isinstance(step, ReadPositions):
            return self._positions_done(step, s, plan, result, now)
        return []

    def abandon(self, now: float, reason: str) -> list[Done]:
        """End every running plan as failed (the executor stopped: leadership lost, shutdown).
        What was committed stays committed; the next leader decides from there."""
        done: list[Done] = []
        for s in self._services.values():
            if s.plan is not None:
                for step in self._finish(s, s.plan, now, False, f"abandoned: {reason}"):
                    assert isinstance(step, Done)
                    done.append(step)
        return done

    # --- reads ------------------------------------------------------------------------------

    def records(self) -> list[FailoverRecord]:
        """Recent records, newest first (this node's history only)."""
        return list(reversed(self._records))

    def record(self, record_id: str) -> FailoverRecord | None:
        for rec in self._records:
            if rec.id == record_id:
                return rec
        return None

    def running(self, service: str) -> FailoverRecord | None:
        s = self._services.get(service)
        return s.plan.record if s is not None and s.plan is not None else None

    def status(self) -> dict[str, Any]:
        """Per service: the members as observed, the running plan, why nothing is done."""
        out: dict[str, Any] = {}
        for name, s in sorted(self._services.items()):
            out[name] = {
                "members": {
                    m: {"status": v.status.value, "since": v.since if v.seen else None,
                        "offset": v.offset, "upstream": v.upstream, "detail": v.detail}
                    for m, v in s.views.items()
                },
                "running": s.plan.record.id if s.plan else None,
                "phase": s.plan.phase if s.plan else None,
                "blocked": s.blocked,
                "last_failover_at": s.last_failover_at if s.last_failover_at > -math.inf else None,
                "needs_rejoin": sorted(s.needs_rejoin),
            }
        return out

    # --- evaluation ---------------------------------------------------------------------------

    def _svc(self, name: str) -> _Service:
        s = self._services.get(name)
        if s is None:
            s = self._services[name] = _Service()
        return s

    def _evaluate(self, name: str, now: float) -> list[Step]:
        svc = self.state.service(name)
        s = self._services.get(name)
        if s is None:
            return []
        if s.plan is not None:
            return self._wait_check(name, s, s.plan, now)
        if svc is None:
            return []
        steps = self._repoints(svc, s, now)
        if now < s.retry_at:
            return steps
        intent = self._decide(svc, s, now)
        if intent is None:
            return steps
        counted = intent.kind != "adopt"
        interval = _backoff(svc.spec.leadership.min_failover_interval, s.streak)
        if counted and now - s.last_failover_at < interval:
            s.blocked = (
                f"deferred by hysteresis until {s.last_failover_at + interval:.3f}: {intent.cause}"
            )
            return steps
        s.blocked = ""
        return steps + self._start(svc, s, intent, now)

    def _settled(self, s: _Service, member: str, status: MemberStatus, now: float) -> bool:
        v = s.views.get(member)
        return v is not None and v.seen and v.status is status and now - v.since >= self.settle

    def _decide(self, svc: ServiceState, s: _Service, now: float) -> _Intent | None:
        spec = svc.spec
        lead = spec.leadership
        if lead.source is LeadershipSource.ANNOUNCE:
            return None
        orchestrate = lead.mode is LeadershipMode.ORCHESTRATE
        order = [m.name for m in spec.members]
        primary = svc.primary
        claimers = [n for n in order if n != primary and self._settled(s, n, MemberStatus.PRIMARY, now)]
        if primary is not None:
            pv = s.view(primary)
            if not pv.seen or pv.status is MemberStatus.UNKNOWN:
                s.blocked = f"no information about primary {primary!r}: keeping it"
                return None
            if pv.status is MemberStatus.PRIMARY:
                if orchestrate or not claimers:
                    return None  # orchestrate: the committed primary is the truth; others get Repoint
                better = [n for n in claimers if self._supersedes(spec, s, n, primary)]
                if not better:
                    s.blocked = f"{claimers} also claim primary; keeping {primary!r} (not behind them)"
                    return None
                best = self._best(s, better, order)
                return _Intent("failover", best, (best,), False,
                               f"split brain: {best!r} claims primary and {primary!r} is behind it or replicates from it",
                               now)
            lost = f"primary {primary!r} is {pv.status.value}" + (f" ({pv.detail})" if pv.detail else "")
            detected = pv.since
            if pv.status is MemberStatus.REPLICA and not orchestrate:
                pass  # demoted by its orchestrator; whoever claims PRIMARY takes over
            if orchestrate:
                candidates, refused = self._candidates(svc, s, now, exclude=primary)
                if candidates:
                    best = candidates[0]
                    promote = not self._settled(s, best, MemberStatus.PRIMARY, now)
                    return _Intent("failover", best, tuple(candidates), promote, lost, detected)
                return _Intent("fail_closed", None, (), False, f"{lost}; no eligible replica ({refused})", detected)
            if claimers:
                best = self._best(s, claimers, order)
                return _Intent("failover", best, (best,), False, f"{lost}; {best!r} claims primary", detected)
            return _Intent("fail_closed", None, (), False, f"{lost}; no member claims primary", detected)

        # no primary: fill it only with certainty
        if claimers:
            if len(claimers) > 1:
                offsets = {n: s.view(n).offset for n in claimers}
                top = max((o for o in offsets.values() if o is not None), default=None)
                leaders = [n for n in claimers if top is not None and offsets[n] == top]
                if len(leaders) != 1:
                    s.blocked = f"several members claim primary ({claimers}): staying fail-closed"
                    return None
                claimers = leaders
            return _Intent("adopt", claimers[0], (claimers[0],), False,
                           f"{claimers[0]!r} claims primary", None)
        if not orchestrate:
            s.blocked = "no member claims primary: fail-closed"
            return None
        unknown = [n for n in order if not s.view(n).seen or s.view(n).status is MemberStatus.UNKNOWN]
        if unknown:
            s.blocked = f"no primary; members not yet observed: {unknown}"
            return None
        if any(s.view(n).status is MemberStatus.PRIMARY for n in order):
            s.blocked = "a member claims primary but has not settled"
            return None
        candidates, refused = self._candidates(svc, s, now, exclude=None)
        if not candidates:
            s.blocked = f"no primary and no eligible replica ({refused})"
            return None
        return _Intent("failover", candidates[0], tuple(candidates), True,
                       "no primary: promoting the most advanced replica", None)

    def _supersedes(self, spec: ServiceSpec, s: _Service, challenger: str, primary: str) -> bool:
        pv, cv = s.view(primary), s.view(challenger)
        if self._replicates_from(spec, cv, primary):
            return False
        if self._replicates_from(spec, pv, challenger):
            return True
        return pv.offset is not None and cv.offset is not None and pv.offset < cv.offset

    def _rank(self, s: _Service, name: str, order: list[str]) -> tuple[int, int]:
        """Sort key: highest offset first (unknown counts as lowest), then member order."""
        offset = s.view(name).offset
        return (-(offset if offset is not None else -1), order.index(name))

    @staticmethod
    def _replicates_from(spec: ServiceSpec, view: _View, other: str) -> bool:
        member = spec.member(other)
        return view.upstream is not None and member is not None and view.upstream in (
            other, f"{member.address}:{member.port}"
        )

    def _best(self, s: _Service, names: Iterable[str], order: list[str]) -> str:
        return min(names, key=lambda n: self._rank(s, n, order))

    def _candidates(
        self, svc: ServiceState, s: _Service, now: float, exclude: str | None
    ) -> tuple[list[str], str]:
        order = [m.name for m in svc.spec.members]
        max_lag = svc.spec.leadership.max_lag_bytes
        pool = [n for n in order if n != exclude]
        known = [s.view(n).offset for n in [*pool, *([exclude] if exclude else [])]]
        reference = max((o for o in known if o is not None), default=None)
        ok: list[str] = []
        refused: list[str] = []
        for n in pool:
            v = s.view(n)
            if not v.seen or v.status in (MemberStatus.DOWN, MemberStatus.UNKNOWN):
                refused.append(f"{n}: {v.status.value if v.seen else 'not observed'}")
                continue
            if now - v.since < self.settle:
                refused.append(f"{n}: {v.status.value} for only {now - v.since:.3f}s")
                continue
            if max_lag is not None:
                if v.offset is None or reference is None:
                    refused.append(f"{n}: offset unknown and max_lag_bytes is set")
                    continue
                if reference - v.offset > max_lag:
                    refused.append(f"{n}: {reference - v.offset} bytes behind > max_lag_bytes {max_lag}")
                    continue
            ok.append(n)
        ok.sort(key=lambda n: self._rank(s, n, order))
        return ok, "; ".join(refused) or "none"

    def _repoints(self, svc: ServiceState, s: _Service, now: float) -> list[Step]:
        spec = svc.spec
        if spec.leadership.mode is not LeadershipMode.ORCHESTRATE or svc.primary is None:
            return []
        if not self._settled(s, svc.primary, MemberStatus.PRIMARY, now):
            return []
        steps: list[Step] = []
        for m in spec.members:
            n = m.name
            if n == svc.primary or n in s.needs_rejoin:
                continue
            v = s.view(n)
            if self._settled(s, n, MemberStatus.PRIMARY, now):
                cause = f"{n!r} claims primary while {svc.primary!r} is the committed primary"
            elif (self._settled(s, n, MemberStatus.REPLICA, now) and v.upstream is not None
                  and not self._replicates_from(spec, v, svc.primary)):
                cause = f"{n!r} replicates from {v.upstream}, not from the primary {svc.primary!r}"
            else:
                continue
            if now < s.repoint_at.get(n, -math.inf):
                continue
            s.repoint_at[n] = now + self.repoint_retry
            rec = self._new_record(svc, "repoint", spec.leadership.mode.value, cause, n, svc.primary, now)
            rec.event("detected", s.view(n).since, member=n)
            steps.append(Repoint(spec.name, rec.id, spec, n, svc.primary))
        return steps

    @staticmethod
    def _forget(s: _Service, member: str, now: float) -> None:
        v = s.view(member)
        v.status, v.since, v.upstream = MemberStatus.UNKNOWN, now, None

    def _repoint_done(self, step: Repoint, result: StepResult, now: float) -> list[Step]:
        rec = self.record(step.record_id)
        s = self._services.get(step.service)
        ok = isinstance(result, PromoteResult) and result.ok
        if ok and s is not None:
            self._forget(s, step.member, now)
        if s is not None and isinstance(result, PromoteResult) and result.needs_rejoin:
            s.needs_rejoin.update(result.needs_rejoin)
        if rec is not None:
            detail = result.detail if isinstance(result, PromoteResult) else getattr(result, "message", "")
            if isinstance(result, PromoteResult):
                rec.needs_rejoin = result.needs_rejoin
            rec.event("repointed" if ok else "failed", now, detail=detail)
            rec.status = "done" if ok else "failed"
            rec.reason = detail
            rec.duration_ms = round((now - rec.started_at) * 1000.0, 3)
        return []

    # --- plans ----------------------------------------------------------------------------------

    def _new_record(
        self, svc: ServiceState, kind: str, mode: str, cause: str,
        old: str | None, new: str | None, now: float,
    ) -> FailoverRecord:
        rid = f"{self.node_id}-{next(self._seq)}"
        rec = FailoverRecord(
            id=rid, service=svc.name, cause=cause, mode=mode, kind=kind, old_primary=old,
            new_primary=new, started_at=now,
            started_unix=None if self.wall_offset is None else now + self.wall_offset,
        )
        self._records.append(rec)
        return rec

    def _start(self, svc: ServiceState, s: _Service, intent: _Intent, now: float) -> list[Step]:
        mode = svc.spec.leadership.mode.value
        rec = self._new_record(svc, intent.kind, mode, intent.cause, svc.primary, intent.target, now)
        if intent.detected_at is not None:
            rec.event("detected", intent.detected_at)
        rec.event("decided", now, target=intent.target, candidates=list(intent.candidates),
                  promote=intent.promote)
        plan = _Plan(
            record=rec, kind=intent.kind, automatic=True, base_epoch=svc.epoch,
            old_primary=svc.primary, target=intent.target, candidates=list(intent.candidates),
            promote=intent.promote, phase="confirm",
        )
        s.plan = plan
        return self._advance(svc.name, s, plan, now)

    def _advance(self, name: str, s: _Service, plan: _Plan, now: float) -> list[Step]:
        """Emit the step for the plan's current phase (waiting phases emit nothing)."""
        rec = plan.record
        step: Step
        if plan.phase in ("catchup", "final_catchup"):
            plan.polls = 0
            return self._wait_check(name, s, plan, now)
        if plan.phase == "confirm":
            step = ConfirmLeadership(name, rec.id)
        elif plan.phase == "fence":
            step = Commit(name, rec.id, SetPrimary(service=name, member=None, epoch=plan.base_epoch + 1,
                                                   cause=f"fence: {rec.cause}"[:200]))
        elif plan.phase == "promote":
            svc = self.state.service(name)
            assert svc is not None and plan.target is not None
            step = Promote(name, rec.id, svc.spec, plan.target, plan.old_primary,
                           plan.fence_epoch if plan.fence_epoch is not None else plan.base_epoch)
        elif plan.phase in ("commit", "restore"):
            member = plan.target if plan.phase == "commit" else plan.old_primary
            base = plan.fence_epoch if plan.fence_epoch is not None else plan.base_epoch
            step = Commit(name, rec.id, SetPrimary(service=name, member=member, epoch=base + 1,
                                                   cause=rec.cause[:200]))
        else:
            raise AssertionError(f"phase {plan.phase} emits its step elsewhere")
        plan.outstanding = step
        return [step]

    def _after_confirm(self, name: str, s: _Service, plan: _Plan, now: float) -> list[Step]:
        svc = self.state.service(name)
        if svc is None:
            return self._finish(s, plan, now, False, "service deleted")
        if svc.epoch != plan.base_epoch:
            s.retry_at = now
            return self._finish(s, plan, now, False,
                                f"committed state moved (epoch {plan.base_epoch} -> {svc.epoch}) while confirming")
        if plan.automatic:
            intent = self._decide(svc, s, now)
            if intent is None or intent.kind != plan.kind:
                return self._finish(s, plan, now, False, "the condition cleared before anything was committed")
            plan.target = plan.record.new_primary = intent.target
            plan.candidates = list(intent.candidates)
            plan.promote = intent.promote
        plan.phase = "fence" if plan.old_primary is not None else ("promote" if plan.promote else "commit")
        return self._advance(name, s, plan, now)

    def _commit_done(self, step: Commit, s: _Service, plan: _Plan, result: StepResult, now: float) -> list[Step]:
        rec = plan.record
        name = step.service
        if not isinstance(result, CommitResult) or not result.ok or result.epoch is None:
            why = result.message if isinstance(result, CommitResult | StepFailed) else repr(result)
            s.retry_at = now + self.leadership_retry
            if plan.phase in ("commit", "restore") and plan.fence_epoch is not None:
                return self._finish(s, plan, now, False, f"commit of the new primary failed, staying fail-closed: {why}")
            return self._finish(s, plan, now, False, f"commit failed: {why}")
        rec.epoch = result.epoch
        if plan.phase == "fence":
            plan.fence_epoch = rec.fence_epoch = result.epoch
            plan.fenced_at = now
            if plan.automatic:
                _count_failover(s, self.state.service(name), now)
            rec.event("fenced", now, epoch=result.epoch)
            plan.phase = "await_fence"
            ack = AwaitProxies(name, rec.id, result.epoch, self._ack_deadline(name), "fence")
            plan.outstanding = ack
            rec.event("pushed", now, epoch=result.epoch, purpose="fence")
            return [ack]
        # commit of the new primary (or of the restored old one)
        if plan.automatic and plan.promote and plan.fence_epoch is None:
            _count_failover(s, self.state.service(name), now)  # promoting into an empty primary counts
        rec.event("committed", now, epoch=result.epoch, member=step.command.member)
        plan.phase = "await_route" if plan.phase == "commit" else "await_restore"
        ack = AwaitProxies(name, rec.id, result.epoch, self._ack_deadline(name), "route")
        plan.outstanding = ack
        rec.event("pushed", now, epoch=result.epoch, purpose="route")
        return [ack]

    def _acks_done(
        self, step: AwaitProxies, s: _Service, plan: _Plan, acks: ProxyAcks, raw: StepResult, now: float
    ) -> list[Step]:
        rec = plan.record
        name = step.service
        failure = raw.message if isinstance(raw, StepFailed) else None
        if plan.phase == "await_fence":
            rec.missed_fence = acks.missed
            rec.event("proxies_fenced", now, acks={p: round((t - rec.started_at) * 1000.0, 3)
                                                   for p, t in sorted(acks.acked.items())},
                      missed=list(acks.missed), **({"error": failure} if failure else {}))
            if plan.kind == "fail_closed" or plan.target is None:
                return self._finish(s, plan, now, True, "fail-closed: no primary is certain")
            if plan.kind == "switchover":
                plan.phase = "final_catchup"
                plan.deadline = now + plan.catchup_timeout
                return self._advance(name, s, plan, now)
            plan.phase = "promote" if plan.promote else "commit"
            return self._advance(name, s, plan, now)
        # route acks
        rec.missed_route = acks.missed
        for proxy, t in sorted(acks.acked.items(), key=lambda kv: kv[1]):
            rec.event("acked", t, proxy=proxy)
        if acks.acked:
            rec.event("first_routable", min(acks.acked.values()))
        if plan.fenced_at is not None:
            end = max(acks.acked.values()) if acks.acked and not acks.missed else now
            rec.write_unavailable_ms = round((end - plan.fenced_at) * 1000.0, 3)
        if plan.phase == "await_restore":
            return self._finish(s, plan, now, False, rec.reason or "switchover aborted: old primary restored")
        return self._finish(s, plan, now, True, "new primary routable")

    def _promote_done(self, step: Promote, s: _Service, plan: _Plan, result: StepResult, now: float) -> list[Step]:
        rec = plan.record
        if isinstance(result, PromoteResult) and result.needs_rejoin:
            s.needs_rejoin.update(result.needs_rejoin)
            rec.needs_rejoin = tuple(sorted(set(rec.needs_rejoin) | set(result.needs_rejoin)))
        if isinstance(result, PromoteResult) and result.ok:
            s.needs_rejoin.discard(step.member)
            rec.event("promoted", now, member=step.member, detail=result.detail,
                      repointed=list(result.repointed), failed=list(result.failed))
            for failed in result.failed:
                s.repoint_at.pop(failed, None)
            # What was observed of the promoted and re-pointed members predates their new roles:
            # forget it until the sources report again (UNKNOWN primary = keep, never act on it).
            for member in (step.member, *result.repointed):
                self._forget(s, member, now)
            plan.phase = "commit"
            return self._advance(step.service, s, plan, now)
        why = result.detail if isinstance(result, PromoteResult) else getattr(result, "message", repr(result))
        rec.event("promote_failed", now, member=step.member, detail=why)
        if plan.kind == "switchover":
            rec.reason = f"promotion of {step.member!r} failed ({why}): old primary restored"
            plan.phase = "restore"
            return self._advance(step.service, s, plan, now)
        # try the next candidate that is still eligible
        svc = self.state.service(step.service)
        if step.member in plan.candidates:
            plan.candidates.remove(step.member)
        if svc is not None:
            eligible, _ = self._candidates(svc, s, now, exclude=plan.old_primary)
            plan.candidates = [c for c in plan.candidates if c in eligible]
        if plan.candidates:
            plan.target = rec.new_primary = plan.candidates[0]
            plan.promote = not self._settled(s, plan.target, MemberStatus.PRIMARY, now)
            plan.phase = "promote" if plan.promote else "commit"
            return self._advance(step.service, s, plan, now)
        rec.new_primary = None
        return self._finish(s, plan, now, False, f"promotion failed for every candidate, staying fail-closed (last: {why})")

    def _wait_check(self, name: str, s: _Service, plan: _Plan, now: float) -> list[Step]:
        """Catch-up phases poll the positions with ReadPositions until caught up or the deadline."""
        if plan.phase not in ("catchup", "final_catchup") or plan.outstanding is not None:
            return []
        assert plan.target is not None and plan.old_primary is not None
        svc = self.state.service(name)
        if svc is None:
            return self._finish(s, plan, now, False, "service deleted")
        delay = 0.0 if plan.polls == 0 else self.poll_interval
        plan.polls += 1
        step = ReadPositions(name, plan.record.id, svc.spec, (plan.old_primary, plan.target), delay)
        plan.outstanding = step
        return [step]

    def _positions_done(
        self, step: ReadPositions, s: _Service, plan: _Plan, result: StepResult, now: float
    ) -> list[Step]:
        assert plan.target is not None and plan.old_primary is not None
        offsets = result.offsets if isinstance(result, Positions) else {}
        target, primary = offsets.get(plan.target), offsets.get(plan.old_primary)
        tv = s.view(plan.target)
        if target is not None:
            tv.offset, tv.offset_at = target, now
        if primary is not None:
            s.view(plan.old_primary).offset = primary
            s.view(plan.old_primary).offset_at = now
        if tv.status is MemberStatus.DOWN:
            return self._catchup_failed(step.service, s, plan, now, f"{plan.target!r} is down")
        if target is not None and primary is not None and target >= primary:
            plan.record.event("caught_up", now, phase=plan.phase, offset=target, primary_offset=primary)
            plan.phase = "confirm" if plan.phase == "catchup" else "promote"
            plan.deadline = math.inf
            return self._advance(step.service, s, plan, now)
        if now >= plan.deadline:
            lag = (primary - target) if primary is not None and target is not None else None
            failure = f": {result.message}" if isinstance(result, StepFailed) else ""
            return self._catchup_failed(step.service, s, plan, now,
                                        f"{plan.target!r} did not catch up with {plan.old_primary!r} "
                                        f"(lag {lag}){failure}")
        return self._wait_check(step.service, s, plan, now)

    def _catchup_failed(self, name: str, s: _Service, plan: _Plan, now: float, why: str) -> list[Step]:
        if plan.phase == "catchup":
            return self._finish(s, plan, now, False, f"{why}: nothing changed")
        plan.record.reason = f"{why} after fencing: old primary restored"
        plan.phase = "restore"
        return self._advance(name, s, plan, now)

    def _ack_deadline(self, name: str) -> float:
        svc = self.state.service(name)
        return svc.spec.leadership.ack_deadline if svc is not None else 2.0

    def _finish(self, s: _Service, plan: _Plan, now: float, ok: bool, reason: str) -> list[Step]:
        rec = plan.record
        rec.status = "done" if ok else "failed"
        rec.reason = reason
        rec.duration_ms = round((now - rec.started_at) * 1000.0, 3)
        rec.event("done" if ok else "failed", now, reason=reason)
        s.plan = None
        return [Done(rec.service, rec.id, ok, reason)]
