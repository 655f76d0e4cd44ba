"""The Consul leadership source: a blocking-query watch of each consul-sourced service's health.

`ConsulSource` (Raft leader only) watches `/v1/health/service/<name>` for every service whose
leadership source is `consul` (py-consul's asyncio client) and turns each answer into one
Observation per member with `consul_health.read_health` (the sans-IO part: matching, checks,
tags, what an empty or ACL-filtered answer means). It emits a member's Observation when its
status changes, and logs (and counts, through `on_anomaly`) what looks wrong once per episode:
an answer filtered by ACLs or empty, two instances for one member, a stale check, a warning.

- Blocking queries follow Consul's rules (`consul_health.BlockingIndex`): the index sent is the
  last X-Consul-Index; an index that goes backwards or is 0 resets the watch; Consul adds up to
  wait/16 of jitter, which the request timeout allows for; the loop is rate-limited (a token
  bucket: `query_burst` at once, then `max_query_rate` per second). Every answer is read (an unchanged
  answer changes no status, so it emits nothing): an answer is never skipped for its index.
- Errors back off exponentially with jitter; after `unknown_after_errors` in a row every member
  is UNKNOWN (no information, not down). After an error the next query does not block, so the
  first answer after an outage is read in full even when nothing changed meanwhile.
- The token: `consul.token` from the config wins; py-consul's `CONSUL_HTTP_TOKEN` from the
  environment is used only when the config has none.

`ConsulRegistration` (every node) lives in `consul_registration.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from repstage_mesh.core.errors import MeshError
from repstage_mesh.core.models import LeadershipSource, ServiceSpec, ServiceState
from repstage_mesh.core.observations import MemberStatus, Observation, specs_with_source
from repstage_mesh.sources.consul_health import (
    SOURCE,
    Anomaly,
    BlockingIndex,
    HealthAnswer,
    QueryPacer,
    read_health,
)
from repstage_mesh.sources.supervisor import KeyedTasks, ObservationCallback

__all__ = [
    "AnomalyCallback",
    "ConsulError",
    "ConsulSource",
    "WatchStats",
    "consul_client",
    "health_query",
    "parse_consul_address",
]

log = logging.getLogger(__name__)

AnomalyCallback = Callable[[str, str], None]  # (service, kind): for the metric
_LOUD = {"acl_filtered", "empty_answer", "ambiguous"}  # logged at ERROR, the rest at WARNING


class ConsulError(MeshError):
    """Consul answered with an error status or refused a registration (kept inside the source,
    like a timeout: logged, counted, retried)."""

    code = "consul"


def parse_consul_address(address: str | None) -> dict[str, Any]:
    """ "host:port" or "http(s)://host:port" → py-consul keyword arguments (None: its defaults,
    which read CONSUL_HTTP_ADDR, else 127.0.0.1:8500)."""
    if address is None:
        return {}
    url = urlsplit(address if "://" in address else f"http://{address}")
    if url.hostname is None:
        raise ValueError(
            f"consul address: expected HOST:PORT or an http(s):// URL, got {address!r}"
        )
    port = url.port or (443 if url.scheme == "https" else 8500)
    return {"host": url.hostname, "port": port, "scheme": url.scheme}


def consul_client(address: str | None = None, token: str | None = None) -> Any:
    """A py-consul asyncio client (`consul.aio.Consul`). Its aiohttp session has a total timeout
    longer than the longest blocking query (600 s + Consul's wait/16 jitter); callers bound each
    request themselves. A configured `token` wins over CONSUL_HTTP_TOKEN (py-consul lets the
    environment override its argument; we set it back)."""
    import consul.aio

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # py-consul passes verify_ssl= to aiohttp
        client = consul.aio.Consul(
            token=token, connections_timeout=700, **parse_consul_address(address)
        )
    if token is not None:
        if os.environ.get("CONSUL_HTTP_TOKEN") not in (None, token):
            log.info("CONSUL_HTTP_TOKEN is set but consul.token is configured: using consul.token")
        client.token = token
    return client


async def health_query(
    client: Any, name: str, index: int | None, wait: float
) -> HealthAnswer:
    """One `/v1/health/service/<name>` query, blocking when `index` is given, with the headers
    py-consul's `health.service` drops (X-Consul-Results-Filtered-By-ACLs)."""
    params: list[tuple[str, str]] = []
    if index is not None:
        params += [("index", str(index)), ("wait", f"{int(wait * 1000)}ms")]
    response = await client.http.get(
        lambda r: r, f"/v1/health/service/{name}", params=params, headers=client.prepare_headers()
    )
    if response.code != 200:
        raise ConsulError(f"consul answered {response.code}: {str(response.body)[:200]}")
    try:
        raw_index = int(response.headers.get("X-Consul-Index", ""))
        entries = json.loads(response.body)
    except ValueError as exc:
        raise ConsulError(f"consul answer without a usable index or body: {exc}") from None
    filtered = str(response.headers.get("X-Consul-Results-Filtered-By-ACLs", "")).lower() == "true"
    return HealthAnswer(raw_index, entries if isinstance(entries, list) else [], filtered)


@dataclass
class WatchStats:
    """Counters of one service's watch (tests and /metrics)."""

    queries: int = 0  # requests sent
    responses: int = 0
    errors: int = 0
    resets: int = 0  # the index went backwards or was 0
    index: int | None = None  # the index the next query sends
    blocking: bool = False  # a blocking query (with an index) is outstanding
    anomalies: int = 0  # anomalies logged (each new one once)
    rate_limited: bool = False  # the last query waited for the pacer


class ConsulSource:
    """Watches the health of every consul-sourced service and reports Observations.

    source = ConsulSource(on_observation, address="127.0.0.1:8500", token=None)
    source.set_services(state.services.values())
    await source.start()
    ...
    await source.stop()      # cancels the pending blocking queries: returns promptly
    """

    def __init__(
        self,
        on_observation: ObservationCallback,
        *,
        address: str | None = None,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        unknown_after_errors: int = 3,
        on_anomaly: AnomalyCallback | None = None,
        max_query_rate: float = 20.0,
        query_burst: int = 5,
    ) -> None:
        self._address, self._token = address, token
        self._clock = clock
        self._initial_backoff, self._max_backoff = initial_backoff, max_backoff
        self._unknown_after = unknown_after_errors
        self._on_anomaly = on_anomaly
        self._rate, self._burst = max_query_rate, query_burst
        self._last: dict[str, dict[str, Observation]] = {}
        self._anomalies: dict[str, set[tuple[str, str | None]]] = {}  # (kind, member) now
        self.stats: dict[str, WatchStats] = {}
        # One watch per service, restarted when anything in its spec changes. A stop keeps
        # `_last` and `stats` (latest() answers after a stop); a dropped watch forgets `_last`.
        self._tasks: KeyedTasks[str, ServiceSpec] = KeyedTasks(
            self._spawn,
            name=lambda name: f"consul watch {name}",
            on_observation=on_observation,
            log=log,
            on_drop=lambda name: self._last.pop(name, None),
        )
        self._client: Any = None

    def set_services(self, services: Iterable[ServiceState | ServiceSpec]) -> None:
        specs = specs_with_source(services, LeadershipSource.CONSUL)
        self._tasks.want({spec.name: spec for spec in specs})

    async def start(self) -> None:
        if self._tasks.running:
            return
        self._client = consul_client(self._address, self._token)
        self._tasks.start()

    async def stop(self) -> None:
        await self._tasks.stop()
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def latest(self, service: str) -> dict[str, Observation]:
        """The last Observation of every member of `service` (empty before the first answer)."""
        return dict(self._last.get(service, {}))

    def _spawn(self, name: str, spec: ServiceSpec) -> Coroutine[Any, Any, None]:
        self.stats[name] = WatchStats()
        self._anomalies.pop(name, None)
        return self._watch(spec)

    async def _watch(self, spec: ServiceSpec) -> None:
        consul_spec = spec.leadership.consul
        name = consul_spec.service or spec.name
        wait = consul_spec.wait
        stats = self.stats[spec.name]
        index = BlockingIndex()
        pacer = QueryPacer(self._rate, self._burst)
        backoff, errors = self._initial_backoff, 0
        while True:
            await self._pace(spec.name, name, pacer)
            stats.index = sent = index.value
            stats.queries += 1
            stats.blocking = sent is not None
            try:
                # Consul adds up to wait/16 of jitter; allow that plus a margin for the answer.
                async with asyncio.timeout(wait + wait / 16 + 5):
                    answer = await health_query(self._client, name, sent, wait)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stats.blocking = False
                stats.errors += 1
                errors += 1
                index.failed()  # the first answer after errors is read without blocking
                log.warning("consul watch of %s failed (%d in a row): %r", name, errors, exc)
                if errors >= self._unknown_after:
                    await self._unknown(spec, f"consul unreachable: {exc!r}"[:200])
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # back off, with jitter
                backoff = min(backoff * 2, self._max_backoff)
                continue
            stats.blocking = False
            stats.responses += 1
            errors, backoff = 0, self._initial_backoff
            if index.answered(answer.index):
                stats.resets += 1
                log.info("consul index of %s reset (%s → %d)", name, sent, answer.index)
            stats.index = index.value
            reading = read_health(spec, answer, consul_spec.tag, self._clock())
            self._report(spec.name, name, reading.anomalies)
            await self._publish(spec, reading.observations)

    async def _pace(self, service: str, consul_name: str, pacer: QueryPacer) -> None:
        """Consul's advice: rate-limit the blocking loop (a churning result, or an index that
        never blocks, degrades into polling at `max_query_rate`, not a busy loop)."""
        pause = pacer.delay(time.monotonic())  # real time: the pause is a real sleep
        stats = self.stats[service]
        if pause <= 0:
            stats.rate_limited = False
            return
        if not stats.rate_limited:
            stats.rate_limited = True
            log.warning(
                "consul watch of %s (%s): answers come faster than %g/s; pacing the queries",
                service, consul_name, self._rate,
            )
        if self._on_anomaly is not None:
            self._on_anomaly(service, "rate_limited")
        await asyncio.sleep(pause)

    def _report(self, service: str, consul_name: str, anomalies: Iterable[Anomaly]) -> None:
        """Log and count each anomaly when it appears (not again while it lasts)."""
        messages = {(a.kind, a.member): a.message for a in anomalies}
        current = set(messages)
        seen = self._anomalies.get(service, set())
        for kind, member in sorted(current - seen, key=str):
            message = messages[(kind, member)]
            self.stats[service].anomalies += 1
            level = logging.ERROR if kind in _LOUD else logging.WARNING
            who = f"member {member!r} of " if member else ""
            log.log(level, "consul: %s%s (consul service %r): %s", who, service, consul_name, message)
            if self._on_anomaly is not None:
                self._on_anomaly(service, kind)
        self._anomalies[service] = current

    async def _publish(self, spec: ServiceSpec, observations: dict[str, Observation]) -> None:
        last = self._last.setdefault(spec.name, {})
        for member, obs in observations.items():
            previous = last.get(member)
            if previous is not None and previous.status is obs.status:
                continue
            last[member] = obs
            await self._tasks.deliver(obs)

    async def _unknown(self, spec: ServiceSpec, detail: str) -> None:
        now = self._clock()
        await self._publish(
            spec,
            {
                m.name: Observation(spec.name, m.name, MemberStatus.UNKNOWN, now, SOURCE, detail)
                for m in spec.members
            },
        )
