"""The failover history, replicated: the leader commits each failover record through Raft.

`HistoryPublisher.changed(record)` is called by the runner whenever a record may have changed
(when its plan starts, after each step, when it ends). It commits a `RecordFailover` when the
record started, reached a major step (`MAJOR`), counted another attempt or ended; never for the
minor events in between. Commits run in the background and never hold up the plan: at most one
commit per record is in flight, and a newer version waiting behind it replaces an older one
(each carries a growing `rev`, and the state machine ignores an older `rev`, so late or
reordered commits cannot go backwards). A commit that fails is logged and counted; the next
change of the record carries everything again.

`interrupted(state)` is what a new leader does first: records the replicated history still
shows as running, and that this node is not running, end as failed ("interrupted").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from repstage_mesh.core.models import (
    CommandEnvelope,
    FailoverEntry,
    MeshState,
    Outcome,
    RecordFailover,
)
from repstage_mesh.decide import FailoverRecord

log = logging.getLogger(__name__)

__all__ = ["MAJOR", "HistoryPublisher"]

MEMORY = 1000  # records whose last committed version this node remembers
SubmitFn = Callable[[CommandEnvelope, float], Awaitable[Outcome]]

# Timeline events worth a commit of their own (besides the start and the end). Not
# "connections_closed": the new primary's commit follows at once and would queue behind it.
MAJOR = frozenset({"fenced", "proxies_fenced", "promoted", "promote_failed", "committed"})


class HistoryMetrics(Protocol):
    def observe_history(self, event: str) -> None:
        """`published`, `failed` (a commit of a record failed), `dropped` (the history's bound
        was hit) or `keys_dropped` (the idempotency keys' bound was hit)."""
        ...


class HistoryPublisher:
    def __init__(
        self,
        submit: SubmitFn,
        *,
        keep: int = 100,
        keep_keys: int = 1000,
        commit_timeout: float = 5.0,
        metrics: HistoryMetrics | None = None,
    ) -> None:
        self._submit = submit
        self.keep = keep
        self.keep_keys = keep_keys
        self.commit_timeout = commit_timeout
        self.metrics = metrics
        self._shown: dict[str, tuple[Any, ...]] = {}  # record id -> what was last committed
        self._rev: dict[str, int] = {}
        self._pending: dict[str, RecordFailover] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def changed(self, record: FailoverRecord) -> None:
        """Commit `record` if it changed in a way the history shows (see the module docstring)."""
        major = sum(1 for event in record.timeline if event.name in MAJOR)
        shown = (record.status, major, record.attempts, record.new_primary, record.epoch)
        if self._shown.get(record.id) == shown:
            return
        self._shown[record.id] = shown
        while len(self._shown) > MEMORY:  # the oldest records: ended long ago
            oldest = next(iter(self._shown))
            del self._shown[oldest]
            self._rev.pop(oldest, None)
        self.publish(record.id, record.as_dict(), key=record.request_key)

    def publish(self, record_id: str, data: dict[str, Any], *, key: str | None = None, rev: int | None = None) -> None:
        """Commit `data` as the newest version of record `record_id` (in the background)."""
        rev = rev if rev is not None else self._rev.get(record_id, 0) + 1
        self._rev[record_id] = rev
        command = RecordFailover(
            entry=FailoverEntry(id=record_id, rev=rev, record=data), keep=self.keep, key=key,
            keep_keys=self.keep_keys,
        )
        if record_id in self._tasks:
            self._pending[record_id] = command
            return
        task = asyncio.get_running_loop().create_task(self._commit(record_id, command), name=f"history {record_id}")
        self._tasks[record_id] = task

    async def _commit(self, record_id: str, command: RecordFailover | None) -> None:
        try:
            while command is not None:
                envelope = CommandEnvelope(command=command, request_id=f"history/{record_id}/{command.entry.rev}")
                try:
                    outcome = await self._submit(envelope, self.commit_timeout)
                    self._count("published")
                    if outcome.result.get("dropped"):
                        self._count("dropped")
                    if outcome.result.get("keys_dropped"):
                        self._count("keys_dropped")
                except Exception as exc:
                    self._count("failed")
                    log.warning("failover record %s not replicated: %r", record_id, exc)
                command = self._pending.pop(record_id, None)
        finally:
            self._tasks.pop(record_id, None)

    def _count(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_history(event)

    def interrupted(self, state: MeshState, running: Callable[[str], bool], node_id: str) -> list[str]:
        """End the records `state` shows as running that this node is not running. Returns their ids."""
        ended: list[str] = []
        for entry in state.failovers:
            if entry.record.get("status") != "running" or running(entry.id):
                continue
            reason = f"interrupted: {entry.record.get('node') or 'its node'} stopped leading before it ended; {node_id} leads now"
            data = {**entry.record, "status": "failed", "reason": reason}
            self.publish(entry.id, data, rev=entry.rev + 1)
            ended.append(entry.id)
        return ended

    async def close(self, timeout: float = 2.0) -> None:
        """Let the commits in flight end (up to `timeout`), then cancel what is left."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
