"""Who is primary, as every node sees it: the role-change log lines and the service gauges.

`ServiceWatch.applied(state, outcome)` is called by the node for every applied entry (on every
node, in log order). It compares each service's primary with the previous state's and logs one
structured line per change (`telemetry/logs.event`):

    role_change          a primary replaced by another (old, new, epoch, cause, source)
    fail_closed_entered  no primary any more (old, epoch, cause, source)
    fail_closed_exited   a primary again after none (new, epoch, cause, source, duration_ms:
                         how long this node saw the service without a primary)

Entries replayed before the node is ready (its journal at start-up) are logged at DEBUG.
`observed(obs)` keeps each member's latest probe status and replication position (only the
Raft leader runs sources, so only the leader exports member series).

`ServiceCollector` computes the service gauges when Prometheus scrapes, from the current state:
the label sets are exactly the configured services and their members, so a removed service's
series disappear with it, and a replaced primary's `member` label set is gone at the next scrape.

    repstage_service_primary{service,member}              1 for the current primary (absent: none)
    repstage_service_epoch{service}                       the epoch (Raft index) of the current role
    repstage_service_fail_closed{service}                 1 when the service has no primary
    repstage_service_last_change_timestamp_seconds{service}  unix time this node applied the change
    repstage_service_role_age_seconds{service}            seconds since then
    repstage_member_probe_state{service,member,state}     1 for the member's state (primary,
                                                           replica, down, unknown), 0 for the others
    repstage_member_lag_bytes{service,member}             the primary's position minus the member's
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from repstage_mesh.core.models import MeshState, Outcome, ServiceState
from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.telemetry.logs import event

log = logging.getLogger("repstage_mesh.roles")

__all__ = ["ServiceCollector", "ServiceWatch"]

STATES = tuple(status.value for status in MemberStatus)


@dataclass
class _Seen:
    primary: str | None
    epoch: int
    changed_unix: float  # when this node applied the change (its start-up for an older one)
    closed_since: float | None  # monotonic time this node saw the service lose its primary


@dataclass
class _Member:
    status: str
    offset: int | None


class ServiceWatch:
    """Role changes of the applied states (logged), and what the collector needs besides the state."""

    def __init__(self, wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic) -> None:
        self.wall = wall
        self.clock = clock
        self.seen: dict[str, _Seen] = {}
        self.members: dict[tuple[str, str], _Member] = {}
        self._change = -1  # the state's last_change when last compared

    def applied(self, state: MeshState, outcome: Outcome | None = None, ready: bool = True) -> None:
        if state.last_change == self._change:  # nothing routed changed (a history record, a node)
            return
        self._change = state.last_change
        result = outcome.result if outcome is not None and outcome.ok else {}
        for name in [n for n in self.seen if n not in state.services]:  # a removed service
            del self.seen[name]
        for key in [k for k in self.members if k[0] not in state.services]:
            del self.members[key]
        for name, svc in state.services.items():
            before = self.seen.get(name)
            if before is None:
                self.seen[name] = _Seen(svc.primary, svc.epoch, self.wall(),
                                        self.clock() if svc.primary is None else None)
                continue
            if (before.primary, before.epoch) == (svc.primary, svc.epoch):
                continue
            cause = str(result.get("cause")) if result.get("service") == name and "cause" in result else "service redefined"
            self._changed(svc, before, cause, ready)

    def _changed(self, svc: ServiceState, before: _Seen, cause: str, ready: bool) -> None:
        old, new, now = before.primary, svc.primary, self.clock()
        fields = {"service": svc.name, "old": old, "new": new, "epoch": svc.epoch, "cause": cause,
                  "source": svc.spec.leadership.source.value}
        level = logging.INFO if ready else logging.DEBUG
        if new is None and old is not None:
            event(log, "fail_closed_entered", f"{svc.name}: fail closed, no primary (was {old})", level=level, **fields)
            before.closed_since = now
        elif new is not None and old is None:
            duration = None if before.closed_since is None else round((now - before.closed_since) * 1000.0, 3)
            event(log, "fail_closed_exited", f"{svc.name}: primary {new} after none", level=level,
                  **fields, duration_ms=duration)
            before.closed_since = None
        elif new != old:
            event(log, "role_change", f"{svc.name}: primary {old} -> {new}", level=level, **fields)
        before.primary, before.epoch, before.changed_unix = new, svc.epoch, self.wall()

    def observed(self, obs: Observation) -> None:
        """A source's view of a member (the leader only)."""
        self.members[(obs.service, obs.member)] = _Member(obs.status.value, obs.offset)


class ServiceCollector(Collector):
    """The service and member gauges, from `state()` and the watch, at scrape time."""

    def __init__(
        self, watch: ServiceWatch, state: Callable[[], MeshState], leads: Callable[[], bool] = lambda: True,
    ) -> None:
        self.watch = watch
        self.state = state
        self.leads = leads  # member series only while this node leads (it runs the sources)

    def describe(self) -> list[Metric]:
        return list(self._families(MeshState()))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.state())

    def _families(self, state: MeshState) -> Iterator[Metric]:
        primary = GaugeMetricFamily("repstage_service_primary", "1 for the service's current primary member "
                                    "(no series: the service has no primary)", labels=["service", "member"])
        epoch = GaugeMetricFamily("repstage_service_epoch", "Epoch (Raft index) of the service's current role",
                                  labels=["service"])
        closed = GaugeMetricFamily("repstage_service_fail_closed", "1 when the service has no primary "
                                   "(its clients are refused)", labels=["service"])
        changed = GaugeMetricFamily("repstage_service_last_change_timestamp_seconds",
                                    "Unix time this node applied the service's last role change", labels=["service"])
        since = GaugeMetricFamily("repstage_service_role_age_seconds",
                                  "Seconds since this node applied the service's last role change", labels=["service"])
        probe = GaugeMetricFamily("repstage_member_probe_state", "1 for the member's state as the leader's "
                                  "source last saw it, 0 for the other states", labels=["service", "member", "state"])
        lag = GaugeMetricFamily("repstage_member_lag_bytes", "The primary's replication position minus the "
                                "member's, as the leader's probes last saw them", labels=["service", "member"])
        now = self.watch.wall()
        for name, svc in sorted(state.services.items()):
            if svc.primary is not None:
                primary.add_metric([name, svc.primary], 1)
            epoch.add_metric([name], svc.epoch)
            closed.add_metric([name], 1 if svc.primary is None else 0)
            seen = self.watch.seen.get(name)
            if seen is not None:
                changed.add_metric([name], seen.changed_unix)
                since.add_metric([name], max(0.0, now - seen.changed_unix))
            if self.leads():
                self._members(svc, probe, lag)
        yield from (primary, epoch, closed, changed, since, probe, lag)

    def _members(self, svc: ServiceState, probe: GaugeMetricFamily, lag: GaugeMetricFamily) -> None:
        views = {m.name: self.watch.members.get((svc.name, m.name)) for m in svc.spec.members}
        top = views.get(svc.primary) if svc.primary is not None else None
        for member, view in views.items():
            if view is None:
                continue
            for status in STATES:
                probe.add_metric([svc.name, member, status], 1 if view.status == status else 0)
            if top is not None and top.offset is not None and view.offset is not None:
                lag.add_metric([svc.name, member], max(0, top.offset - view.offset))
