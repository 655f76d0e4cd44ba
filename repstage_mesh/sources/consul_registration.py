"""This control-plane node's own registration in Consul, kept there (anti-entropy).

`ConsulRegistration` registers the node's REST API as a Consul service with an HTTP check on
`/healthz`, run by the Consul agent from its own host. So both the registered address and the
check URL must be an address the agent can reach, never a wildcard or the loopback of the node
(a remote agent would check its own loopback: always critical, reaped after
`DeregisterCriticalServiceAfter`). The address is, in order: `consul.register_address`; the API's
bind address when it is not a wildcard; else the Consul agent's node address (`/v1/agent/self`,
right when the agent runs on this host, Consul's usual deployment; a warning says to set
`consul.register_address`).

Consul may drop the registration (the critical-service reaper, an agent that lost its data
directory): every `resync_interval` the node asks `/v1/agent/service/<id>` and registers again
when it is gone (`restored` counts it; a token that may not read it registers again each time,
which Consul takes as a no-op that keeps the check's status). `stop()` deregisters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.sources.consul import ConsulError, consul_client

__all__ = ["WILDCARDS", "ConsulRegistration", "check_url"]

log = logging.getLogger(__name__)

WILDCARDS = frozenset({"0.0.0.0", "::", "", "*"})


def _seconds(value: float) -> str:
    return f"{int(value * 1000)}ms"


def check_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"


class ConsulRegistration:
    """Registers this control-plane node in Consul and keeps it registered.

    registration = ConsulRegistration(address="127.0.0.1:8500", token=None)
    await registration.register_self("cp-1", "0.0.0.0:8080")   # starts the resync task
    ...
    await registration.stop()    # deregisters, closes the client
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        token: str | None = None,
        service_name: str = "repstage-mesh",
        register_address: str | None = None,
        check_interval: float = 1.0,
        check_timeout: float = 1.0,
        deregister_after: float = 60.0,
        resync_interval: float = 10.0,
        request_timeout: float = 10.0,
        on_restore: Callable[[], None] | None = None,
    ) -> None:
        self._address, self._token = address, token
        self.service_name = service_name
        self.register_address = register_address
        self.check_interval, self.check_timeout = check_interval, check_timeout
        self.deregister_after = deregister_after
        self.resync_interval = resync_interval
        self.request_timeout = request_timeout
        self._on_restore = on_restore
        self.service_id: str | None = None
        self.registered_address: tuple[str, int] | None = None
        self.restored = 0  # times the registration was found gone and registered again
        self._client: Any = None
        self._want: tuple[str, str, tuple[str, ...]] | None = None  # node id, API address, tags
        self._params: dict[str, Any] | None = None  # what register() sends, once resolved
        self._resync: asyncio.Task[None] | None = None

    async def register_self(
        self, node_id: str, api_address: str, *, tags: Sequence[str] = ()
    ) -> str:
        """Register `node_id`'s REST API (bound at `api_address`, HOST:PORT); returns the service
        ID. Starts the resync task, which also retries a registration that failed here (Consul
        down at start), address resolution included."""
        if self._client is None:
            self._client = consul_client(self._address, self._token)
        self.service_id = f"{self.service_name}-{node_id}"
        self._want = (node_id, api_address, tuple(tags))
        if self._resync is None:
            self._resync = asyncio.create_task(self._keep_registered(), name="consul resync")
        await self._register()
        return self.service_id

    async def _build(self) -> dict[str, Any]:
        from consul import Check

        assert self._want is not None and self.service_id is not None
        node_id, api_address, tags = self._want
        host, port = await self._advertised(api_address)
        check = Check.http(
            check_url(host, port),
            _seconds(self.check_interval),
            timeout=_seconds(self.check_timeout),
            deregister=_seconds(self.deregister_after),
        )
        check["Name"] = f"{self.service_name} {node_id} /healthz"
        self.registered_address = (host, port)
        return {
            "name": self.service_name,
            "service_id": self.service_id,
            "address": host,
            "port": port,
            "tags": [self.service_name, *tags],
            "meta": {"node_id": node_id},
            "check": check,
        }

    async def _advertised(self, api_address: str) -> tuple[str, int]:
        if self.register_address is not None:
            return parse_host_port(self.register_address)
        host, port = parse_host_port(api_address)
        if host not in WILDCARDS:
            return host, port
        async with asyncio.timeout(self.request_timeout):
            agent = await self._client.agent.self()
        node_address = str((agent.get("Member") or {}).get("Addr") or "")
        if not node_address:
            raise ConsulError(
                "consul.register_address is not set, api.listen is a wildcard and the Consul "
                "agent did not say its address: set consul.register_address"
            )
        log.warning(
            "api.listen %s is a wildcard: registering in Consul at the agent's node address %s "
            "(right when the agent runs on this host; else set consul.register_address)",
            api_address, node_address,
        )
        return node_address, port

    async def _register(self) -> None:
        if self._params is None:
            self._params = await self._build()
        async with asyncio.timeout(self.request_timeout):
            ok = await self._client.agent.service.register(**self._params)
        if not ok:
            raise ConsulError(f"consul refused to register {self._params['service_id']}")

    async def resync(self) -> bool:
        """Register again if the registration is gone from the agent; True when it was."""
        if self._want is None or self._client is None:
            return False
        async with asyncio.timeout(self.request_timeout):
            # py-consul's service_definition() sends no token: ask with ours
            found = await self._client.http.get(
                lambda r: r.code, f"/v1/agent/service/{self.service_id}",
                headers=self._client.prepare_headers(),
            )
        if found == 200:
            return False
        if found != 404:  # 403: the token may not read it; registering again is harmless
            log.info("consul: cannot read registration %s (%s): registering it again",
                     self.service_id, found)
            await self._register()
            return False
        log.warning(
            "consul: registration %s is not in Consul (never made, reaped after its check was "
            "critical %s s, or the agent lost it): registering", self.service_id,
            self.deregister_after,
        )
        await self._register()
        self.restored += 1
        if self._on_restore is not None:
            self._on_restore()
        return True

    async def _keep_registered(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            try:
                await self.resync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consul: could not check this node's registration: %r", exc)

    async def stop(self) -> None:
        """Stop the resync task, deregister (best effort) and close the client."""
        task, self._resync = self._resync, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        service_id, self.service_id = self.service_id, None
        self._params = self._want = None
        if client is None:
            return
        try:
            if service_id is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.request_timeout):
                        await client.agent.service.deregister(service_id)
        finally:
            await client.close()
