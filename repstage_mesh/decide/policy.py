"""The primary-choice policy: who should be primary of one service, from committed state plus
observations only, and the hysteresis that limits how often that may change.

- follow (someone else promotes): the member observed PRIMARY becomes the committed primary.
  When two members claim PRIMARY, the committed one is kept unless it reports a lower offset or
  replicates from the other. The committed primary DOWN (or REPLICA) and nobody claiming
  PRIMARY: fail closed. Never route to a guess.
- orchestrate (RepStage promotes): the committed primary DOWN -> the replica with the highest
  offset (ties: member order), refusing DOWN/UNKNOWN members, members not settled in their
  status, and members further behind than `max_lag_bytes`. An old primary that comes back
  claiming PRIMARY, or a replica that follows another upstream than the committed primary, is
  a stray to re-point (`Choice.strays`).
- announce: never decided here (the API commits the announced primary, fenced by the epoch).

Hysteresis: a plan that moves the primary away from a member, or promotes one, is an automatic
failover; at most one per service per `min_failover_interval` (a later one is deferred, not
dropped). Filling an empty primary with a member that stably claims PRIMARY is not a failover.
A candidate must have been in its status for `settle` seconds. Failovers in a row (each within
twice the current interval of the last) double the interval each time, up to `MAX_BACKOFF` x,
so a primary that keeps flapping does not ping-pong forever (the streak ends after a quiet
period).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from repstage_mesh.core.models import (
    LeadershipMode,
    LeadershipSource,
    ServiceSpec,
    ServiceState,
)
from repstage_mesh.core.observations import MemberStatus
from repstage_mesh.decide.view import MemberView, ServiceView

__all__ = [
    "MAX_BACKOFF",
    "Choice",
    "Intent",
    "backoff",
    "count_failover",
    "replicates_from",
    "settled",
]

MAX_BACKOFF = 32  # the interval grows at most to 32 x min_failover_interval


def backoff(interval: float, streak: int) -> float:
    """A primary that keeps failing right after each failover (flapping) waits longer each
    time, like Sentinel's doubling failover timeout: interval x 2^(streak - 1), capped."""
    return interval * min(MAX_BACKOFF, 2 ** max(0, streak - 1))


def count_failover(s: ServiceView, svc: ServiceState | None, now: float) -> None:
    base = svc.spec.leadership.min_failover_interval if svc is not None else 0.0
    recent = now - s.last_failover_at < 2 * backoff(base, s.streak)
    s.streak = s.streak + 1 if recent else 1
    s.last_failover_at = now


def replicates_from(spec: ServiceSpec, view: MemberView, other: str) -> bool:
    member = spec.member(other)
    return view.upstream is not None and member is not None and view.upstream in (
        other, f"{member.address}:{member.port}"
    )


def settled(s: ServiceView, member: str, status: MemberStatus, now: float, settle: float) -> bool:
    """`member` is observed in `status` and has been for at least `settle` seconds."""
    v = s.views.get(member)
    return v is not None and v.seen and v.status is status and now - v.since >= settle


@dataclass(frozen=True)
class Intent:
    """What the policy wants changed: the plan a decider would start for it."""

    kind: Literal["failover", "fail_closed", "adopt"]
    target: str | None
    candidates: tuple[str, ...]
    promote: bool
    cause: str
    detected_at: float | None


class Choice:
    """The policy for one service at one instant, over its view. Reads the view (creating
    member entries as it looks them up) and sets `s.blocked` when it declines to act."""

    def __init__(self, svc: ServiceState, s: ServiceView, now: float, settle: float) -> None:
        self.svc = svc
        self.spec = svc.spec
        self.s = s
        self.now = now
        self.settle = settle
        self.order = [m.name for m in svc.spec.members]
        self.orchestrate = svc.spec.leadership.mode is LeadershipMode.ORCHESTRATE

    def settled(self, member: str, status: MemberStatus) -> bool:
        return settled(self.s, member, status, self.now, self.settle)

    # --- who should be primary ------------------------------------------------------------------

    def decide(self) -> Intent | None:
        """What should change about the primary now; None: nothing (`s.blocked` may say why)."""
        if self.spec.leadership.source is LeadershipSource.ANNOUNCE:
            return None
        primary = self.svc.primary
        claimers = [n for n in self.order if n != primary and self.settled(n, MemberStatus.PRIMARY)]
        if primary is None:
            return self._fill(claimers)
        pv = self.s.view(primary)
        if not pv.seen or pv.status is MemberStatus.UNKNOWN:
            self.s.blocked = f"no information about primary {primary!r}: keeping it"
            return None
        if pv.status is MemberStatus.PRIMARY:
            return self._split_brain(primary, claimers)
        return self._replace(primary, pv, claimers)

    def _split_brain(self, primary: str, claimers: list[str]) -> Intent | None:
        """The committed primary claims PRIMARY: keep it unless a claimer supersedes it."""
        if self.orchestrate or not claimers:
            return None  # orchestrate: the committed primary is the truth; others get Repoint
        better = [n for n in claimers if self._supersedes(n, primary)]
        if not better:
            self.s.blocked = f"{claimers} also claim primary; keeping {primary!r} (not behind them)"
            return None
        best = self._best(better)
        return Intent("failover", best, (best,), False,
                      f"split brain: {best!r} claims primary and {primary!r} is behind it or replicates from it",
                      self.now)

    def _replace(self, primary: str, pv: MemberView, claimers: list[str]) -> Intent:
        """The committed primary is DOWN or REPLICA (in follow mode, REPLICA means demoted by
        its orchestrator: whoever claims PRIMARY takes over)."""
        lost = f"primary {primary!r} is {pv.status.value}" + (f" ({pv.detail})" if pv.detail else "")
        detected = pv.since
        if self.orchestrate:
            candidates, refused = self.candidates(exclude=primary)
            if candidates:
                best = candidates[0]
                promote = not self.settled(best, MemberStatus.PRIMARY)
                return Intent("failover", best, tuple(candidates), promote, lost, detected)
            return Intent("fail_closed", None, (), False, f"{lost}; no eligible replica ({refused})", detected)
        if claimers:
            best = self._best(claimers)
            return Intent("failover", best, (best,), False, f"{lost}; {best!r} claims primary", detected)
        return Intent("fail_closed", None, (), False, f"{lost}; no member claims primary", detected)

    def _fill(self, claimers: list[str]) -> Intent | None:
        """No primary: fill it only with certainty."""
        s = self.s
        if claimers:
            return self._adopt(claimers)
        if not self.orchestrate:
            s.blocked = "no member claims primary: fail-closed"
            return None
        unknown = [n for n in self.order if not s.view(n).seen or s.view(n).status is MemberStatus.UNKNOWN]
        if unknown:
            s.blocked = f"no primary; members not yet observed: {unknown}"
            return None
        if any(s.view(n).status is MemberStatus.PRIMARY for n in self.order):
            s.blocked = "a member claims primary but has not settled"
            return None
        candidates, refused = self.candidates(exclude=None)
        if not candidates:
            s.blocked = f"no primary and no eligible replica ({refused})"
            return None
        return Intent("failover", candidates[0], tuple(candidates), True,
                      "no primary: promoting the most advanced replica", None)

    def _adopt(self, claimers: list[str]) -> Intent | None:
        """Settled claimers of an empty primary: adopt the one, or the one most advanced."""
        if len(claimers) > 1:
            offsets = {n: self.s.view(n).offset for n in claimers}
            top = max((o for o in offsets.values() if o is not None), default=None)
            leaders = [n for n in claimers if top is not None and offsets[n] == top]
            if len(leaders) != 1:
                self.s.blocked = f"several members claim primary ({claimers}): staying fail-closed"
                return None
            claimers = leaders
        return Intent("adopt", claimers[0], (claimers[0],), False,
                      f"{claimers[0]!r} claims primary", None)

    def _supersedes(self, challenger: str, primary: str) -> bool:
        pv, cv = self.s.view(primary), self.s.view(challenger)
        if replicates_from(self.spec, cv, primary):
            return False
        if replicates_from(self.spec, pv, challenger):
            return True
        return pv.offset is not None and cv.offset is not None and pv.offset < cv.offset

    def _rank(self, name: str) -> tuple[int, int]:
        """Sort key: highest offset first (unknown counts as lowest), then member order."""
        offset = self.s.view(name).offset
        return (-(offset if offset is not None else -1), self.order.index(name))

    def _best(self, names: Iterable[str]) -> str:
        return min(names, key=self._rank)

    # --- who may be promoted, who must be re-pointed ----------------------------------------------

    def candidates(self, exclude: str | None) -> tuple[list[str], str]:
        """The members eligible for promotion, best first, and why the others were refused."""
        s = self.s
        max_lag = self.spec.leadership.max_lag_bytes
        pool = [n for n in self.order if n != exclude]
        known = [s.view(n).offset for n in [*pool, *([exclude] if exclude else [])]]
        reference = max((o for o in known if o is not None), default=None)
        ok: list[str] = []
        refused: list[str] = []
        for n in pool:
            v = s.view(n)
            if not v.seen or v.status in (MemberStatus.DOWN, MemberStatus.UNKNOWN):
                refused.append(f"{n}: {v.status.value if v.seen else 'not observed'}")
                continue
            if self.now - v.since < self.settle:
                refused.append(f"{n}: {v.status.value} for only {self.now - v.since:.3f}s")
                continue
            if max_lag is not None:
                if v.offset is None or reference is None:
                    refused.append(f"{n}: offset unknown and max_lag_bytes is set")
                    continue
                if reference - v.offset > max_lag:
                    refused.append(f"{n}: {reference - v.offset} bytes behind > max_lag_bytes {max_lag}")
                    continue
            ok.append(n)
        ok.sort(key=self._rank)
        return ok, "; ".join(refused) or "none"

    def strays(self) -> list[tuple[str, str]]:
        """Orchestrate mode, committed primary settled as PRIMARY: the other members that claim
        PRIMARY or replicate from someone else, each with the cause (not yet rate-limited)."""
        primary = self.svc.primary
        if not self.orchestrate or primary is None:
            return []
        if not self.settled(primary, MemberStatus.PRIMARY):
            return []
        out: list[tuple[str, str]] = []
        for n in self.order:
            if n == primary or n in self.s.needs_rejoin:
                continue
            v = self.s.view(n)
            if self.settled(n, MemberStatus.PRIMARY):
                cause = f"{n!r} claims primary while {primary!r} is the committed primary"
            elif (self.settled(n, MemberStatus.REPLICA) and v.upstream is not None
                  and not replicates_from(self.spec, v, primary)):
                cause = f"{n!r} replicates from {v.upstream}, not from the primary {primary!r}"
            else:
                continue
            out.append((n, cause))
        return out
