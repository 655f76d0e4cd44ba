"""ConsulStandIn: the subset of Consul's HTTP API that RepStage Mesh uses, behaving as real Consul
does in every point RepStage relies on, for tests on machines where no Consul agent can run.

One stand-in is a datacenter: a catalog shared by several nodes, each with its own agent HTTP
address (`agent_address(node)`; `address` is the first node's). What it does as Consul does
(https://developer.hashicorp.com/consul/api-docs, and FACTS.md):

- `GET /v1/health/service/<name>` (any agent): one entry per instance on every node, each with
  the node's checks too (serfHealth, `_node_maintenance`, custom node checks) and the service's
  (`_service_maintenance:<id>` included), `Service.CreateIndex/ModifyIndex`, each check's
  `Definition`; `passing`, `tag` (repeatable). Blocking: with `index` > 0 the answer waits while
  the service's index is <= `index`, up to `wait` (default 5m, at most 10m) **plus a random
  jitter of up to wait/16**; `X-Consul-Index` on every answer.
- ACLs (`acl=`): a token (`X-Consul-Token` or `?token=`) maps to an `AclPolicy`; no token is the
  anonymous policy. Instances the token may not read (`service:read` on the service, `node:read`
  on its node) are left out of a `200` answer, silently; `X-Consul-Results-Filtered-By-ACLs:
  true` says so, **only to a request that carried a token** (Consul hides it from anonymous
  ones). An unknown token gets 403 "ACL not found"; writes need `write`.
- Agent registration (`PUT /v1/agent/service/register` on the node's agent): **a check that keeps
  its ID keeps its status and output across a re-registration (an explicit `Status` is
  ignored), and checks the new registration leaves out are kept** unless
  `?replace-existing-checks`; new checks start `critical` unless `Status` says otherwise;
  CheckID `service:<id>` or `service:<id>:<n>`; keys case-insensitive.
- Checks: HTTP checks run from their node every Interval (2xx passing, 429 warning, else
  critical), with Consul's output `HTTP GET <url>: <code> <reason> Output: <body>` or
  `Get "<url>": <error>`, the first run staggered randomly within one Interval as Consul does
  (`run_check` runs one now); a node in `remote` runs them from another host, so a loopback
  URL (127.0.0.1, localhost, ::1) is refused there. **TTL checks expire to critical** ("TTL
  expired") when not updated within their TTL. **The critical-service reaper** removes a service
  whose check has been critical longer than its `DeregisterCriticalServiceAfter` (raised to
  `min_deregister_after`, Consul: 1 min), swept every `reap_interval` (Consul: 30 s).
- `PUT /v1/agent/maintenance` and `/v1/agent/service/maintenance/<id>` (`enable`, `reason`),
  `PUT /v1/agent/check/register|deregister`, `pass|warn|fail|update`, `GET /v1/agent/self`,
  `/v1/agent/services`, `/v1/agent/service/<id>`, `/v1/agent/checks`; `GET|PUT|DELETE
  /v1/kv/<key>` (no blocking, no CAS); `GET /v1/status/leader`.

Where it cannot behave as Consul: there is no Raft, gossip or anti-entropy delay (a registration
is in the catalog at once; Consul's agents sync within seconds), no leader election (a query is
never held up to 7 s), every node is on this machine (by convention 127.0.0.x other than
127.0.0.1 stand for other hosts' addresses: reachable here, but not another node's loopback), the
reaper's and minimum's times are parameters so that tests can run them scaled down, and the
ACL model is per token: read the service and its nodes, or not, and write, or not.

Test helpers: `set_check`, `run_check`, `set_serf` (a node's agent dies), `rewind_index` (the index goes
backwards, as after a snapshot restore), `zero_index_next(n)`, `fail_next(n)` (500s),
`blocked(service)`, `health_requests`, `reaped`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_TRUE = ("", "1", "true")


def parse_duration(text: str) -> float:
    """A Go duration ("10s", "1m30s", "250ms") or plain seconds, in seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"bad duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _canonical(data: Any, keys: Mapping[str, str]) -> dict[str, Any]:
    """Consul decodes JSON keys case-insensitively: map them onto canonical spellings."""
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="Request decode failed: expected an object")
    return {keys.get(k.lower(), k): v for k, v in data.items()}


def _keys(*names: str) -> dict[str, str]:
    return {k.lower(): k for k in names}


_SERVICE_KEYS = _keys(
    "ID", "Name", "Tags", "Address", "Port", "Meta", "Check", "Checks", "EnableTagOverride",
    "Weights", "Kind",
)
_DEFINITION = ("HTTP", "TCP", "TTL", "Interval", "Timeout", "DeregisterCriticalServiceAfter")
_CHECK_KEYS = _keys(
    "CheckID", "ID", "Name", "Status", "Notes", "Output", "Method", "Header", "ServiceID", "Args",
    *_DEFINITION,
)


@dataclass(frozen=True)
class AclPolicy:
    """What a token may do: read every service (`services=None`) or those named, read nodes,
    write (register, deregister, update checks)."""

    services: frozenset[str] | None = None
    node_read: bool = True
    write: bool = True

    def reads(self, service: str) -> bool:
        return self.node_read and (self.services is None or service in self.services)


@dataclass
class _Node:
    name: str
    address: str
    local: bool
    serf: str = "passing"
    runner: web.AppRunner | None = None
    agent_address: str = ""


@dataclass
class _Check:
    node: str
    data: dict[str, Any]
    critical_since: float | None = None
    ttl_timer: asyncio.TimerHandle | None = None
    runner: asyncio.Task[None] | None = None
    deregister_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ConsulStandIn:
    """The stand-in. `await start()` binds each node's agent on 127.0.0.1, a free port."""

    def __init__(
        self,
        *,
        nodes: Mapping[str, str] | None = None,
        remote: frozenset[str] = frozenset(),
        acl: Mapping[str, AclPolicy] | None = None,
        anonymous: AclPolicy | None = None,
        run_checks: bool = True,
        reap_interval: float = 30.0,
        min_deregister_after: float = 60.0,
    ) -> None:
        spec = dict(nodes or {"standin": "127.0.0.1"})
        self.nodes = {n: _Node(n, a, n not in remote) for n, a in spec.items()}
        self.node = next(iter(self.nodes))
        self.acl = dict(acl) if acl is not None else None
        self.anonymous = anonymous if anonymous is not None else (
            AclPolicy(frozenset(), False, False) if acl is not None else AclPolicy()
        )
        self.run_checks = run_checks
        self.reap_interval, self.min_deregister_after = reap_interval, min_deregister_after
        self.services: dict[tuple[str, str], dict[str, Any]] = {}  # (node, service ID)
        self.checks: dict[tuple[str, str], _Check] = {}  # (node, check ID)
        self.kv: dict[str, tuple[bytes, int, int]] = {}  # key -> (value, create, modify index)
        self.reaped: list[tuple[str, str]] = []
        self.health_requests: list[dict[str, str]] = []
        self._index = 10
        self._service_index: dict[str, int] = {}
        self._event = asyncio.Event()
        self._generation = 0
        self._blocked: dict[str, int] = {}
        self._fail_next = self._zero_next = 0
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self.address = ""

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind every node's agent (the first one on `port`, 0: a free one); the first's address."""
        for n, node in enumerate(self.nodes.values()):
            node.runner = web.AppRunner(self._make_app(node.name), handle_signals=False, access_log=None)
            await node.runner.setup()
            await web.TCPSite(node.runner, host, port if n == 0 else 0).start()
            bound = node.runner.addresses[0]
            node.agent_address = f"{bound[0]}:{bound[1]}"
        self.address = self.nodes[self.node].agent_address
        self._reaper = asyncio.create_task(self._reap_loop())
        return self.address

    async def close(self) -> None:
        self._closing = True
        tasks = [c.runner for c in self.checks.values() if c.runner is not None]
        if self._reaper is not None:
            tasks.append(self._reaper)
        for check in self.checks.values():
            if check.ttl_timer is not None:
                check.ttl_timer.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._notify()  # release blocked queries
        for node in self.nodes.values():
            if node.runner is not None:
                await node.runner.cleanup()
                node.runner = None

    def agent_address(self, node: str) -> str:
        return self.nodes[node].agent_address

    # --- helpers for tests ---------------------------------------------------------------

    def _find_check(self, check_id: str, node: str | None) -> tuple[str, str]:
        keys = [k for k in self.checks if k[1] == check_id and node in (None, k[0])]
        if len(keys) != 1:
            raise KeyError(f"check {check_id!r} on {node or 'any node'}: {len(keys)} found")
        return keys[0]

    def set_check(
        self, check_id: str, status: str, output: str = "", node: str | None = None
    ) -> None:
        if status not in ("passing", "warning", "critical"):
            raise ValueError(f"status: expected passing, warning or critical, got {status!r}")
        key = self._find_check(check_id, node)
        check = self.checks[key]
        self._ttl_restart(key)
        if check.data["Status"] != status or check.data["Output"] != output:
            check.data["Status"], check.data["Output"] = status, output
            if status == "critical":
                check.critical_since = check.critical_since or time.monotonic()
            else:
                check.critical_since = None
            self._changed(key[0], check.data.get("ServiceName") or None)

    async def run_check(self, check_id: str, node: str | None = None) -> str:
        """Run an HTTP check once now, as its agent would; its new status."""
        key = self._find_check(check_id, node)
        definition = self.checks[key].data["Definition"]
        timeout = parse_duration(str(definition.get("Timeout", "10s")))
        status, output = await self._http_status(key[0], definition["HTTP"], timeout)
        self.set_check(key[1], status, output, node=key[0])
        return status

    def set_serf(self, node: str, status: str) -> None:
        """The node's agent stops (critical) or comes back (passing) in the gossip pool."""
        self.nodes[node].serf = status
        self._changed(node, None)

    def rewind_index(self, service: str, to: int) -> None:
        """Make `service`'s index go backwards to `to` and answer the queries waiting on it."""
        self._index = to
        self._service_index[service] = to
        self._generation += 1
        self._notify()

    def zero_index_next(self, count: int) -> None:
        """The next `count` health answers carry X-Consul-Index: 0 (a bug of old Consul)."""
        self._zero_next = count

    def blocked(self, service: str) -> int:
        return self._blocked.get(service, 0)

    def fail_next(self, count: int) -> None:
        self._fail_next = count

    def service_index(self, service: str) -> int:
        return max(1, self._service_index.get(service, 1))

    # --- state changes -------------------------------------------------------------------

    def _notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def _changed(self, node: str, service: str | None) -> None:
        self._index += 1
        names = {service} if service else {
            s["Service"] for (n, _), s in self.services.items() if n == node
        }
        for name in names:
            self._service_index[name] = self._index
        self._notify()

    def _register(self, node: str, body: Any, replace: bool) -> None:
        data = _canonical(body, _SERVICE_KEYS)
        name = data.get("Name")
        if not name:
            raise web.HTTPBadRequest(text="Missing service name")
        service_id = str(data.get("ID") or name)
        old = self.services.get((node, service_id))
        self._index += 1
        self.services[(node, service_id)] = service = {
            "ID": service_id,
            "Service": name,
            "Tags": list(data.get("Tags") or []),
            "Address": data.get("Address") or "",
            "Port": int(data.get("Port") or 0),
            "Meta": dict(data.get("Meta") or {}),
            "EnableTagOverride": bool(data.get("EnableTagOverride", False)),
            "Weights": data.get("Weights") or {"Passing": 1, "Warning": 1},
            "CreateIndex": old["CreateIndex"] if old else self._index,
            "ModifyIndex": self._index,
        }
        defs = ([data["Check"]] if data.get("Check") else []) + list(data.get("Checks") or [])
        keep = set()
        for n, raw in enumerate(defs, start=1):
            check_def = _canonical(raw, _CHECK_KEYS)
            default = f"service:{service_id}" if len(defs) == 1 else f"service:{service_id}:{n}"
            check_id = str(check_def.get("CheckID") or check_def.get("ID") or default)
            keep.add(check_id)
            self._add_check(node, check_id, check_def, service)
        for key in [k for k, c in self.checks.items() if k[0] == node
                    and c.data["ServiceID"] == service_id]:
            if key[1] not in keep and (replace or old is None):
                self._drop_check(key)
            else:
                self.checks[key].data.update(ServiceName=name, ServiceTags=service["Tags"])
        if old is not None and old["Service"] != name:
            self._changed(node, old["Service"])
        self._changed(node, name)

    def _add_check(
        self, node: str, check_id: str, check_def: dict[str, Any], service: dict[str, Any] | None
    ) -> None:
        key = (node, check_id)
        previous = self.checks.get(key)
        definition = {k: check_def[k] for k in _DEFINITION if k in check_def}
        kind = next((t.lower() for t in ("HTTP", "TCP", "TTL") if check_def.get(t)), "")
        status = previous.data["Status"] if previous else check_def.get("Status") or "critical"
        check = previous or _Check(node, {})
        check.data = {
            "Node": node,
            "CheckID": check_id,
            "Name": check_def.get("Name") or (
                f"Service '{service['Service']}' check" if service else check_id
            ),
            "Status": status,
            "Notes": check_def.get("Notes") or "",
            "Output": previous.data["Output"] if previous else "",
            "ServiceID": service["ID"] if service else str(check_def.get("ServiceID") or ""),
            "ServiceName": service["Service"] if service else "",
            "ServiceTags": service["Tags"] if service else [],
            "Type": kind,
            "Definition": definition,
        }
        if status == "critical" and check.critical_since is None:
            check.critical_since = time.monotonic()
        raw_after = definition.get("DeregisterCriticalServiceAfter")
        check.deregister_after = (
            max(parse_duration(str(raw_after)), self.min_deregister_after) if raw_after else None
        )
        changed = previous is None or previous.extra.get("definition") != definition
        check.extra["definition"] = definition
        self.checks[key] = check
        if changed and check.runner is not None:
            check.runner.cancel()
            check.runner = None
        self._ttl_restart(key)
        self._start_http(key)

    def _deregister(self, node: str, service_id: str) -> bool:
        service = self.services.pop((node, service_id), None)
        if service is None:
            return False
        for key in [k for k, c in self.checks.items() if k[0] == node
                    and c.data["ServiceID"] == service_id]:
            self._drop_check(key)
        self._changed(node, service["Service"])
        return True

    def _drop_check(self, key: tuple[str, str]) -> None:
        check = self.checks.pop(key, None)
        if check is None:
            return
        if check.runner is not None:
            check.runner.cancel()
        if check.ttl_timer is not None:
            check.ttl_timer.cancel()

    def _ttl_restart(self, key: tuple[str, str]) -> None:
        check = self.checks[key]
        ttl = check.data["Definition"].get("TTL")
        if check.ttl_timer is not None:
            check.ttl_timer.cancel()
            check.ttl_timer = None
        if ttl and not self._closing:
            check.ttl_timer = asyncio.get_running_loop().call_later(
                parse_duration(str(ttl)), self._ttl_expired, key
            )

    def _ttl_expired(self, key: tuple[str, str]) -> None:
        check = self.checks.get(key)
        if check is not None:
            check.ttl_timer = None
            self.set_check(key[1], "critical", "TTL expired", node=key[0])
            if check.ttl_timer is not None:  # set_check restarted it: an expiry is final
                check.ttl_timer.cancel()
                check.ttl_timer = None

    async def _reap_loop(self) -> None:
        """Consul's reaper: a service whose check is critical longer than its
        DeregisterCriticalServiceAfter is removed, checked every reap_interval."""
        while True:
            await asyncio.sleep(self.reap_interval)
            now = time.monotonic()
            for key, check in list(self.checks.items()):
                since, after = check.critical_since, check.deregister_after
                service_id = check.data["ServiceID"]
                expired = since is not None and after is not None and now - since >= after
                if expired and service_id and self._deregister(key[0], service_id):
                    self.reaped.append((key[0], service_id))

    def _start_http(self, key: tuple[str, str]) -> None:
        check = self.checks[key]
        url = check.data["Definition"].get("HTTP")
        if not self.run_checks or not url or check.runner is not None or self._closing:
            return
        interval = parse_duration(str(check.data["Definition"].get("Interval", "10s")))
        timeout = parse_duration(str(check.data["Definition"].get("Timeout", "10s")))
        check.runner = asyncio.create_task(self._run_http_check(key, url, interval, timeout))

    async def _http_status(self, node: str, url: str, timeout: float) -> tuple[str, str]:
        host = urlsplit(url).hostname or ""
        if host in _LOOPBACK and not self.nodes[node].local:
            return "critical", f'Get "{url}": dial tcp {host}: connect: connection refused'
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session, session.get(url) as response:
                code, body = response.status, (await response.text())[:200]
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return "critical", f'Get "{url}": {exc!r}'
        status = "passing" if 200 <= code < 300 else "warning" if code == 429 else "critical"
        return status, f"HTTP GET {url}: {code} {response.reason} Output: {body}"

    async def _run_http_check(
        self, key: tuple[str, str], url: str, interval: float, timeout: float
    ) -> None:
        await asyncio.sleep(random.uniform(0, interval))  # Consul staggers the first run
        while self.checks.get(key) is not None:
            status, output = await self._http_status(key[0], url, timeout)
            if key in self.checks and self.checks[key].data["Definition"].get("HTTP") == url:
                self.set_check(key[1], status, output, node=key[0])
            await asyncio.sleep(interval)  # the check's own interval

    # --- ACLs ----------------------------------------------------------------------------

    def _policy(self, request: web.Request) -> tuple[AclPolicy, bool]:
        """The request's policy, and whether it carried a token."""
        token = request.headers.get("X-Consul-Token") or request.query.get("token") or ""
        if not token or self.acl is None:
            return self.anonymous, bool(token)
        if token not in self.acl:
            raise web.HTTPForbidden(text="ACL not found")
        return self.acl[token], True

    def _may_write(self, request: web.Request) -> None:
        if not self._policy(request)[0].write:
            raise web.HTTPForbidden(text="Permission denied")

    # --- HTTP handlers -------------------------------------------------------------------

    def _make_app(self, node: str) -> web.Application:
        app = web.Application()
        agent = _AgentHandlers(self, node)
        r = app.router
        r.add_get("/v1/health/service/{name}", self._health_service)
        r.add_put("/v1/agent/service/register", agent.register)
        r.add_put("/v1/agent/service/deregister/{id:.+}", agent.deregister)
        r.add_put("/v1/agent/service/maintenance/{id:.+}", agent.service_maintenance)
        r.add_put("/v1/agent/maintenance", agent.node_maintenance)
        r.add_get("/v1/agent/self", agent.self_)
        r.add_get("/v1/agent/services", agent.services)
        r.add_get("/v1/agent/service/{id:.+}", agent.service)
        r.add_get("/v1/agent/checks", agent.checks)
        r.add_put("/v1/agent/check/register", agent.check_register)
        r.add_put("/v1/agent/check/deregister/{id:.+}", agent.check_deregister)
        r.add_put("/v1/agent/check/{verb:pass|warn|fail}/{id:.+}", agent.check_ttl)
        r.add_put("/v1/agent/check/update/{id:.+}", agent.check_update)
        r.add_get("/v1/kv/{key:.+}", self._kv_get)
        r.add_put("/v1/kv/{key:.+}", self._kv_put)
        r.add_delete("/v1/kv/{key:.+}", self._kv_delete)
        r.add_get("/v1/status/leader", self._leader)
        return app

    def _node_checks(self, node: str) -> list[dict[str, Any]]:
        serf = self.nodes[node].serf
        return [{
            "Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": serf,
            "Notes": "", "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
            "Output": "Agent alive and reachable" if serf == "passing"
            else "Agent not live or unreachable", "Definition": {},
        }] + [dict(c.data) for (n, _), c in self.checks.items() if n == node and not c.data["ServiceID"]]

    def _entries(
        self, name: str, passing: bool, tags: list[str], policy: AclPolicy
    ) -> tuple[list[dict[str, Any]], bool]:
        out, filtered = [], False
        for (node, service_id), service in self.services.items():
            if service["Service"] != name or not all(t in service["Tags"] for t in tags):
                continue
            if not policy.reads(name):
                filtered = True
                continue
            checks = self._node_checks(node) + [
                dict(c.data) for (n, _), c in self.checks.items()
                if n == node and c.data["ServiceID"] == service_id
            ]
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            info = self.nodes[node]
            out.append({
                "Node": {"ID": "", "Node": node, "Address": info.address, "Datacenter": "dc1",
                         "TaggedAddresses": {"lan": info.address}, "Meta": {}},
                "Service": dict(service),
                "Checks": checks,
            })
        return out, filtered

    async def _health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        query = request.query
        self.health_requests.append(dict(query))
        policy, has_token = self._policy(request)
        if self._fail_next > 0:
            self._fail_next -= 1
            return web.Response(status=500, text="stand-in: injected failure")
        try:
            index = int(query.get("index", "0"))
            wait = min(parse_duration(query.get("wait", "5m")), 600.0)
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        if index > 0:
            await self._block(name, index, wait + random.uniform(0, wait / 16))
        passing = "passing" in query and query.get("passing", "") not in ("0", "false")
        body, filtered = self._entries(name, passing, query.getall("tag", []), policy)
        headers = {"X-Consul-Index": str(self.service_index(name)), "X-Consul-KnownLeader": "true"}
        if self._zero_next > 0:
            self._zero_next -= 1
            headers["X-Consul-Index"] = "0"
        if filtered and has_token:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return web.json_response(body, headers=headers)

    async def _block(self, name: str, index: int, wait: float) -> None:
        generation = self._generation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        self._blocked[name] = self._blocked.get(name, 0) + 1
        try:
            while self.service_index(name) <= index and self._generation == generation:
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closing:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._event.wait()
        finally:
            self._blocked[name] -= 1

    async def _kv_get(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        headers = {"X-Consul-Index": str(max(1, self._index))}
        if key not in self.kv:
            return web.Response(status=404, headers=headers)
        value, create, modify = self.kv[key]
        if "raw" in request.query:
            return web.Response(body=value, headers=headers)
        entry = {
            "Key": key, "Value": base64.b64encode(value).decode() if value else None, "Flags": 0,
            "CreateIndex": create, "ModifyIndex": modify, "LockIndex": 0,
        }
        return web.json_response([entry], headers=headers)

    async def _kv_put(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        value = await request.read()
        self._index += 1
        create = self.kv[key][1] if key in self.kv else self._index
        self.kv[key] = (value, create, self._index)
        self._notify()
        return web.json_response(True)

    async def _kv_delete(self, request: web.Request) -> web.Response:
        if self.kv.pop(request.match_info["key"], None) is not None:
            self._index += 1
            self._notify()
        return web.json_response(True)

    async def _leader(self, request: web.Request) -> web.Response:
        return web.json_response(f"{self.nodes[self.node].address}:8300")


class _AgentHandlers:
    """The agent endpoints of one node: they act on that node's services and checks."""

    def __init__(self, standin: ConsulStandIn, node: str) -> None:
        self.s, self.node = standin, node

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except json.JSONDecodeError as exc:
            raise web.HTTPBadRequest(text=f"Request decode failed: {exc}") from None

    async def register(self, request: web.Request) -> web.Response:
        self.s._may_write(request)
        replace = request.query.get("replace-existing-checks", "x").lower() in _TRUE
        self.s._register(self.node, await self._body(request), replace)
        return web.Response(status=200)

    async def deregister(self, request: web.Request) -> web.Response:
        self.s._may_write(request)
        service_id = request.match_info["id"]
        if not self.s._deregister(self.node, service_id):
            return web.Response(status=404, text=f'Unknown service ID "{service_id}"')
        return web.Response(status=200)

    def _maintenance(self, request: web.Request, check_id: str, service: dict[str, Any] | None,
                     name: str) -> web.Response:
        self.s._may_write(request)
        enable = request.query.get("enable", "")
        if enable not in ("true", "false"):
            return web.Response(status=400, text="Missing value for enable")
        key = (self.node, check_id)
        if enable == "true" and key not in self.s.checks:
            reason = request.query.get("reason") or (
                "Maintenance mode is enabled for this node, but no reason was provided. "
                "This is a default message.")
            self.s._add_check(self.node, check_id, {"Name": name, "Notes": reason,
                                                    "Status": "critical"}, service)
            self.s._changed(self.node, service["Service"] if service else None)
        elif enable == "false" and key in self.s.checks:
            self.s._drop_check(key)
            self.s._changed(self.node, service["Service"] if service else None)
        return web.Response(status=200)

    async def node_maintenance(self, request: web.Request) -> web.Response:
        return self._maintenance(request, "_node_maintenance", None, "Node Maintenance Mode")

    async def service_maintenance(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        service = self.s.services.get((self.node, service_id))
        if service is None:
            return web.Response(status=404, text=f'Unknown service ID "{service_id}"')
        return self._maintenance(
            request, f"_service_maintenance:{service_id}", service, "Service Maintenance Mode"
        )

    async def self_(self, request: web.Request) -> web.Response:
        info = self.s.nodes[self.node]
        return web.json_response({
            "Config": {"Datacenter": "dc1", "NodeName": self.node, "Server": False},
            "Member": {"Name": self.node, "Addr": info.address, "Port": 8301, "Status": 1},
        })

    async def services(self, request: web.Request) -> web.Response:
        policy = self.s._policy(request)[0]
        return web.json_response({
            sid: {**svc, "Datacenter": "dc1"}
            for (n, sid), svc in self.s.services.items()
            if n == self.node and policy.reads(svc["Service"])
        })

    async def service(self, request: web.Request) -> web.Response:
        service = self.s.services.get((self.node, request.match_info["id"]))
        if service is None:
            return web.Response(status=404, text=f'unknown service ID: {request.match_info["id"]}')
        if not self.s._policy(request)[0].reads(service["Service"]):
            return web.Response(status=403, text="Permission denied")
        return web.json_response({**service, "Datacenter": "dc1"})

    async def checks(self, request: web.Request) -> web.Response:
        return web.json_response(
            {cid: c.data for (n, cid), c in self.s.checks.items() if n == self.node}
        )

    async def check_register(self, request: web.Request) -> web.Response:
        self.s._may_write(request)
        check_def = _canonical(await self._body(request), _CHECK_KEYS)
        check_id = str(check_def.get("CheckID") or check_def.get("ID") or check_def.get("Name"))
        service = self.s.services.get((self.node, str(check_def.get("ServiceID") or "")))
        self.s._add_check(self.node, check_id, check_def, service)
        self.s._changed(self.node, service["Service"] if service else None)
        return web.Response(status=200)

    async def check_deregister(self, request: web.Request) -> web.Response:
        self.s._may_write(request)
        key = (self.node, request.match_info["id"])
        check = self.s.checks.get(key)
        if check is None:
            return web.Response(status=404, text=f'Unknown check ID "{key[1]}"')
        self.s._drop_check(key)
        self.s._changed(self.node, check.data.get("ServiceName") or None)
        return web.Response(status=200)

    async def check_ttl(self, request: web.Request) -> web.Response:
        self.s._may_write(request)
        check_id = request.match_info["id"]
        if (self.node, check_id) not in self.s.checks:
            return web.Response(status=404, text=f'Unknown check ID "{check_id}"')
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[
            request.match_info["verb"]
        ]
        self.s.set_check(check_id, status, request.query.get("note", ""), node=self.node)
        return web.Response(status=200)

    async def check_update(self, request: web.Request) -> web.Response:
        self.s._may_write(request)
        check_id = request.match_info["id"]
        if (self.node, check_id) not in self.s.checks:
            return web.Response(status=404, text=f'Unknown check ID "{check_id}"')
        body = _canonical(await self._body(request), _CHECK_KEYS)
        try:
            self.s.set_check(
                check_id, str(body.get("Status", "")), str(body.get("Output", "")), node=self.node
            )
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        return web.Response(status=200)
