"""ConsulStandIn: an aiohttp app implementing the documented subset of Consul's HTTP API that
RepStage Mesh uses, for tests on machines where no Consul agent can run.

Implemented (https://developer.hashicorp.com/consul/api-docs):
- `GET  /v1/health/service/<name>` with `passing`, `tag` (repeatable: all must match), `index`
  and `wait` (blocking: the answer waits while the service's index is <= `index`, up to `wait`,
  default 5m, at most 10m), and the `X-Consul-Index` header.
- `PUT  /v1/agent/service/register` (`Check` or `Checks`; keys case-insensitive as in Consul;
  CheckID `service:<id>` or `service:<id>:<n>`; a new check is `critical` unless `Status` says
  otherwise), `PUT /v1/agent/service/deregister/<id>`, `GET /v1/agent/services`,
  `GET /v1/agent/checks`.
- `PUT  /v1/agent/check/pass|warn|fail/<id>` (`note`), `PUT /v1/agent/check/update/<id>`.
- HTTP checks are run (GET every Interval; 2xx passing, 429 warning, else critical), so a
  registration with an HTTP check turns passing when its endpoint answers.
- `GET|PUT|DELETE /v1/kv/<key>` (no blocking, no CAS), `GET /v1/status/leader`.

Test helpers: `set_check(id, status)`, `rewind_index(service, to)` (the index goes backwards, as
after a snapshot restore or when a query lands on another server), `blocked(service)` (blocking
queries waiting now), `fail_next(n)` (answer the next n health queries with 500).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


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


_SERVICE_KEYS = {
    k.lower(): k
    for k in (
        "ID",
        "Name",
        "Tags",
        "Address",
        "Port",
        "Meta",
        "Check",
        "Checks",
        "EnableTagOverride",
        "Weights",
        "Kind",
    )
}
_CHECK_KEYS = {
    k.lower(): k
    for k in (
        "CheckID",
        "ID",
        "Name",
        "Status",
        "Notes",
        "Output",
        "HTTP",
        "TCP",
        "TTL",
        "Interval",
        "Timeout",
        "DeregisterCriticalServiceAfter",
        "Method",
        "Header",
        "ServiceID",
        "Args",
    )
}


class ConsulStandIn:
    """The stand-in. `await start()` binds 127.0.0.1 on a free port; `address` is HOST:PORT."""

    def __init__(
        self, *, node: str = "standin", node_address: str = "127.0.0.1", run_checks: bool = True
    ) -> None:
        self.node, self.node_address = node, node_address
        self.run_checks = run_checks
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.kv: dict[
            str, tuple[bytes, int, int]
        ] = {}  # key -> (value, create index, modify index)
        self._index = 10
        self._service_index: dict[str, int] = {}
        self._event = asyncio.Event()
        self._generation = 0
        self._blocked: dict[str, int] = {}
        self._fail_next = 0
        self._check_tasks: dict[str, asyncio.Task[None]] = {}
        self.health_requests: list[dict[str, str]] = []
        self.app = self._make_app()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.address = ""

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.address = f"{bound[0]}:{bound[1]}"
        return self.address

    async def close(self) -> None:
        self._closing = True
        for task in self._check_tasks.values():
            task.cancel()
        await asyncio.gather(*self._check_tasks.values(), return_exceptions=True)
        self._check_tasks.clear()
        self._notify()  # release blocked queries
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- helpers for tests ---------------------------------------------------------------

    def set_check(self, check_id: str, status: str, output: str = "") -> None:
        if status not in ("passing", "warning", "critical"):
            raise ValueError(f"status: expected passing, warning or critical, got {status!r}")
        check = self.checks[check_id]
        if check["Status"] != status or check["Output"] != output:
            check["Status"], check["Output"] = status, output
            self._changed(check.get("ServiceName") or None)

    def rewind_index(self, service: str, to: int) -> None:
        """Make `service`'s index go backwards to `to` and answer the queries waiting on it."""
        self._index = to
        self._service_index[service] = to
        self._generation += 1
        self._notify()

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

    def _changed(self, service: str | None) -> None:
        self._index += 1
        if service:
            self._service_index[service] = self._index
        else:  # a node-level change touches every service
            for name in {s["Service"] for s in self.services.values()}:
                self._service_index[name] = self._index
        self._notify()

    def _register(self, body: dict[str, Any]) -> None:
        data = _canonical(body, _SERVICE_KEYS)
        name = data.get("Name")
        if not name:
            raise web.HTTPBadRequest(text="Missing service name")
        service_id = str(data.get("ID") or name)
        service = {
            "ID": service_id,
            "Service": name,
            "Tags": list(data.get("Tags") or []),
            "Address": data.get("Address") or "",
            "Port": int(data.get("Port") or 0),
            "Meta": dict(data.get("Meta") or {}),
            "EnableTagOverride": bool(data.get("EnableTagOverride", False)),
            "Weights": data.get("Weights") or {"Passing": 1, "Warning": 1},
        }
        defs = []
        if data.get("Check"):
            defs.append(data["Check"])
        defs.extend(data.get("Checks") or [])
        old = self.services.get(service_id)
        self.services[service_id] = service
        keep = set()
        for n, raw in enumerate(defs, start=1):
            check_def = _canonical(raw, _CHECK_KEYS)
            default_id = f"service:{service_id}" if len(defs) == 1 else f"service:{service_id}:{n}"
            check_id = str(check_def.get("CheckID") or check_def.get("ID") or default_id)
            keep.add(check_id)
            previous = self.checks.get(check_id)
            status = check_def.get("Status") or (previous["Status"] if previous else "critical")
            self.checks[check_id] = {
                "Node": self.node,
                "CheckID": check_id,
                "Name": check_def.get("Name") or f"Service '{name}' check",
                "Status": status,
                "Notes": check_def.get("Notes") or "",
                "Output": previous["Output"] if previous else "",
                "ServiceID": service_id,
                "ServiceName": name,
                "ServiceTags": service["Tags"],
                "Type": "http"
                if check_def.get("HTTP")
                else "tcp"
                if check_def.get("TCP")
                else "ttl"
                if check_def.get("TTL")
                else "",
                "Definition": {
                    k: check_def[k]
                    for k in (
                        "HTTP",
                        "TCP",
                        "TTL",
                        "Interval",
                        "Timeout",
                        "DeregisterCriticalServiceAfter",
                    )
                    if k in check_def
                },
            }
            self._start_check(check_id)
        for check_id in [
            c for c, v in self.checks.items() if v["ServiceID"] == service_id and c not in keep
        ]:
            self._drop_check(check_id)
        if old is not None and old["Service"] != name:
            self._changed(old["Service"])
        self._changed(name)

    def _deregister(self, service_id: str) -> bool:
        service = self.services.pop(service_id, None)
        if service is None:
            return False
        for check_id in [c for c, v in self.checks.items() if v["ServiceID"] == service_id]:
            self._drop_check(check_id)
        self._changed(service["Service"])
        return True

    def _drop_check(self, check_id: str) -> None:
        self.checks.pop(check_id, None)
        task = self._check_tasks.pop(check_id, None)
        if task is not None:
            task.cancel()

    def _start_check(self, check_id: str) -> None:
        check = self.checks[check_id]
        url = check["Definition"].get("HTTP")
        if not self.run_checks or not url or check_id in self._check_tasks:
            return
        interval = parse_duration(str(check["Definition"].get("Interval", "10s")))
        timeout = parse_duration(str(check["Definition"].get("Timeout", "10s")))
        self._check_tasks[check_id] = asyncio.create_task(
            self._run_http_check(check_id, url, interval, timeout)
        )

    async def _run_http_check(
        self, check_id: str, url: str, interval: float, timeout: float
    ) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            while check_id in self.checks:
                try:
                    async with session.get(url) as response:
                        code = response.status
                    status = (
                        "passing" if 200 <= code < 300 else "warning" if code == 429 else "critical"
                    )
                    output = f"HTTP GET {url}: {code}"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    status, output = "critical", f"HTTP GET {url}: {exc!r}"
                if check_id in self.checks:
                    self.set_check(check_id, status, output)
                await asyncio.sleep(interval)  # the check's own interval

    # --- HTTP handlers -------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/health/service/{name}", self._health_service)
        app.router.add_put("/v1/agent/service/register", self._agent_register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self._agent_deregister)
        app.router.add_get("/v1/agent/services", self._agent_services)
        app.router.add_get("/v1/agent/checks", self._agent_checks)
        app.router.add_put("/v1/agent/check/{verb:pass|warn|fail}/{id:.+}", self._agent_check_ttl)
        app.router.add_put("/v1/agent/check/update/{id:.+}", self._agent_check_update)
        app.router.add_get("/v1/kv/{key:.+}", self._kv_get)
        app.router.add_put("/v1/kv/{key:.+}", self._kv_put)
        app.router.add_delete("/v1/kv/{key:.+}", self._kv_delete)
        app.router.add_get("/v1/status/leader", self._leader)
        return app

    def _entries(self, name: str, passing: bool, tags: list[str]) -> list[dict[str, Any]]:
        node_check = {
            "Node": self.node,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Definition": {},
        }
        out = []
        for service in self.services.values():
            if service["Service"] != name or not all(t in service["Tags"] for t in tags):
                continue
            checks = [node_check] + [
                dict(c) for c in self.checks.values() if c["ServiceID"] == service["ID"]
            ]
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            node = {
                "ID": "",
                "Node": self.node,
                "Address": self.node_address,
                "Datacenter": "dc1",
                "TaggedAddresses": {},
                "Meta": {},
            }
            out.append({"Node": node, "Service": dict(service), "Checks": checks})
        return out

    async def _health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        query = request.query
        self.health_requests.append(dict(query))
        if self._fail_next > 0:
            self._fail_next -= 1
            return web.Response(status=500, text="stand-in: injected failure")
        try:
            index = int(query.get("index", "0"))
            wait = min(parse_duration(query.get("wait", "5m")), 600.0)
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        if index > 0:
            generation = self._generation
            deadline = asyncio.get_running_loop().time() + wait
            self._blocked[name] = self._blocked.get(name, 0) + 1
            try:
                while self.service_index(name) <= index and self._generation == generation:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0 or self._closing:
                        break
                    event = self._event
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), remaining)
            finally:
                self._blocked[name] -= 1
        passing = "passing" in query and query.get("passing", "") not in ("0", "false")
        body = self._entries(name, passing, query.getall("tag", []))
        return web.json_response(
            body,
            headers={
                "X-Consul-Index": str(self.service_index(name)),
                "X-Consul-KnownLeader": "true",
            },
        )

    async def _agent_register(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return web.Response(status=400, text=f"Request decode failed: {exc}")
        self._register(body)
        return web.Response(status=200)

    async def _agent_deregister(self, request: web.Request) -> web.Response:
        if not self._deregister(request.match_info["id"]):
            return web.Response(status=404, text=f'Unknown service ID "{request.match_info["id"]}"')
        return web.Response(status=200)

    async def _agent_services(self, request: web.Request) -> web.Response:
        return web.json_response(
            {sid: {**s, "Datacenter": "dc1"} for sid, s in self.services.items()}
        )

    async def _agent_checks(self, request: web.Request) -> web.Response:
        return web.json_response(self.checks)

    async def _agent_check_ttl(self, request: web.Request) -> web.Response:
        check_id = request.match_info["id"]
        if check_id not in self.checks:
            return web.Response(status=404, text=f'Unknown check ID "{check_id}"')
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[
            request.match_info["verb"]
        ]
        self.set_check(check_id, status, request.query.get("note", ""))
        return web.Response(status=200)

    async def _agent_check_update(self, request: web.Request) -> web.Response:
        check_id = request.match_info["id"]
        if check_id not in self.checks:
            return web.Response(status=404, text=f'Unknown check ID "{check_id}"')
        body = _canonical(await request.json(), _CHECK_KEYS)
        try:
            self.set_check(check_id, str(body.get("Status", "")), str(body.get("Output", "")))
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        return web.Response(status=200)

    async def _kv_get(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        headers = {"X-Consul-Index": str(max(1, self._index))}
        if key not in self.kv:
            return web.Response(status=404, headers=headers)
        value, create, modify = self.kv[key]
        if "raw" in request.query:
            return web.Response(body=value, headers=headers)
        entry = {
            "Key": key,
            "Value": base64.b64encode(value).decode() if value else None,
            "Flags": 0,
            "CreateIndex": create,
            "ModifyIndex": modify,
            "LockIndex": 0,
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
        return web.json_response(f"{self.node_address}:8300")
