"""Restore drills run by the Raft leader (issue 16, item 6): `POST .../snapshots/{id}/verify`,
`repstage-mesh snapshot verify SERVICE ID` and the optional schedule (`snapshots.verify.every`).

- `start` commits the drill (`VerifySnapshot`, status running) with the snapshot, runs it in the
  background (the `drill` callable: fetch, scratch server, ledger comparison), then commits its
  result (ok or failed). The ledger is the operator's (`snapshots.verify.ledgers`), never the
  caller's.
- `take_over` (this node starts leading): a drill the state shows running that no task here runs
  was left by a leader that died or stepped down: it is committed `interrupted` (the schedule
  counts an interrupted snapshot as unverified and runs it again). Then the schedule starts.
- `stop` (leadership lost): the drills and the schedule are cancelled; the next leader marks
  what was running interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from repstage_mesh.config import SnapshotSettings
from repstage_mesh.core.errors import MeshError, SnapshotRefused
from repstage_mesh.core.models import (
    Command,
    MeshState,
    Outcome,
    SnapshotEntry,
    SnapshotVerification,
    VerifySnapshot,
)
from repstage_mesh.telemetry.metrics import MeshMetrics

__all__ = ["DrillDeps", "DrillRunner", "on_own_loop", "verification_of"]

T = TypeVar("T")

log = logging.getLogger("repstage_mesh.snapshots")

COMMIT_TIMEOUT = 5.0
RETRY_COMMIT = 1.0  # seconds before a result whose commit did not land is tried again
COMMIT_TRIES = 5


def verification_of(base: SnapshotVerification, result: Any) -> SnapshotVerification:
    """The finished drill from `verify_snapshot`'s `VerifyResult` (actions/verify.py)."""
    comparison = dict(getattr(result, "comparison", None) or {})
    error = str(getattr(result, "error", None) or "")
    return base.model_copy(update={
        "status": "ok" if result.ok else "failed", "finished_at": time.time(),
        "duration_s": round(time.time() - base.started_at, 3),
        "restored": bool(result.restored), "compared": bool(result.compared),
        "expected": int(comparison.get("expected", 0)), "matched": int(comparison.get("matched", 0)),
        "counts": {str(k): int(v) for k, v in dict(comparison.get("counts") or {}).items()},
        "missing": tuple(comparison.get("missing", ()))[:20], "extra": tuple(comparison.get("extra", ()))[:20],
        "unexplained": tuple(comparison.get("unexplained", ()))[:20],
        "error": error[:2000],
    })


async def on_own_loop(work: Callable[[], Awaitable[T]], name: str) -> T:
    """`work()` on a new event loop in a daemon thread of its own, awaited here. Cancelling the
    caller cancels the work there (its context managers clean up: scratch servers are killed),
    and nothing waits for the thread at shutdown (the default executor would be joined)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    cancelled = threading.Event()
    inner: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[T]]] = []

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    async def main() -> T:
        task = asyncio.ensure_future(work())
        inner.append((asyncio.get_running_loop(), task))
        if cancelled.is_set():
            task.cancel()
        return await task

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = asyncio.run(main())
        except BaseException as exc:  # handed to the awaiting side, whatever it is
            error = exc
        with contextlib.suppress(RuntimeError):  # the node's loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    try:
        return await done
    except asyncio.CancelledError:
        cancelled.set()
        for inner_loop, task in inner:
            with contextlib.suppress(RuntimeError):
                inner_loop.call_soon_threadsafe(task.cancel)
        raise


@dataclass
class DrillDeps:
    """What the drill runner may use of the node (snapshots/registry.py wires them)."""

    node_id: str
    settings: SnapshotSettings
    state: Callable[[], MeshState]
    commit: Callable[[Command, float], Awaitable[Outcome]]
    drill: Callable[[SnapshotEntry], Awaitable[Any]]  # a VerifyResult; bounded by verify.timeout
    metrics: MeshMetrics | None = None


class DrillRunner:
    def __init__(self, deps: DrillDeps) -> None:
        self.deps = deps
        self._tasks: dict[str, asyncio.Task[None]] = {}  # snapshot id -> its drill
        self._background: set[asyncio.Task[None]] = set()
        self._schedule: asyncio.Task[None] | None = None
        self._leading = False

    # --- requests ------------------------------------------------------------------------------

    async def start(self, service: str, snapshot_id: str,
                    requested: Literal["request", "schedule"] = "request") -> SnapshotEntry:
        """Commit a running drill of `snapshot_id` and run it in the background; the entry."""
        entry = self.deps.state().snapshot(snapshot_id)
        if entry is None or entry.service != service:
            raise SnapshotRefused("not_found", f"no snapshot {snapshot_id!r} of {service!r}", "id")
        if len(self._tasks) >= self.deps.settings.verify.concurrency:
            if self.deps.metrics is not None:
                self.deps.metrics.observe_snapshot_limit("verify_concurrency")
            raise SnapshotRefused("conflict", f"{len(self._tasks)} drills already run on the leader "
                                  "(snapshots.verify.concurrency); retry when one ended", "id")
        base = SnapshotVerification(drill=f"{self.deps.node_id}-{uuid.uuid4().hex[:8]}", node=self.deps.node_id,
                                    requested=requested, started_at=time.time())
        outcome = await self.deps.commit(VerifySnapshot(id=snapshot_id, verification=base), COMMIT_TIMEOUT)
        if not outcome.ok:
            rejection = outcome.rejection
            assert rejection is not None
            raise SnapshotRefused(rejection.code, rejection.message, rejection.field)
        task = asyncio.create_task(self._run(entry, base), name=f"drill-{snapshot_id}")
        self._tasks[snapshot_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(snapshot_id, None))
        current = self.deps.state().snapshot(snapshot_id)
        assert current is not None
        return current

    def running(self) -> list[str]:
        return sorted(self._tasks)

    # --- leadership ----------------------------------------------------------------------------

    def take_over(self) -> None:
        self._leading = True
        for entry in self.deps.state().snapshots:
            v = entry.verification
            if v is not None and v.running and entry.id not in self._tasks:
                ended = v.model_copy(update={
                    "status": "interrupted", "finished_at": time.time(),
                    "duration_s": round(max(0.0, time.time() - v.started_at), 3),
                    "error": f"the leader running it ({v.node}) stopped before it ended; run it again",
                })
                self._spawn(self._finish(entry.id, entry.service, ended))
        every = self.deps.settings.verify.every
        if every is not None and self._schedule is None:
            self._schedule = asyncio.create_task(self._scheduled(every), name="drill-schedule")

    async def stop(self) -> None:
        self._leading = False
        tasks = [*self._tasks.values(), *self._background]
        if self._schedule is not None:
            tasks.append(self._schedule)
            self._schedule = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # --- execution -----------------------------------------------------------------------------

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run(self, entry: SnapshotEntry, base: SnapshotVerification) -> None:
        try:
            result = await self.deps.drill(entry)
            ended = verification_of(base, result)
        except Exception as exc:  # the drill reports its own failures; this is a bug or a timeout
            reason = f"no result within {self.deps.settings.verify.timeout:g} s (snapshots.verify.timeout)" \
                if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, TimeoutError) and self.deps.metrics is not None:
                self.deps.metrics.observe_snapshot_limit("verify_timeout")
            ended = base.model_copy(update={"status": "failed", "finished_at": time.time(),
                                            "duration_s": round(time.time() - base.started_at, 3),
                                            "error": reason[:2000]})
        await self._finish(entry.id, entry.service, ended)

    async def _finish(self, snapshot_id: str, service: str, ended: SnapshotVerification) -> None:
        """Commit the drill's end (a few tries while leading); count it once committed."""
        for attempt in range(COMMIT_TRIES):
            try:
                outcome = await self.deps.commit(VerifySnapshot(id=snapshot_id, verification=ended), COMMIT_TIMEOUT)
            except MeshError as exc:
                log.warning("drill %s of %s: the result did not commit (%s)", ended.drill, snapshot_id, exc)
                if not self._leading or attempt == COMMIT_TRIES - 1:
                    return
                await asyncio.sleep(RETRY_COMMIT)  # a retry delay, not a synchronisation
                continue
            if not outcome.ok:  # another end won (a new leader's interrupt) or the entry dropped out
                log.warning("drill %s of %s: %s", ended.drill, snapshot_id,
                            outcome.rejection.message if outcome.rejection else "rejected")
                return
            break
        if self.deps.metrics is not None:
            self.deps.metrics.observe_verification(service, ended.status, ended.duration_s)
        log.info("drill %s of snapshot %s (%s): %s %s", ended.drill, snapshot_id, service, ended.status,
                 ended.error)

    def due(self) -> list[SnapshotEntry]:
        """Per service, its newest completed snapshot if no drill ended ok/failed on it yet."""
        newest: dict[str, SnapshotEntry] = {}
        for entry in self.deps.state().snapshots:  # oldest first
            if entry.status == "completed":
                newest[entry.service] = entry
        return [e for e in newest.values()
                if e.verification is None or e.verification.status == "interrupted"]

    async def _scheduled(self, every: float) -> None:
        while self._leading:
            await asyncio.sleep(every)  # the schedule's period
            for entry in self.due():
                if entry.id in self._tasks:
                    continue
                try:
                    await self.start(entry.service, entry.id, requested="schedule")
                except MeshError as exc:
                    log.info("scheduled drill of %s: %s", entry.id, exc)
                    continue
                task = self._tasks.get(entry.id)
                if task is not None:  # one drill at a time: the schedule never piles up
                    with contextlib.suppress(Exception):
                        await asyncio.shield(task)
