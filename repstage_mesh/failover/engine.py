"""What only the Raft leader does: watch the members (leadership sources), decide, and run
failovers and switchovers.

The engine is built by the node (the composition root) from parts it does not make itself:
a `LeaderSeat` (the few things it needs from the node: its state, readiness, Raft role and a
leadership confirmation), the failover runner (which executes the sans-IO decider's steps),
and the leadership sources (probes, Consul), added with `add_source`. It starts them when
this node becomes leader and stops them when it stops being leader.

Leadership changes arrive as events (`leadership_changed`, called from pysyncobj's
onStateChanged and when the node becomes ready), not by polling. pysyncobj's view may be stale:
activation first confirms leadership (a committed no-op in the current term), and the runner
confirms again before every plan, so a stale leader that still believes it leads cannot act.
A confirmation that fails is retried after `CONFIRM_RETRY` seconds while the node still
believes it leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from repstage_mesh.core.models import MeshState, ServiceSpec, ServiceState
from repstage_mesh.core.observations import Observation
from repstage_mesh.failover.runner import FailoverRunner

log = logging.getLogger("repstage_mesh.failover.engine")

CONFIRM_RETRY = 0.1  # seconds before a failed leadership confirmation is tried again
START_RETRY = 1.0  # seconds before starting again after a source failed to start
CONFIRM_TIMEOUT = 2.0


class LeadershipSource(Protocol):
    """Probes, Consul: watch the members of the services they are given and report
    observations to the callback they were built with."""

    def set_services(self, services: Iterable[ServiceState | ServiceSpec]) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class LeaderSeat:
    """The narrow view of the node the engine runs in."""

    node_id: str
    state: Callable[[], MeshState]
    ready: Callable[[], bool]
    believes_leader: Callable[[], bool]
    confirm_leadership: Callable[[float], Awaitable[bool]]


class LeaderEngine:
    def __init__(
        self,
        seat: LeaderSeat,
        runner: FailoverRunner,
        on_observation: Callable[[Observation], None] | Sequence[Callable[[Observation], None]] = (),
    ) -> None:
        self.seat = seat
        self.runner = runner
        self.sources: list[LeadershipSource] = []
        # who else hears every observation (failover traces, the member gauges), in order
        self._observers = (on_observation,) if callable(on_observation) else tuple(on_observation)
        self.active = False
        self._wake = asyncio.Event()
        self._follow: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._retry_after = CONFIRM_RETRY
        self._companions: list[tuple[Callable[[], None], Callable[[], Awaitable[None]]]] = []

    def add_companion(self, start: Callable[[], None], stop: Callable[[], Awaitable[None]]) -> None:
        """Something else only the leader runs (the snapshot runner): `start` once this node
        leads and decides, `stop` when it stops."""
        self._companions.append((start, stop))

    def add_source(self, source: LeadershipSource) -> None:
        self.sources.append(source)

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._follow = loop.create_task(self._follow_leadership(), name="leadership")

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            try:
                await self._follow
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("%s: the leadership follower had failed", self.seat.node_id)
        await self._deactivate("node stopping")

    def leadership_changed(self) -> None:
        """Something that decides whether this node should lead changed (its Raft role, its
        readiness): look again. Call on the event loop."""
        self._wake.set()

    async def _follow_leadership(self) -> None:
        while True:
            self._wake.clear()  # before looking: a change while we act wakes the next wait
            want = self.seat.believes_leader() and self.seat.ready()
            try:
                if want and not self.active:
                    await self._activate()
                elif not want and self.active:
                    await self._deactivate("this node is no longer the Raft leader")
            except Exception:
                log.exception("%s: could not follow a leadership change; trying again", self.seat.node_id)
                self._retry_after = START_RETRY
            if want and not self.active:  # not confirmed or not started (yet): try again
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._retry_after):  # not wait_for: see failover/timeouts.py
                        await self._wake.wait()
            else:
                await self._wake.wait()

    async def _activate(self) -> None:
        async with self._lock:
            self._retry_after = CONFIRM_RETRY
            if not await self.seat.confirm_leadership(CONFIRM_TIMEOUT):
                return
            state = self.seat.state()
            self.runner.on_state(state)
            await self._start_sources(state)
            self.runner.start()
            # States applied while the sources started reached only the runner.
            latest = self.seat.state()
            if latest is not state:
                for source in self.sources:
                    source.set_services(latest.services.values())
            self.active = True
            for start, _ in self._companions:
                start()
            log.info("leader %s: watching %d service(s)", self.seat.node_id, len(latest.services))

    async def _start_sources(self, state: MeshState) -> None:
        """Start every source, or none: a source that fails to start (or a cancellation while
        starting) stops the ones already started, then the error goes on."""
        started: list[LeadershipSource] = []
        try:
            for source in self.sources:
                source.set_services(state.services.values())
                await source.start()
                started.append(source)
        except BaseException:
            for source in reversed(started):
                try:
                    await source.stop()
                except Exception:
                    log.exception("%s: a source failed to stop", self.seat.node_id)
            raise

    async def _deactivate(self, reason: str) -> None:
        async with self._lock:
            if not self.active:
                return
            self.active = False
            for _, stop in self._companions:
                try:
                    await stop()
                except Exception:
                    log.exception("%s: a leader companion failed to stop", self.seat.node_id)
            await self.runner.close(reason)
            for source in self.sources:
                await source.stop()
            log.info("%s: stopped deciding (%s)", self.seat.node_id, reason)

    # --- state and observations -----------------------------------------------------------------

    def on_state(self, state: MeshState) -> None:
        """Every applied state, in log order (also while not leader: the decider stays current)."""
        self.runner.on_state(state)
        if self.active:
            for source in self.sources:
                source.set_services(state.services.values())

    def observe(self, obs: Observation) -> None:
        """What the sources report (their callback)."""
        for observer in self._observers:
            observer(obs)
        if self.active:
            self.runner.observe(obs)
