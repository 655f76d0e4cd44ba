"""What a Consul health answer says about each member (sans-IO: data in, Observations out).

`read_health(spec, answer, tag, now)` turns one `/v1/health/service/<name>` answer into one
Observation per member plus the anomalies worth a log line and a metric; `BlockingIndex` holds
Consul's blocking-query index rules. Nothing here does I/O; `sources/consul.py` does.

The decisions (README, "Consul as a leadership source", says why):

- **Matching.** An instance is a member's when its Service ID is the member's name, or ends in
  `/<member>` (Patroni registers `scope/name`), else when its address:port is the member's (the
  service address, or the node's when the service has none; host names compared without case;
  no DNS lookups). Two or more instances matching one member: UNKNOWN (refuse to guess).
- **Checks.** Every check of the entry counts, node-level ones too (serfHealth, `_node_maintenance`,
  custom node checks) and `_service_maintenance:<id>`. Any check critical (or any status other
  than passing/warning) makes the member DOWN. `warning` is healthy but flagged (detail, metric),
  as Consul's DNS answers with instances at warning by default. An instance with no service check at all is
  judged on its tags and node checks (as Consul's `?passing` does), flagged `no_checks`.
- **Stale checks.** Patroni re-registers on every role change with a new check URL and Consul
  keeps the previous status: an HTTP check whose Output names another URL than its definition
  was measured against the previous role, so it is ignored until it has run on the new URL.
- **Primary.** Passing and tagged `tag` (with the default `primary`, Patroni 2.x's `master`
  counts too) is PRIMARY, else REPLICA. Several PRIMARY instances of a follow-mode service: the
  newest registration (highest Service.ModifyIndex) wins, the older ones are DOWN ("superseded");
  in orchestrate mode every claim goes to the decider, which keeps the committed primary.
- **Absent members.** A member with no instance in a non-empty answer is DOWN ("not registered").
  In an answer filtered by ACLs (`X-Consul-Results-Filtered-By-ACLs: true`) it is UNKNOWN, and in
  an empty answer every member is UNKNOWN: Consul answers `200 []` when the token may not read
  the service or its nodes (and says so only to an authenticated token), so an empty answer is
  no proof that anything is down, and never makes RepStage fail closed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from repstage_mesh.core.models import LeadershipMode, ServiceSpec
from repstage_mesh.core.observations import MemberStatus, Observation

__all__ = [
    "Anomaly",
    "BlockingIndex",
    "HealthAnswer",
    "QueryPacer",
    "Reading",
    "primary_tags",
    "read_health",
]

SOURCE = "consul"
PATRONI_2_PRIMARY_TAG = "master"

# Consul's HTTP check output: `HTTP GET <url>: 200 OK Output: ...`; a transport error from Go's
# client: `Get "<url>": dial tcp ...`.
_CHECK_URL = re.compile(r'^(?:HTTP [A-Z]+ (\S+?): |[A-Z][a-z]+ "([^"]+)": )')


@dataclass(frozen=True)
class HealthAnswer:
    """One answer of `/v1/health/service/<name>`: the X-Consul-Index, the entries, and whether
    Consul said it left some out for ACLs (X-Consul-Results-Filtered-By-ACLs)."""

    index: int
    entries: Sequence[Mapping[str, Any]]
    filtered_by_acls: bool = False


@dataclass(frozen=True)
class Anomaly:
    """Something in an answer worth a log line and a metric (`kind` is the metric label):
    acl_filtered, empty_answer, ambiguous, superseded, stale_check, no_checks, warning."""

    kind: str
    member: str | None
    message: str


@dataclass(frozen=True)
class Reading:
    observations: dict[str, Observation]
    anomalies: tuple[Anomaly, ...] = ()


@dataclass
class BlockingIndex:
    """Consul's blocking-query index rules (its "Implementation Details"):

    - send the last X-Consul-Index back as `index`;
    - an index that goes backwards resets the watch: the next query sends none (does not block)
      and the answer counts as new;
    - an index of 0 (a Consul bug, seen in old versions) is a reset too, and the next query
      sends 1, which always blocks, so the loop cannot spin;
    - after an error the next query sends none: the first answer after an outage is read in
      full, whatever its index.
    """

    value: int | None = None
    resets: int = 0

    def answered(self, index: int) -> bool:
        """Record an answer's index; True when it was a reset."""
        previous = self.value
        if index <= 0:
            self.resets += 1
            self.value = 1
            return True
        if previous is not None and index < previous:
            self.resets += 1
            self.value = None
            return True
        self.value = index
        return False

    def failed(self) -> None:
        self.value = None


@dataclass
class QueryPacer:
    """Consul's third blocking-query rule: rate-limit the loop so that a result churning fast
    (or a misbehaving index) degrades into polling instead of a busy loop. A token bucket: up
    to `burst` queries at once, then `rate` per second; `delay(now)` is how long to wait before
    the next query (0 in the happy case: a change is never held up by it)."""

    rate: float
    burst: int
    tokens: float = -1.0
    stamp: float = 0.0
    limited: int = 0  # queries that had to wait

    def delay(self, now: float) -> float:
        if self.tokens < 0:
            self.tokens, self.stamp = float(self.burst), now
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        self.limited += 1
        wait = (1 - self.tokens) / self.rate
        self.tokens, self.stamp = 0.0, now + wait
        return wait


def primary_tags(tag: str) -> frozenset[str]:
    """The tags that mark the primary: `tag`, and Patroni 2.x's `master` with the default."""
    return frozenset({tag, PATRONI_2_PRIMARY_TAG} if tag == "primary" else {tag})


# --- one instance ------------------------------------------------------------------------------


@dataclass
class _Verdict:
    status: MemberStatus
    detail: str
    modify_index: int
    anomalies: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)


def _check_name(check: Mapping[str, Any]) -> str:
    return str(check.get("CheckID") or check.get("Name") or "?")


def _describe(check: Mapping[str, Any]) -> str:
    output = str(check.get("Output") or check.get("Notes") or "").strip().replace("\n", " ")[:120]
    text = f"{check.get('Status')}: {_check_name(check)}"
    return text + (f" ({output})" if output else "")


def stale_check(check: Mapping[str, Any]) -> bool:
    """An HTTP check whose last Output was measured on another URL than its definition's."""
    url = (check.get("Definition") or {}).get("HTTP")
    match = _CHECK_URL.match(str(check.get("Output") or ""))
    if not url or match is None:
        return False
    return (match.group(1) or match.group(2)) != url


def _instance(entry: Mapping[str, Any], tags: frozenset[str]) -> _Verdict:
    service = entry.get("Service") or {}
    checks: list[Mapping[str, Any]] = list(entry.get("Checks") or [])
    modify_index = int(service.get("ModifyIndex") or 0)
    stale = [c for c in checks if c.get("ServiceID") and stale_check(c)]
    counted = [c for c in checks if c not in stale]
    failing = [c for c in counted if c.get("Status") not in ("passing", "warning")]
    if failing:
        return _Verdict(MemberStatus.DOWN, "; ".join(_describe(c) for c in failing), modify_index)
    own_tags = list(service.get("Tags") or [])
    primary = bool(tags.intersection(own_tags))
    status = MemberStatus.PRIMARY if primary else MemberStatus.REPLICA
    notes = [f"passing, tagged {sorted(tags.intersection(own_tags))[0]!r}" if primary
             else f"passing, tags {own_tags}"]
    verdict = _Verdict(status, "", modify_index)
    warnings = [c for c in counted if c.get("Status") == "warning"]
    if warnings:
        text = "; ".join(_describe(c) for c in warnings)
        notes.append(text)
        verdict.anomalies.append(("warning", f"healthy with a check at warning: {text}"))
    if stale:
        text = ", ".join(_check_name(c) for c in stale)
        notes.append(f"ignored until run on its new URL: {text}")
        verdict.anomalies.append(
            ("stale_check", f"check {text} kept its status from a previous registration")
        )
    if not any(c.get("ServiceID") for c in checks):
        notes.append("no service check")
        verdict.anomalies.append(
            ("no_checks", "registered without a service check: only its tags and node vouch for it")
        )
    verdict.detail = "; ".join(notes)
    return verdict


# --- the whole answer --------------------------------------------------------------------------


def _entry_address(entry: Mapping[str, Any]) -> str:
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    return str(service.get("Address") or node.get("Address") or "").lower()


def _match(spec: ServiceSpec, entries: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    names = {m.name for m in spec.members}
    by_endpoint = {(m.address.lower(), m.port): m.name for m in spec.members}
    found: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        service = entry.get("Service") or {}
        service_id = str(service.get("ID", ""))
        tail = service_id.rsplit("/", 1)[-1]
        member = (
            service_id if service_id in names
            else tail if "/" in service_id and tail in names
            else by_endpoint.get((_entry_address(entry), int(service.get("Port") or 0)))
        )
        if member is not None:
            found.setdefault(member, []).append(entry)
    return found


def _supersede(verdicts: dict[str, _Verdict], anomalies: list[Anomaly]) -> None:
    """Several instances claim primary: the newest registration wins, the others are DOWN."""
    claimers = [m for m, v in verdicts.items() if v.status is MemberStatus.PRIMARY]
    if len(claimers) < 2:
        return
    newest = max(claimers, key=lambda m: verdicts[m].modify_index)
    if sum(verdicts[m].modify_index == verdicts[newest].modify_index for m in claimers) > 1:
        return  # no order between them: the decider sees every claim
    for member in claimers:
        if member != newest:
            detail = f"superseded: {newest!r} registered as primary after it"
            verdicts[member] = _Verdict(MemberStatus.DOWN, detail, verdicts[member].modify_index)
            anomalies.append(Anomaly("superseded", member, f"tagged primary, but {detail}"))


def read_health(spec: ServiceSpec, answer: HealthAnswer, tag: str, now: float) -> Reading:
    """One Observation per member of `spec` from one health answer, and its anomalies."""
    tags = primary_tags(tag)
    anomalies: list[Anomaly] = []
    verdicts: dict[str, _Verdict] = {}
    for member, entries in _match(spec, answer.entries).items():
        if len(entries) > 1:
            ids = sorted(str((e.get("Service") or {}).get("ID")) for e in entries)
            detail = f"{len(entries)} Consul instances match it ({', '.join(ids)}): refusing to guess"
            verdicts[member] = _Verdict(MemberStatus.UNKNOWN, detail, 0)
            anomalies.append(Anomaly("ambiguous", member, detail))
            continue
        verdicts[member] = verdict = _instance(entries[0], tags)
        anomalies.extend(Anomaly(kind, member, text) for kind, text in verdict.anomalies)
    if spec.leadership.mode is LeadershipMode.FOLLOW:  # orchestrate: the decider keeps its own
        _supersede(verdicts, anomalies)
    if answer.filtered_by_acls:
        absent = "hidden by Consul ACLs (the token lacks node:read or service:read)"
        absent_status = MemberStatus.UNKNOWN
        anomalies.append(Anomaly("acl_filtered", None, f"Consul left instances out: {absent}"))
    elif not answer.entries:
        absent = "Consul returned no instance (deregistered, wrong service name, or hidden by ACLs)"
        absent_status = MemberStatus.UNKNOWN
        anomalies.append(Anomaly("empty_answer", None, absent))
    else:
        absent, absent_status = "not registered in Consul", MemberStatus.DOWN
    out = {}
    for m in spec.members:
        verdict = verdicts.get(m.name) or _Verdict(absent_status, absent, 0)
        out[m.name] = Observation(spec.name, m.name, verdict.status, now, SOURCE, verdict.detail)
    return Reading(out, tuple(anomalies))
