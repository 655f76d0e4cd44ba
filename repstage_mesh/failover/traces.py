"""One OpenTelemetry trace per primary change the leader runs (failovers, switchovers and
announces), from the first failed probe to the last proxy's ACK, and the failover-duration
metric. An announce whose caller sent a W3C `traceparent` continues the caller's trace.

`FailoverTraces` sits between the runner and the store: `traced(commit)` gives the runner a
commit function that carries the trace context in each SetPrimary (so every node's push joins
the trace), `observed` remembers when a member's DOWN streak began (the detection span starts
there), and `done` turns a finished record's timeline into spans and ends the trace.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from repstage_mesh.core.models import CommandEnvelope, MeshState, Outcome, SetPrimary
from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.decide import Decider, FailoverRecord
from repstage_mesh.telemetry import FailoverTrace, Tracing

Commit = Callable[[CommandEnvelope, float], Awaitable[Outcome]]


class FailoverMetrics(Protocol):
    def observe_failover(self, service: str, seconds: float, mode: str) -> None: ...


class FailoverTraces:
    def __init__(
        self,
        tracing: Tracing,
        metrics: FailoverMetrics,
        decider: Decider,
        state: Callable[[], MeshState],
    ) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.decider = decider
        self.state = state
        self._traces: dict[str, FailoverTrace] = {}
        # (service, member) -> monotonic time of the first failed probe of its current DOWN
        # streak: a failover trace (and its detection span) starts there.
        self._down_since: dict[tuple[str, str], float] = {}

    def observed(self, obs: Observation) -> None:
        key = (obs.service, obs.member)
        if obs.status is MemberStatus.DOWN:
            if key not in self._down_since:
                self._down_since[key] = obs.since if obs.since is not None else obs.at
        else:
            self._down_since.pop(key, None)

    def traced(self, commit: Commit) -> Commit:
        """`commit`, with the change's trace context added to every SetPrimary."""

        async def traced_commit(envelope: CommandEnvelope, timeout: float) -> Outcome:
            command = envelope.command
            if isinstance(command, SetPrimary):
                context = self._trace_for(command).context()
                if context:
                    traced = command.model_copy(update={"trace": context})
                    envelope = envelope.model_copy(update={"command": traced})
            return await commit(envelope, timeout)

        return traced_commit

    def _trace_for(self, command: SetPrimary) -> FailoverTrace:
        ft = self._traces.get(command.service)
        if ft is None:
            record = self.decider.running(command.service)
            ft = self._start(command, record)
            self._traces[command.service] = ft
        return ft

    def _start(self, command: SetPrimary, record: FailoverRecord | None) -> FailoverTrace:
        service = self.state().service(command.service)
        started = time.time()
        if record is not None and record.started_unix is not None:
            started = record.started_unix
            down = self._down_since.get((command.service, record.old_primary or ""))
            if down is not None and record.kind == "failover":  # from the first failed probe
                started = min(started, down + (record.started_unix - record.started_at))
        return self.tracing.start_failover(
            command.service,
            record.old_primary if record is not None else (service.primary if service else None),
            record.new_primary if record is not None else command.member,
            cause=record.cause if record is not None else command.cause,  # not the fence's "fence: ..."
            mode=record.mode if record is not None else "unknown",
            started_at=started,
            parent=record.trace_parent if record is not None else None,  # an announce's caller
        )

    def done(self, record: FailoverRecord) -> None:
        ft = self._traces.pop(record.service, None)
        if record.duration_ms is not None:
            self.metrics.observe_failover(record.service, record.duration_ms / 1000.0, record.mode)
        if ft is not None:
            _record_spans(ft, record)


def _record_spans(ft: FailoverTrace, record: FailoverRecord) -> None:
    """The record's timeline as the trace's phase spans, then the end of the trace."""
    times = {event.name: event.at for event in record.timeline}
    base_unix = record.started_unix if record.started_unix is not None else time.time()

    def unix(at: float) -> float:
        return base_unix + (at - record.started_at)

    def span(name: str, start: str | None, end: str, **attrs: Any) -> None:
        if end in times:
            begin = times.get(start, record.started_at) if start else record.started_at
            ft.record(name, unix(begin), unix(times[end]), **attrs)

    if "detected" in times:  # first failed probe (the trace's start) -> declared down
        ft.record(FailoverTrace.DETECTION, min(ft.started_at, unix(times["detected"])), unix(times["detected"]),
                  cause=record.cause)
    span(FailoverTrace.DECISION, "detected", "decided")
    span(FailoverTrace.COMMIT, "leadership_confirmed", "fenced", what="fail closed")
    span(FailoverTrace.PROMOTION, "proxies_fenced", "promoted", member=record.new_primary or "")
    span(FailoverTrace.COMMIT, "promoted" if "promoted" in times else "proxies_fenced", "committed", what="new primary")
    ft.set(epoch=record.epoch, new_primary=record.new_primary or "", status=record.status,
           write_unavailable_ms=record.write_unavailable_ms)
    ft.end(not_followed=record.missed_route, error=record.reason if record.status == "failed" else None)
