"""One structured log line per step of every plan the leader runs (adopt, failover, fail_closed,
switchover, repoint, announce), from the failover records themselves.

The runner calls `StepLog.changed(record)` wherever the history publisher hears of a record (when
its plan starts, after each step, when it ends); each timeline event not logged yet becomes one
line (`telemetry/logs.event`, event `failover_step`) with the record's id, kind, mode, service,
old and new member, epoch (of the plan's last commit so far; none before its first), cause, source (the service's leadership source), the step and its
`elapsed_ms` since the record started. The closing step (`done` or `failed`) also carries
`status`, `reason`, `duration_ms` and `write_unavailable_ms`. One `acked` event per proxy is
logged at DEBUG (a large fleet would flood the log); `first_routable` sums them up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from repstage_mesh.core.models import MeshState
from repstage_mesh.decide import FailoverRecord
from repstage_mesh.telemetry.logs import event

log = logging.getLogger("repstage_mesh.failover")

__all__ = ["StepLog"]

MEMORY = 1000  # records whose logged position this node remembers
QUIET = frozenset({"acked"})
CLOSING = frozenset({"done", "failed", "repointed"})


class StepLog:
    def __init__(self, state: Callable[[], MeshState]) -> None:
        self.state = state
        self._logged: dict[str, int] = {}  # record id -> timeline events already logged

    def changed(self, record: FailoverRecord) -> None:
        done = self._logged.get(record.id, 0)
        if done >= len(record.timeline):
            return
        self._logged[record.id] = len(record.timeline)
        while len(self._logged) > MEMORY:
            del self._logged[next(iter(self._logged))]
        svc = self.state().service(record.service)
        source = svc.spec.leadership.source.value if svc is not None else None
        epoch = next((e.detail["epoch"] for e in reversed(record.timeline[:done]) if "epoch" in e.detail), None)
        for step in record.timeline[done:]:
            epoch = step.detail.get("epoch", epoch)  # the plan's last commit so far
            fields: dict[str, Any] = {
                "id": record.id, "kind": record.kind, "mode": record.mode, "step": step.name,
                "service": record.service, "old": record.old_primary, "new": record.new_primary,
                "epoch": epoch, "cause": record.cause, "source": source,
                "elapsed_ms": step.elapsed_ms,
            }
            if step.name in CLOSING and record.status != "running":
                fields.update(status=record.status, reason=record.reason, duration_ms=record.duration_ms,
                              write_unavailable_ms=record.write_unavailable_ms)
            extra = {k: v for k, v in step.detail.items() if k not in fields and k != "acks"}
            message = (f"{record.service}: {record.kind} {record.old_primary or '-'} -> "
                       f"{record.new_primary or '-'}: {step.name}")
            level = logging.DEBUG if step.name in QUIET else logging.INFO
            if step.name == "failed":
                level = logging.WARNING
            event(log, "failover_step", message, level=level, **fields, **({"detail": extra} if extra else {}))
