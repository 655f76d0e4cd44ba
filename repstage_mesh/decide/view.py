"""The decider's per-service view: what the latest observations say about each member, plus the
bookkeeping the policy and the plans keep per service (running plan, hysteresis, re-points:
one in flight and one record per member and outage, with back-off, members waiting for an operator to re-join them, why nothing is done).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from repstage_mesh.core.observations import MemberStatus

if TYPE_CHECKING:
    from repstage_mesh.decide.plan import Plan

__all__ = ["MemberView", "ServiceView"]


@dataclass
class MemberView:
    """What the latest observations say about one member."""

    status: MemberStatus = MemberStatus.UNKNOWN
    since: float = -math.inf  # when `status` began
    seen: bool = False
    offset: int | None = None  # last known offset (kept across DOWN)
    offset_at: float = -math.inf
    upstream: str | None = None
    detail: str = ""


@dataclass
class ServiceView:
    """One service as the decider sees it: its members, its running plan, its bookkeeping."""

    views: dict[str, MemberView] = field(default_factory=dict)
    plan: Plan | None = None
    last_failover_at: float = -math.inf
    streak: int = 0  # automatic failovers in a row, each within twice the interval of the last
    retry_at: float = -math.inf
    repoint_at: dict[str, float] = field(default_factory=dict)
    repoint_record: dict[str, str] = field(default_factory=dict)  # member -> its open repoint record
    repoint_failures: dict[str, int] = field(default_factory=dict)  # failed attempts in a row
    repointing: set[str] = field(default_factory=set)  # members with a Repoint in flight
    needs_rejoin: set[str] = field(default_factory=set)
    blocked: str = ""

    def view(self, member: str) -> MemberView:
        v = self.views.get(member)
        if v is None:
            v = self.views[member] = MemberView()
        return v

    def forget(self, member: str, now: float) -> None:
        """What was observed of `member` predates its new role: UNKNOWN until sources report."""
        v = self.view(member)
        v.status, v.since, v.upstream = MemberStatus.UNKNOWN, now, None
