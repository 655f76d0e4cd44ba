"""The failover executor: runs the decider's steps with injected async callables.

`FailoverRunner` is the thin I/O shell around the sans-IO `Decider`. It feeds the decider
(committed states, observations, ticks, switchover and announce requests), executes the steps
it gets back one service at a time (a per-service lock), bounds every step in time, and reports
each result with `Decider.step_done`. It never decides anything itself. `Repoint` steps run
outside the per-service lock (one per member at a time, the decider sees to it), so a member
that stays down never delays a real failover, nor waits behind one. Every time a record may
have changed, the `HistoryPublisher` hears of it (it commits the record to the replicated
history); `start` first ends the records a previous leader left running ("interrupted").

What the node provides (all async unless said otherwise):

- `submit(envelope, timeout) -> Outcome`: commit through Raft, return once applied on this node
  (`ReplicatedStore.submit`). Raises NoQuorum (not applied) or CommitTimeout (unknown).
- `confirm_leadership(timeout) -> bool`: True only if this node is leader and committed a no-op in
  its current term (`ReplicatedStore.confirm_leadership`).
- `await_proxies(min_index, deadline) -> ProxyAcks`: wait until every connected proxy has ACKed a
  snapshot whose version is >= min_index, or `deadline` seconds passed; return when each proxy
  ACKed (same clock as `clock`) and who did not. Must not raise on the deadline.
- `promoter`: a `Promoter` (promote.py's `DatabasePromoter`): `promote`, `repoint` and
  `positions` (fresh replication positions for a switchover's catch-up wait).
- `clock() -> float`: monotonic seconds, the clock observations use (sync).

The node must call `on_state` on every applied state (before the commit's `submit` returns, as
ReplicatedStore does when given the loop), `observe` for every Observation, and run `run()` (the
ticker) while it is the leader; on leadership loss it calls `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from repstage_mesh.core.errors import CommitTimeout, ReplicationError
from repstage_mesh.core.models import AuditTag, CommandEnvelope, MeshState, Outcome, ServiceSpec
from repstage_mesh.core.observations import Observation
from repstage_mesh.decide import (
    AwaitClose,
    AwaitProxies,
    Commit,
    CommitResult,
    ConfirmLeadership,
    Decider,
    Done,
    FailoverRecord,
    Positions,
    Promote,
    PromoteResult,
    ProxyAcks,
    ReadPositions,
    Repoint,
    Step,
    StepFailed,
    StepResult,
)
from repstage_mesh.failover.history import HistoryPublisher
from repstage_mesh.failover.timeouts import bounded

log = logging.getLogger(__name__)

__all__ = [
    "AwaitProxiesFn",
    "ConfirmFn",
    "FailoverRunner",
    "Promoter",
    "SubmitFn",
]

SubmitFn = Callable[[CommandEnvelope, float], Awaitable[Outcome]]
ConfirmFn = Callable[[float], Awaitable[bool]]
AwaitProxiesFn = Callable[[int, float], Awaitable[ProxyAcks]]


class Promoter(Protocol):
    """Real promotion I/O (promote.py). Both must return within `timeout` and report failure as
    PromoteResult(ok=False, ...) rather than raise (the runner also catches and bounds them)."""

    async def promote(
        self, spec: ServiceSpec, member: str, old_primary: str | None, epoch: int, timeout: float
    ) -> PromoteResult: ...

    async def repoint(
        self, spec: ServiceSpec, member: str, new_primary: str, timeout: float
    ) -> PromoteResult: ...

    async def positions(
        self, spec: ServiceSpec, members: Sequence[str], timeout: float
    ) -> dict[str, int | None]:
        """Each member's replication position now (None: unknown / unreachable)."""
        ...

    def hook_timeout(self, spec: ServiceSpec) -> float | None:
        """The timeout of the operator's hook `spec` names (None: no hook; promote_timeout)."""
        ...


class FailoverRunner:
    """Executes Decider steps. `grace` is added to each step's own timeout before the runner
    gives up on a callable that ignores its timeout."""

    def __init__(
        self,
        decider: Decider,
        submit: SubmitFn,
        confirm_leadership: ConfirmFn,
        await_proxies: AwaitProxiesFn,
        promoter: Promoter,
        clock: Callable[[], float] = time.monotonic,
        *,
        commit_timeout: float = 5.0,
        confirm_timeout: float = 2.0,
        promote_timeout: float = 30.0,
        positions_timeout: float = 1.0,
        grace: float = 1.0,
        on_done: Callable[[FailoverRecord], None] | None = None,
        history: HistoryPublisher | None = None,
    ) -> None:
        for name, value in (("commit_timeout", commit_timeout), ("confirm_timeout", confirm_timeout),
                            ("promote_timeout", promote_timeout), ("positions_timeout", positions_timeout)):
            if value <= 0:
                raise ValueError(f"{name}: must be positive, got {value}")
        if grace < 0:
            raise ValueError(f"grace: must not be negative, got {grace}")
        self.decider = decider
        self._submit = submit
        self._confirm = confirm_leadership
        self._await_proxies = await_proxies
        self._promoter = promoter
        self.clock = clock
        self.commit_timeout = commit_timeout
        self.confirm_timeout = confirm_timeout
        self.promote_timeout = promote_timeout
        self.positions_timeout = positions_timeout
        self.grace = grace
        self.on_done = on_done
        self.history = history
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._finished: dict[str, asyncio.Event] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._commits = 0

    # --- inputs (call on the event loop) -----------------------------------------------------

    def on_state(self, state: MeshState) -> None:
        self.decider.on_state(state)

    def observe(self, obs: Observation) -> None:
        self.dispatch(self.decider.observe(obs))

    def tick(self) -> None:
        self.dispatch(self.decider.tick(self.clock()))

    async def switchover(
        self, service: str, target: str, timeout: float | None = None, wait: float | None = None,
        cause: str = "planned switchover",
    ) -> FailoverRecord:
        """Run a planned switchover and return its record once finished, or after `wait`
        seconds (or the plan's own bound) with the record still "running": the switchover
        goes on, its record tells how it ends. Raises DecisionRefused (nothing changed) for a
        request the decider will not run. Needs the ticker (`run`)."""
        record_id, steps = self.decider.switchover(service, target, self.clock(), timeout=timeout,
                                                   cause=cause[:200])
        catchup = timeout if timeout is not None else self.decider.catchup_timeout
        # every step is bounded: the sum of the bounds of the longest plan, plus slack
        bound = (2 * (catchup + self.positions_timeout) + self.confirm_timeout
                 + 3 * self.commit_timeout + self.promote_timeout + 2 * self._ack(service) + 10 * self.grace + 1.0)
        return await self._finished_record(record_id, steps, bound, wait)

    def _ack(self, service: str) -> float:
        svc = self.decider.state.service(service)
        return svc.spec.leadership.ack_deadline if svc is not None else 60.0

    async def announce(
        self, service: str, member: str | None, *, token: int | None = None, cause: str = "announce",
        fence: bool = True, close_wait: float = 0.0, key: str | None = None,
        trace_parent: dict[str, str] | None = None, by: AuditTag | None = None,
    ) -> FailoverRecord:
        """Run an announced change (see `Decider.announce`) and return its finished record.
        Raises DecisionRefused (nothing changed) for a request the decider will not run."""
        record_id, steps = self.decider.announce(
            service, member, self.clock(), token=token, cause=cause, fence=fence,
            close_wait=close_wait, key=key, trace_parent=trace_parent, by=by,
        )
        bound = self.confirm_timeout + 3 * self.commit_timeout + 2 * self._ack(service) + close_wait + 6 * self.grace + 1.0
        return await self._finished_record(record_id, steps, bound)

    async def _finished_record(
        self, record_id: str, steps: list[Step], bound: float, wait: float | None = None
    ) -> FailoverRecord:
        """Dispatch a plan's first `steps` and wait until its record ends, at most `bound`
        seconds (the plan's own bound) or `wait` if shorter: a record still running then is
        returned as it is (the plan goes on)."""
        event = self._finished.setdefault(record_id, asyncio.Event())
        self.dispatch(steps)
        try:
            await bounded(event.wait(), bound if wait is None else min(wait, bound))
        except TimeoutError:
            pass  # still running: the caller answers with the running record
        finally:
            self._finished.pop(record_id, None)
        record = self.decider.record(record_id)
        assert record is not None
        return record

    async def run(self, interval: float = 0.05) -> None:
        """Tick the decider every `interval` seconds until cancelled."""
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("decider tick failed")
            await asyncio.sleep(interval)  # a periodic timer, not synchronisation

    def start(self, interval: float = 0.05) -> None:
        """Start ticking (the node calls it once this node leads, after confirming it)."""
        if self.history is not None:
            def running(record_id: str) -> bool:
                record = self.decider.record(record_id)
                return record is not None and record.status == "running"
            self.history.interrupted(self.decider.state, running, self.decider.node_id)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self.run(interval))

    async def close(self, reason: str = "the failover runner stopped") -> None:
        """Stop ticking, cancel running steps and end their plans as failed (what is committed
        stays committed). Idempotent."""
        tasks = list(self._tasks)
        if self._ticker is not None:
            tasks.append(self._ticker)
            self._ticker = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._handle_done(self.decider.abandon(self.clock(), reason))

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until no step is executing (tests, shutdown)."""
        async def drained() -> None:
            while self._tasks:
                await asyncio.wait(set(self._tasks))
        await bounded(drained(), timeout)

    # --- execution -----------------------------------------------------------------------------

    def dispatch(self, steps: list[Step]) -> None:
        """Execute `steps` in the background, in order per service, one service at a time."""
        by_service: dict[str, list[Step]] = {}
        loop = asyncio.get_running_loop()
        for step in steps:
            self._changed(step.record_id)  # a new record is committed before its first step
            if isinstance(step, Done):
                self._handle_done([step])
            elif isinstance(step, Repoint):
                self._spawn(loop.create_task(self._repoint(step)))
            else:
                by_service.setdefault(step.service, []).append(step)
        for service, batch in by_service.items():
            self._spawn(loop.create_task(self._drive(service, batch)))

    def _spawn(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _changed(self, record_id: str) -> None:
        record = self.decider.record(record_id)
        if record is not None and self.history is not None:
            try:
                self.history.changed(record)
            except Exception:
                log.exception("publishing failover record %s failed", record_id)

    async def _repoint(self, step: Repoint) -> None:
        """A re-point, outside the per-service lock (see the module docstring)."""
        result = await self.execute(step)
        self.dispatch(self.decider.step_done(step, result, self.clock()))
        self._changed(step.record_id)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("failover step chain failed", exc_info=task.exception())

    async def _drive(self, service: str, steps: list[Step]) -> None:
        lock = self._locks.setdefault(service, asyncio.Lock())
        async with lock:
            queue = list(steps)
            while queue:
                step = queue.pop(0)
                if isinstance(step, Done):
                    self._handle_done([step])
                    continue
                result = await self.execute(step)
                queue.extend(self.decider.step_done(step, result, self.clock()))
                self._changed(step.record_id)

    def _handle_done(self, done: list[Done]) -> None:
        for step in done:
            self._changed(step.record_id)
            record = self.decider.record(step.record_id)
            if record is not None and self.on_done is not None:
                try:
                    self.on_done(record)
                except Exception:
                    log.exception("on_done callback failed for %s", step.record_id)
            event = self._finished.get(step.record_id)
            if event is not None:
                event.set()

    async def execute(self, step: Step) -> StepResult:
        """Run one step with bounded time; failures become results, never exceptions."""
        if isinstance(step, ConfirmLeadership):
            try:
                return bool(await bounded(self._confirm(self.confirm_timeout),
                                                   self.confirm_timeout + self.grace))
            except Exception as exc:
                log.warning("leadership not confirmed for %s: %r", step.record_id, exc)
                return False
        if isinstance(step, Commit):
            return await self._commit(step)
        if isinstance(step, AwaitProxies):
            try:
                return await bounded(self._await_proxies(step.min_index, step.deadline),
                                              step.deadline + self.grace)
            except Exception as exc:
                return StepFailed(f"waiting for proxy ACKs failed: {exc!r}")
        if isinstance(step, AwaitClose):
            await asyncio.sleep(step.seconds)  # the proxies' health-check interval, not synchronisation
            return None
        if isinstance(step, Promote):
            timeout = self._promote_timeout(step.spec)
            try:
                return await bounded(
                    self._promoter.promote(step.spec, step.member, step.old_primary, step.epoch, timeout),
                    timeout + self.grace,
                )
            except Exception as exc:
                return PromoteResult(False, detail=f"promote {step.member}: {exc!r}")
        if isinstance(step, Repoint):
            timeout = self._promote_timeout(step.spec)
            try:
                return await bounded(
                    self._promoter.repoint(step.spec, step.member, step.new_primary, timeout),
                    timeout + self.grace,
                )
            except Exception as exc:
                return PromoteResult(False, detail=f"repoint {step.member}: {exc!r}", failed=(step.member,))
        if isinstance(step, ReadPositions):
            if step.delay > 0:
                await asyncio.sleep(step.delay)  # the decider's poll interval
            try:
                offsets = await bounded(
                    self._promoter.positions(step.spec, step.members, self.positions_timeout),
                    self.positions_timeout + self.grace,
                )
            except Exception as exc:
                return StepFailed(f"reading positions failed: {exc!r}")
            return Positions(dict(offsets))
        return None

    def _promote_timeout(self, spec: ServiceSpec) -> float:
        timeout = self._promoter.hook_timeout(spec)
        return timeout if timeout is not None else self.promote_timeout

    async def _commit(self, step: Commit) -> StepResult:
        self._commits += 1
        envelope = CommandEnvelope(command=step.command, request_id=f"{step.record_id}/{self._commits}")
        try:
            outcome = await bounded(self._submit(envelope, self.commit_timeout),
                                             self.commit_timeout + self.grace)
        except CommitTimeout as exc:  # includes NoQuorumOutcomeUnknown
            return StepFailed(str(exc), unknown=True)
        except TimeoutError:
            return StepFailed(f"commit not answered within {self.commit_timeout + self.grace:g} s", unknown=True)
        except ReplicationError as exc:
            return StepFailed(str(exc))
        except Exception as exc:  # a bug or an unexpected error: the outcome is unknown
            log.exception("commit for %s failed", step.record_id)
            return StepFailed(f"commit failed: {exc!r}", unknown=True)
        if outcome.ok:
            epoch = outcome.result.get("epoch")
            return CommitResult(True, epoch=int(epoch) if epoch is not None else None)
        rejection = outcome.rejection
        return CommitResult(
            False,
            message=rejection.message if rejection is not None else "refused",
            code=rejection.code if rejection is not None else None,
        )
