"""The probe leadership source: `ProbeRunner` runs the probes (sources/probers.py) of every
member of every service whose leadership source is `probe`, on each service's interval, feeds
one `ProbeTracker` per member and hands the Observations to a callback. Only the Raft leader
runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from repstage_mesh.core.models import (
    LeadershipSource,
    Member,
    ProbeKind,
    ProbeSpec,
    ServiceSpec,
    ServiceState,
)
from repstage_mesh.core.observations import (
    Observation,
    ProbeOutcome,
    ProbeResult,
    ProbeTracker,
    specs_with_source,
)
from repstage_mesh.sources.probers import (
    Prober,
    SecretLookup,
    make_prober,
    no_secrets,
    probe_kind,
)
from repstage_mesh.sources.supervisor import KeyedTasks, ObservationCallback

__all__ = [
    "ProbeRunner",
    "probe_kind",  # defined in probers.py; importable from here too, as callers do
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
ProberFactory = Callable[[ServiceSpec, Member, aiohttp.ClientSession], Prober]


@dataclass(frozen=True)
class _Target:
    """What one member task probes; a change of any compared field restarts the task. The
    service spec goes to the prober factory but is not compared: a change elsewhere in the
    service (its listen port, another member) leaves the member's task and tracker alone."""

    service: str
    member: Member
    kind: ProbeKind
    probe: ProbeSpec
    spec: ServiceSpec = field(compare=False)


class ProbeRunner:
    """Probes every member of every probe-sourced service and reports Observations.

        runner = ProbeRunner(on_observation)       # callback: sync or async, called in order
        runner.set_services(state.services.values())
        await runner.start()
        ...
        await runner.stop()

    One asyncio task per member: probe, feed the member's ProbeTracker, deliver what it emits,
    then wait until `interval` after the probe started (a probe that times out is followed by
    the next one at once; a refused one that the tracker is confirming, by the next one
    `retry_interval` after it started). `set_services` may be called before or after `start`;
    it keeps the tasks (and their trackers) of members whose target is unchanged.
    `on_probe(service, member, result)`, when given, sees every raw result (metrics:
    Metrics.observe_probe).
    """

    def __init__(
        self,
        on_observation: ObservationCallback,
        *,
        clock: Clock = time.monotonic,
        offset_refresh: float = 1.0,
        prober_factory: ProberFactory | None = None,
        secrets: SecretLookup = no_secrets,
        on_probe: Callable[[str, str, ProbeResult], None] | None = None,
    ) -> None:
        self._on_probe = on_probe
        self._clock = clock
        self._offset_refresh = offset_refresh
        self._factory: ProberFactory = prober_factory or (
            lambda spec, member, session: make_prober(spec, member, session=session, secrets=secrets)
        )
        self._trackers: dict[tuple[str, str], ProbeTracker] = {}
        self._tasks: KeyedTasks[tuple[str, str], _Target] = KeyedTasks(
            self._spawn,
            name=lambda key: f"probe {key[0]}/{key[1]}",
            on_observation=on_observation,
            log=log,
            on_drop=lambda key: self._trackers.pop(key, None),
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def running(self) -> bool:
        return self._tasks.running

    def set_services(self, services: Iterable[ServiceState | ServiceSpec]) -> None:
        targets: dict[tuple[str, str], _Target] = {}
        for spec in specs_with_source(services, LeadershipSource.PROBE):
            kind = probe_kind(spec)
            for member in spec.members:
                targets[(spec.name, member.name)] = _Target(
                    spec.name, member, kind, spec.leadership.probe, spec
                )
        self._tasks.want(targets)

    async def start(self) -> None:
        if self._tasks.running:
            return
        self._session = aiohttp.ClientSession()
        self._tasks.start()

    async def stop(self) -> None:
        self._trackers.clear()
        await self._tasks.stop()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def latest(self, service: str, member: str) -> Observation | None:
        """The member's debounced status with the freshest offset seen (None: not established)."""
        tracker = self._trackers.get((service, member))
        return tracker.latest if tracker else None

    def statuses(self, service: str) -> dict[str, Observation]:
        """Every member of `service` whose status is established, with its latest observation."""
        out = {}
        for (svc, member), tracker in self._trackers.items():
            if svc == service and tracker.latest is not None:
                out[member] = tracker.latest
        return out

    def _spawn(self, key: tuple[str, str], target: _Target) -> Coroutine[Any, Any, None]:
        tracker = ProbeTracker(
            target.service,
            target.member.name,
            fall=target.probe.fall,
            rise=target.probe.rise,
            refused_fall=target.probe.refused_fall,
            source=f"probe:{target.kind}",
            offset_refresh=self._offset_refresh,
        )
        self._trackers[key] = tracker
        return self._run(target, tracker)

    async def _run(self, target: _Target, tracker: ProbeTracker) -> None:
        assert self._session is not None
        prober = self._factory(target.spec, target.member, self._session)
        interval, timeout = target.probe.interval, target.probe.timeout
        retry = min(interval, target.probe.retry_interval)
        try:
            while True:
                started = self._clock()
                try:
                    async with asyncio.timeout(timeout + 0.5):  # backstop: probers bound themselves
                        result = await prober.probe()
                except TimeoutError:
                    await prober.close()
                    result = ProbeResult.failed(ProbeOutcome.TIMEOUT, "probe overran its timeout")
                if self._on_probe is not None:
                    try:
                        self._on_probe(target.service, target.member.name, result)
                    except Exception:
                        log.exception("probe callback failed")
                observation = tracker.feed(result, self._clock())
                if observation is not None:
                    await self._tasks.deliver(observation)
                # A refused probe is confirmed by the next one soon, not an interval later.
                delay = started + (retry if tracker.confirming else interval) - self._clock()
                if delay > 0:
                    await asyncio.sleep(delay)  # the probe interval, not a synchronisation
                else:
                    await asyncio.sleep(0)
        finally:
            with contextlib.suppress(Exception):
                await prober.close()
