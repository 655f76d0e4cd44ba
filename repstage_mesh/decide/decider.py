"""The failover decider (sans-IO): who should be primary, and the break-before-make plan to get there.

No asyncio, no clock, no I/O: committed state comes in through `on_state`, what the sources
see comes in through `observe`, time comes in as `now` (monotonic seconds, the same clock as
`Observation.at`), and decisions go out as `Step`s. Whoever executes a step (failover.py's
`FailoverRunner`, or a test) reports its result with `step_done`, which returns the next steps.

`Decider` is the facade over the pieces of this package:

- `policy`: who should be primary (follow / orchestrate / announce), hysteresis and back-off;
- `plan`: the per-service plan (at most one at a time), its phases and the transition table;
- `records`: the bounded history of failover records (this node's only: not replicated);
- `view`: what the observations say about each member; `steps`: the steps and their results.

A planned switchover (`switchover(service, target, now)`) waits for the target to catch up,
runs the same break-before-make plan, and reports the write-unavailable window: fence
committed -> the new primary's commit ACKed by every proxy. An old primary that comes back
claiming PRIMARY, or a replica following another upstream, gets a `Repoint` step (nothing is
committed for it): at most one in flight per member, and one record per member and outage
whose `attempts` count the tries (failed tries back off, doubling `repoint_retry` up to
`MAX_REPOINT_RETRY`); the record ends when the member is re-pointed or is seen replicating from
the primary. After a promotion or re-point, what was observed of those members is forgotten
(UNKNOWN) until the sources report again.

An announce (`announce(service, member, now, ...)`: the caller's orchestrator already promoted
`member`) runs the same break-before-make plan without a promotion, plus `AwaitClose` after the
fence; the caller's fencing token rides on its first commit.
"""

from __future__ import annotations

import math
from typing import Any

from repstage_mesh.core.errors import DecisionRefused
from repstage_mesh.core.models import AuditTag, LeadershipMode, MeshState, ServiceState
from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.decide.plan import Plan, Planner, finish
from repstage_mesh.decide.policy import Choice, Intent, backoff, settled
from repstage_mesh.decide.records import FailoverRecord, History
from repstage_mesh.decide.steps import Commit, Done, PromoteResult, Repoint, Step, StepResult
from repstage_mesh.decide.view import ServiceView

__all__ = ["MAX_REPOINT_RETRY", "Decider", "DecisionRefused"]

MAX_REPOINT_RETRY = 30.0  # seconds: the longest back-off between failed re-points of one member


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
        self.settle = settle
        self.catchup_timeout = catchup_timeout
        self.leadership_retry = leadership_retry
        self.repoint_retry = repoint_retry
        self.poll_interval = poll_interval
        self.state = MeshState()
        self._services: dict[str, ServiceView] = {}
        self._history = History(
            node_id, history, wall_offset, taken=lambda rid: self.state.failover(rid) is not None
        )
        self._planner = Planner(self)

    @property
    def node_id(self) -> str:
        return self._history.node_id

    @node_id.setter
    def node_id(self, value: str) -> None:
        self._history.node_id = value

    @property
    def wall_offset(self) -> float | None:
        return self._history.wall_offset

    @wall_offset.setter
    def wall_offset(self, value: float | None) -> None:
        self._history.wall_offset = value

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
        svc = self._switchover_service(service, target, timeout)
        s = self._svc(service)
        if s.plan is not None:
            raise DecisionRefused(
                "conflict", f"a failover of {service!r} is already running ({s.plan.record.id})", "service"
            )
        view = s.views.get(target)
        if view is None or view.status is not MemberStatus.REPLICA:
            status = view.status.value if view is not None and view.seen else "not observed"
            raise DecisionRefused("conflict", f"{target!r} is {status}, not a replica that can take over", "to")
        record = self._history.start(svc.name, "switchover", "switchover", cause, svc.primary, target, now)
        plan = Plan(
            record=record, kind="switchover", automatic=False, base_epoch=svc.epoch,
            old_primary=svc.primary, target=target, candidates=[], promote=True, phase="catchup",
            deadline=now + (timeout if timeout is not None else self.catchup_timeout),
            catchup_timeout=timeout if timeout is not None else self.catchup_timeout,
        )
        s.plan = plan
        record.event("decided", now, target=target, timeout=plan.deadline - now)
        return record.id, self._planner.enter(s, plan, plan.phase, now)

    def announce(
        self, service: str, member: str | None, now: float, *, token: int | None = None,
        cause: str = "announce", fence: bool = True, close_wait: float = 0.0,
        key: str | None = None, trace_parent: dict[str, str] | None = None, by: AuditTag | None = None,
    ) -> tuple[str, list[Step]]:
        """Start an announced change: `member` (None: no primary is known) is the primary its
        own orchestrator made. Break-before-make unless `fence` is false; `close_wait` seconds
        after the fence ACKs (the proxies close their connections to the old primary). Returns
        (record id, steps); raises DecisionRefused and changes nothing when it cannot run."""
        svc = self.state.service(service)
        if svc is None:
            raise DecisionRefused("not_found", f"no service named {service!r}", "service")
        if member is not None and svc.spec.member(member) is None:
            members = [m.name for m in svc.spec.members]
            raise DecisionRefused("not_found", f"{member!r} is not a member of service {service!r} (members: {members})", "member")
        if token is not None and token <= svc.claim:
            raise DecisionRefused(
                "stale_epoch", f"epoch {token} is stale: the orchestrator's epoch (fencing token) of service "
                f"{service!r} is already {svc.claim}; a claim must be greater", "epoch")
        s = self._svc(service)
        if s.plan is not None:
            raise DecisionRefused(
                "conflict", f"a change of {service!r} is already running ({s.plan.record.id}); retry when it ends", "service"
            )
        mode = svc.spec.leadership.mode.value
        record = self._history.start(svc.name, "announce", mode, cause, svc.primary, member, now)
        record.claim, record.request_key, record.trace_parent = token, key, trace_parent
        record.event("decided", now, target=member, fence=fence)
        # No ConfirmLeadership: an announce promotes nothing, and its first commit (checked
        # against the epoch it saw) is refused if the state moved or this leader is stale.
        fencing = fence and svc.primary is not None and svc.primary != member
        plan = Plan(
            record=record, kind="announce", automatic=False, base_epoch=svc.epoch,
            old_primary=svc.primary, target=member, candidates=[], promote=False,
            phase="fence" if fencing else "commit", fence=fence, token=token,
            close_wait=close_wait if fence else 0.0, by=by,
        )
        s.plan = plan
        return record.id, self._planner.enter(s, plan, plan.phase, now)

    def step_done(self, step: Step, result: StepResult, now: float) -> list[Step]:
        """Report the result of an executed step; returns the next steps."""
        if isinstance(step, Repoint):
            return self._repoint_done(step, result, now)
        s = self._services.get(step.service)
        plan = s.plan if s is not None else None
        if s is None or plan is None or plan.record.id != step.record_id or plan.outstanding != step:
            return []  # not the step we wait for (a late answer of an ended plan)
        return self._planner.step_done(s, plan, step, result, now)

    def abandon(self, now: float, reason: str) -> list[Done]:
        """End every running plan as failed (the executor stopped: leadership lost, shutdown).
        What was committed stays committed; the next leader decides from there.

        Every observation is forgotten too: what this node saw while it led says nothing about
        the members when it leads again (a failover may have happened in between). Found by the
        chaos suite: a node that led again acted on its old views (the committed primary still
        "REPLICA", a demoted member still "PRIMARY") and failed over to the wrong member."""
        done: list[Done] = []
        for s in self._services.values():
            if s.plan is not None:
                # a commit in flight may still apply: unknown; otherwise nothing more will
                s.plan.record.error_code = "commit_timeout" if isinstance(s.plan.outstanding, Commit) else "no_quorum"
                for step in finish(s, s.plan, now, False, f"abandoned: {reason}"):
                    assert isinstance(step, Done)
                    done.append(step)
            s.views.clear()
        return done

    # --- reads ------------------------------------------------------------------------------

    def records(self) -> list[FailoverRecord]:
        """Recent records, newest first (this node's history only)."""
        return self._history.newest_first()

    def record(self, record_id: str) -> FailoverRecord | None:
        return self._history.get(record_id)

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

    def _svc(self, name: str) -> ServiceView:
        s = self._services.get(name)
        if s is None:
            s = self._services[name] = ServiceView()
        return s

    def _switchover_service(self, service: str, target: str, timeout: float | None) -> ServiceState:
        """The service a switchover to `target` may run on (DecisionRefused when it may not)."""
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
        return svc

    def _evaluate(self, name: str, now: float) -> list[Step]:
        svc = self.state.service(name)
        s = self._services.get(name)
        if s is None:
            return []
        if s.plan is not None:
            return self._planner.poll(s, s.plan, now)
        if svc is None:
            return []
        steps = self._repoints(svc, s, now)
        if now < s.retry_at:
            return steps
        intent = Choice(svc, s, now, self.settle).decide()
        if intent is None:
            return steps
        counted = intent.kind != "adopt"
        interval = backoff(svc.spec.leadership.min_failover_interval, s.streak)
        if counted and now - s.last_failover_at < interval:
            s.blocked = (
                f"deferred by hysteresis until {s.last_failover_at + interval:.3f}: {intent.cause}"
            )
            return steps
        s.blocked = ""
        return steps + self._start(svc, s, intent, now)

    def _start(self, svc: ServiceState, s: ServiceView, intent: Intent, now: float) -> list[Step]:
        mode = svc.spec.leadership.mode.value
        rec = self._history.start(svc.name, intent.kind, mode, intent.cause, svc.primary, intent.target, now)
        if intent.detected_at is not None:
            rec.event("detected", intent.detected_at)
        rec.event("decided", now, target=intent.target, candidates=list(intent.candidates),
                  promote=intent.promote)
        plan = Plan(
            record=rec, kind=intent.kind, automatic=True, base_epoch=svc.epoch,
            old_primary=svc.primary, target=intent.target, candidates=list(intent.candidates),
            promote=intent.promote, phase="confirm",
        )
        s.plan = plan
        return self._planner.enter(s, plan, plan.phase, now)

    # --- re-pointing strays (no plan: nothing is committed for them) ---------------------------

    def _repoints(self, svc: ServiceState, s: ServiceView, now: float) -> list[Step]:
        spec = svc.spec
        strays = dict(Choice(svc, s, now, self.settle).strays())
        self._close_repoints(svc, s, strays, now)
        steps: list[Step] = []
        for n, cause in strays.items():
            assert svc.primary is not None
            if n in s.repointing or now < s.repoint_at.get(n, -math.inf):
                continue  # one in flight per member; failed ones back off
            rec = self.record(s.repoint_record.get(n, ""))
            if rec is None or rec.status != "running":
                rec = self._history.start(svc.name, "repoint", spec.leadership.mode.value, cause, n, svc.primary, now)
                rec.event("detected", s.view(n).since, member=n)
                s.repoint_record[n] = rec.id
            rec.attempts += 1
            s.repointing.add(n)
            steps.append(Repoint(spec.name, rec.id, spec, n, svc.primary))
        return steps

    def _close_repoints(self, svc: ServiceState, s: ServiceView, strays: dict[str, str], now: float) -> None:
        """End the open repoint records of members that no longer need one: seen replicating
        from the primary, removed from the service, or no longer a replica-to-be (the primary)."""
        for n, record_id in list(s.repoint_record.items()):
            if n in strays or n in s.repointing:
                continue
            gone = svc.spec.member(n) is None or n == svc.primary
            if not gone and not settled(s, n, MemberStatus.REPLICA, now, 0.0):
                continue  # down or unknown: the same outage goes on
            del s.repoint_record[n]
            s.repoint_failures.pop(n, None)
            rec = self.record(record_id)
            if rec is not None and rec.status == "running":
                why = "no longer needs re-pointing" if not gone else "no longer a member or now the primary"
                rec.event("done", now, reason=why)
                rec.end(now, True, why)

    def _repoint_done(self, step: Repoint, result: StepResult, now: float) -> list[Step]:
        rec = self.record(step.record_id)
        s = self._services.get(step.service)
        ok = isinstance(result, PromoteResult) and result.ok
        detail = result.detail if isinstance(result, PromoteResult) else getattr(result, "message", "")
        if s is not None:
            s.repointing.discard(step.member)
            failures = 0 if ok else s.repoint_failures.get(step.member, 0) + 1
            s.repoint_failures[step.member] = failures
            s.repoint_at[step.member] = now + min(MAX_REPOINT_RETRY, self.repoint_retry * 2 ** max(0, failures - 1))
            if ok:
                s.forget(step.member, now)
                s.repoint_record.pop(step.member, None)
            if isinstance(result, PromoteResult) and result.needs_rejoin:
                s.needs_rejoin.update(result.needs_rejoin)
        if rec is None or rec.status != "running":
            return []
        if isinstance(result, PromoteResult):
            rec.needs_rejoin = result.needs_rejoin
        if ok or (isinstance(result, PromoteResult) and result.needs_rejoin):
            rec.event("repointed" if ok else "failed", now, detail=detail, attempts=rec.attempts)
            rec.end(now, ok, detail)
        elif detail != rec.reason:  # a timeline event per new error, not per attempt
            rec.reason = detail
            rec.event("attempt_failed", now, detail=detail, attempt=rec.attempts)
        return []
