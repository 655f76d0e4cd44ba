"""Which member a snapshot is taken from (sans-IO).

By default a replica: the most caught-up one (highest replication offset) among those the
sources see as healthy replicas within `lag_bound_bytes` of the primary (or of the furthest
member when the primary's offset is unknown). The primary only when asked (`"primary"`) or when
no replica qualifies. A member's name asks for that member (refused if it is not one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from repstage_mesh.core.errors import SnapshotRefused
from repstage_mesh.core.models import Role, ServiceState

__all__ = ["Choice", "MemberReport", "choose_member"]


@dataclass(frozen=True)
class MemberReport:
    """What the leader's sources say of one member: healthy replica? its offset."""

    replica: bool
    offset: int | None = None


@dataclass(frozen=True)
class Choice:
    member: str
    role: Role
    reason: str
    fallback: bool = False  # the primary because no replica qualified


def choose_member(
    service: ServiceState, reports: Mapping[str, MemberReport], lag_bound: int, ask: str = "replica"
) -> Choice:
    if ask not in ("replica", "primary"):
        if service.spec.member(ask) is None:
            members = [m.name for m in service.spec.members]
            raise SnapshotRefused("not_found", f"{ask!r} is not a member of {service.name!r} (members: {members})", "member")
        return Choice(ask, service.role_of(ask), "asked for by name")
    if ask == "primary":
        return _primary(service, "asked for")
    offsets = [r.offset for r in reports.values() if r.offset is not None]
    primary_offset = reports.get(service.primary or "", MemberReport(False)).offset
    reference = primary_offset if primary_offset is not None else max(offsets, default=None)
    refused: list[str] = []
    best: tuple[int, str] | None = None
    for m in sorted(m.name for m in service.spec.members):
        if m == service.primary:
            continue
        report = reports.get(m)
        if report is None or not report.replica:
            refused.append(f"{m}: not seen as a healthy replica")
            continue
        if reference is None or report.offset is None:
            refused.append(f"{m}: replication offset unknown")
            continue
        lag = reference - report.offset
        if lag > lag_bound:
            refused.append(f"{m}: {lag} bytes behind > lag_bound_bytes {lag_bound}")
            continue
        if best is None or report.offset > best[0]:
            best = (report.offset, m)
    if best is not None:
        lag = (reference or 0) - best[0]
        return Choice(best[1], Role.REPLICA, f"most caught-up replica ({lag} bytes behind)")
    choice = _primary(service, "no replica qualifies: " + "; ".join(refused or ["no replicas"]))
    return Choice(choice.member, choice.role, choice.reason, fallback=True)


def _primary(service: ServiceState, reason: str) -> Choice:
    if service.primary is None:
        raise SnapshotRefused("conflict", f"service {service.name!r} has no primary now ({reason})", "member")
    return Choice(service.primary, Role.PRIMARY, f"the primary: {reason}")
