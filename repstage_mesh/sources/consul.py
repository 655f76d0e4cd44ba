"""The Consul leadership source, and the control-plane node's own registration in Consul.

`ConsulSource` (Raft leader only) watches `/v1/health/service/<name>` for every service whose
leadership source is `consul`, with blocking queries (py-consul's asyncio client): the primary is
the instance whose checks all pass and which carries the configured tag (`primary` by default,
as Patroni registers). Each answer becomes one Observation per member, emitted when a member's
status changes:

- all checks passing (node checks such as serfHealth included): PRIMARY with the tag, else REPLICA;
- any check not passing (warning, critical, maintenance): DOWN, the failing checks in `detail`;
- no Consul instance matches the member: DOWN ("not registered in Consul");
- Consul unreachable for `unknown_after_errors` attempts in a row: UNKNOWN (no information,
  which is not the same as down).

Instances match members by Service ID == member name, else by address:port (the service
address, or the node address when the service has none). Blocking-query rules from Consul's
documentation: the index sent is the last X-Consul-Index; an index that goes backwards resets
the watch (the next query does not block); an index below 1 is taken as 1; errors back off
exponentially with jitter; an answer with an unchanged index is not a change.

`ConsulRegistration` (every node) registers the node's REST API as a Consul service with an
HTTP check on `/healthz`, and deregisters it on `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import warnings
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from repstage_mesh.core.models import LeadershipSource, ServiceSpec, ServiceState
from repstage_mesh.core.observations import MemberStatus, Observation, specs_with_source
from repstage_mesh.sources.supervisor import KeyedTasks, ObservationCallback

__all__ = [
    "ConsulRegistration",
    "ConsulSource",
    "WatchStats",
    "consul_client",
    "health_observations",
    "parse_consul_address",
]

log = logging.getLogger(__name__)

SOURCE = "consul"


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
    request themselves."""
    import consul.aio

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # py-consul passes verify_ssl= to aiohttp
        return consul.aio.Consul(
            token=token, connections_timeout=700, **parse_consul_address(address)
        )


# --- from Consul's answer to Observations (pure) -----------------------------------------------


def _entry_address(entry: Mapping[str, Any]) -> str:
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    return str(service.get("Address") or node.get("Address") or "")


def _entry_status(entry: Mapping[str, Any], tag: str) -> tuple[MemberStatus, str]:
    service = entry.get("Service") or {}
    checks = entry.get("Checks") or []
    failing = [c for c in checks if c.get("Status") != "passing"]
    if failing:
        parts = []
        for check in failing:
            output = str(check.get("Output") or "").strip().replace("\n", " ")[:120]
            name = check.get("CheckID") or check.get("Name") or "?"
            parts.append(f"{check.get('Status')}: {name}" + (f" ({output})" if output else ""))
        return MemberStatus.DOWN, "; ".join(parts)
    tags = list(service.get("Tags") or [])
    if tag in tags:
        return MemberStatus.PRIMARY, f"passing, tagged {tag!r}"
    return MemberStatus.REPLICA, f"passing, tags {tags}"


_RANK = {
    MemberStatus.PRIMARY: 3,
    MemberStatus.REPLICA: 2,
    MemberStatus.UNKNOWN: 1,
    MemberStatus.DOWN: 0,
}


def health_observations(
    spec: ServiceSpec, entries: Sequence[Mapping[str, Any]], tag: str, now: float
) -> dict[str, Observation]:
    """One Observation per member of `spec` from a `/v1/health/service/<name>` answer."""
    by_id = {m.name: m.name for m in spec.members}
    by_endpoint = {(m.address, m.port): m.name for m in spec.members}
    found: dict[str, tuple[MemberStatus, str]] = {}
    for entry in entries:
        service = entry.get("Service") or {}
        member = by_id.get(str(service.get("ID", ""))) or by_endpoint.get(
            (_entry_address(entry), int(service.get("Port") or 0))
        )
        if member is None:
            continue
        status, detail = _entry_status(entry, tag)
        if member not in found or _RANK[status] > _RANK[found[member][0]]:
            found[member] = (status, detail)
    out = {}
    for m in spec.members:
        status, detail = found.get(m.name, (MemberStatus.DOWN, "not registered in Consul"))
        out[m.name] = Observation(spec.name, m.name, status, now, SOURCE, detail)
    return out


# --- the watch -------------------------------------------------------------------------------


@dataclass
class WatchStats:
    """Counters of one service's watch (tests and /metrics)."""

    queries: int = 0  # requests sent
    responses: int = 0
    errors: int = 0
    resets: int = 0  # the index went backwards
    index: int | None = None  # the index the next query sends
    blocking: bool = False  # a blocking query (with an index) is outstanding


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
    ) -> None:
        self._address, self._token = address, token
        self._clock = clock
        self._initial_backoff, self._max_backoff = initial_backoff, max_backoff
        self._unknown_after = unknown_after_errors
        self._last: dict[str, dict[str, Observation]] = {}
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
        return self._watch(spec)

    async def _watch(self, spec: ServiceSpec) -> None:
        consul_spec = spec.leadership.consul
        name = consul_spec.service or spec.name
        wait = consul_spec.wait
        stats = self.stats[spec.name]
        backoff, errors = self._initial_backoff, 0
        while True:
            index = stats.index
            stats.queries += 1
            stats.blocking = index is not None
            try:
                # Consul adds up to wait/16 of jitter; allow that plus a margin for the answer.
                async with asyncio.timeout(wait + wait / 16 + 5):
                    raw_index, entries = await self._client.health.service(
                        name,
                        index=str(index) if index is not None else None,
                        wait=f"{int(wait * 1000)}ms",
                    )
                new_index = int(raw_index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stats.blocking = False
                stats.errors += 1
                errors += 1
                log.warning("consul watch of %s failed (%d in a row): %r", name, errors, exc)
                if errors == self._unknown_after:
                    await self._unknown(spec, f"consul unreachable: {exc!r}"[:200])
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # back off, with jitter
                backoff = min(backoff * 2, self._max_backoff)
                continue
            stats.blocking = False
            stats.responses += 1
            errors, backoff = 0, self._initial_backoff
            if index is not None and new_index < index:
                stats.resets += 1
                stats.index = None  # the index went backwards: start over without blocking
            else:
                stats.index = max(new_index, 1)
            if index is not None and new_index == index:
                continue  # the wait elapsed, or a wake-up without a change
            await self._publish(
                spec, health_observations(spec, entries or [], consul_spec.tag, self._clock())
            )

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


# --- the node's own registration -----------------------------------------------------------


class ConsulRegistration:
    """Registers this control-plane node in Consul, with an HTTP check on its `/healthz`.

    registration = ConsulRegistration(address="127.0.0.1:8500", token=None)
    await registration.register_self("cp-1", "10.0.0.5:8080")
    ...
    await registration.stop()    # deregisters, closes the client
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        token: str | None = None,
        service_name: str = "repstage-mesh",
        check_interval: str = "1s",
        check_timeout: str = "1s",
        deregister_after: str = "1m",
        request_timeout: float = 10.0,
    ) -> None:
        self._address, self._token = address, token
        self.service_name = service_name
        self.check_interval, self.check_timeout = check_interval, check_timeout
        self.deregister_after = deregister_after
        self.request_timeout = request_timeout
        self.service_id: str | None = None
        self._client: Any = None

    async def register_self(
        self, node_id: str, api_address: str, *, tags: Sequence[str] = ()
    ) -> str:
        """Register `node_id`'s REST API at `api_address` (HOST:PORT); returns the service ID.
        A wildcard host (0.0.0.0, ::) registers no address (Consul uses the node's) and checks
        127.0.0.1."""
        from consul import Check

        from repstage_mesh.core.addresses import parse_host_port

        host, port = parse_host_port(api_address)
        wildcard = host in ("0.0.0.0", "::", "")
        check_host = "127.0.0.1" if wildcard else (f"[{host}]" if ":" in host else host)
        if self._client is None:
            self._client = consul_client(self._address, self._token)
        service_id = f"{self.service_name}-{node_id}"
        check = Check.http(
            f"http://{check_host}:{port}/healthz",
            self.check_interval,
            timeout=self.check_timeout,
            deregister=self.deregister_after,
        )
        check["Name"] = f"{self.service_name} {node_id} /healthz"
        async with asyncio.timeout(self.request_timeout):
            ok = await self._client.agent.service.register(
                self.service_name,
                service_id=service_id,
                address=None if wildcard else host,
                port=port,
                tags=[self.service_name, *tags],
                meta={"node_id": node_id},
                check=check,
            )
        if not ok:
            raise RuntimeError(f"consul refused to register {service_id}")
        self.service_id = service_id
        return service_id

    async def stop(self) -> None:
        """Deregister (best effort) and close the client."""
        client, self._client = self._client, None
        service_id, self.service_id = self.service_id, None
        if client is None:
            return
        try:
            if service_id is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.request_timeout):
                        await client.agent.service.deregister(service_id)
        finally:
            await client.close()
