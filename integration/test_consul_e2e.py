"""Issue 4 end to end with the Consul leadership source: a real `repstage-mesh serve` whose
`consul.address` points at Consul (the ConsulStandIn from tests/, run on its own event loop in a
thread; or a real agent named by CONSUL_HTTP_ADDR for the `consul_agent`-marked variant), a TCP
service with `leadership: {source: consul, mode: follow}`, and a real Envoy.

Two members are registered in Consul with a passing check, one tagged `primary`. Moving the tag
must move the traffic through Envoy, woken by the blocking query (`consul.wait` is 30 s, so a
poll would be far too late), and the control plane registers itself with an HTTP check on
/healthz at the address its API is reachable at (the stand-in's agent runs "on another host":
a check on 127.0.0.1 would be refused there, as a remote agent's own loopback). The case code is shared: the `consul` fixture is parametrised over the two targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.consul_standin import ConsulStandIn

from .harness import (
    ControlPlaneNode,
    Envoy,
    NamedTcpBackend,
    ask_once,
    free_low_port,
    http_json,
    wait_until,
    workdir,
)

WAIT = 30.0  # consul.wait: a blocking query returns on a change, or after this long


@dataclass
class ConsulTarget:
    """Where the test talks to Consul (HTTP API only, so both targets run the same code).
    `standin` is set for the stand-in: the test can also see its blocked queries."""

    address: str  # HOST:PORT
    standin: ConsulStandIn | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def put(self, path: str, body: Any = None) -> None:
        status, answer = http_json("PUT", self.url + path, body)
        assert status == 200, (path, status, answer)

    def get(self, path: str) -> Any:
        status, answer = http_json("GET", self.url + path)
        assert status == 200, (path, status, answer)
        return answer

    def register(self, service_id: str, name: str, port: int, tags: list[str]) -> None:
        """Register (or re-register) an instance with a passing TTL check."""
        self.put(
            "/v1/agent/service/register",
            {
                "ID": service_id,
                "Name": name,
                "Tags": tags,
                "Address": "127.0.0.1",
                "Port": port,
                "Check": {
                    "CheckID": f"{service_id}-alive",
                    "Name": f"{service_id} alive",
                    "TTL": "10m",
                    "Status": "passing",
                },
            },
        )
        self.put(f"/v1/agent/check/pass/{service_id}-alive")

    def deregister(self, service_id: str) -> None:
        with contextlib.suppress(Exception):
            http_json("PUT", f"{self.url}/v1/agent/service/deregister/{service_id}", timeout=2)


class StandInThread:
    """ConsulStandIn served by its own event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.standin: ConsulStandIn | None = None

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run a coroutine function (or plain callable) on the stand-in's loop; its result."""

        async def call() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        future: Future[Any] = asyncio.run_coroutine_threadsafe(call(), self.loop)
        return future.result(10)

    def __enter__(self) -> ConsulStandIn:
        self.thread.start()
        try:
            # The agent runs on another host (127.0.0.2 stands for it): its 127.0.0.1 is not ours,
            # so the control plane's check must target the address its API is reachable at.
            self.standin = self.run(
                lambda: ConsulStandIn(nodes={"far": "127.0.0.2"}, remote=frozenset({"far"}))
            )
            self.run(self.standin.start)
        except BaseException:
            self.__exit__()
            raise
        return self.standin

    def __exit__(self, *exc: object) -> None:
        try:
            if self.standin is not None:
                self.run(self.standin.close)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def _agent_address() -> str | None:
    raw = os.environ.get("CONSUL_HTTP_ADDR")
    if not raw:
        return None
    url = urlsplit(raw if "://" in raw else f"http://{raw}")
    return f"{url.hostname}:{url.port or 8500}"


@pytest.fixture(
    params=[
        pytest.param("standin"),
        pytest.param(
            "agent",
            marks=[
                pytest.mark.consul_agent,
                pytest.mark.skipif(_agent_address() is None, reason="CONSUL_HTTP_ADDR is not set"),
            ],
        ),
    ]
)
def consul(request: pytest.FixtureRequest) -> Iterator[ConsulTarget]:
    if request.param == "agent":
        address = _agent_address()
        assert address is not None
        yield ConsulTarget(address)
        return
    with StandInThread() as standin:
        yield ConsulTarget(standin.address, standin)


@dataclass
class ConsulMesh:
    consul: ConsulTarget
    cp: ControlPlaneNode
    envoy: Envoy
    port: int
    consul_name: str
    backends: dict[str, NamedTcpBackend]

    def service_id(self, member: str) -> str:
        return f"{self.consul_name}-{member}"

    def tag(self, member: str, tags: list[str]) -> None:
        self.consul.register(
            self.service_id(member), self.consul_name, self.backends[member].port, tags
        )

    def routed_to(self) -> str:
        return ask_once(self.port, "who").split(":", 1)[0]

    def refused(self) -> bool:
        """True when a request through Envoy gets no answer from any member."""
        try:
            self.routed_to()
        except ConnectionError:  # refused, reset or closed at once (a hang is not fail-closed)
            return True
        return False


@pytest.fixture
def consul_mesh(consul: ConsulTarget) -> Iterator[ConsulMesh]:
    # A unique Consul service name and instance IDs: a real agent may be shared. The instance IDs
    # are not the member names, so members are matched by address:port.
    consul_name = f"rs-e2e-{uuid.uuid4().hex[:8]}"
    with workdir() as wd, NamedTcpBackend("m0") as m0, NamedTcpBackend("m1") as m1:
        backends = {"m0": m0, "m1": m1}
        port = free_low_port()
        cfg: dict[str, Any] = {
            "services": [
                {
                    "name": "orders",
                    "protocol": "tcp",
                    "listen_port": port,
                    "members": [
                        {"name": n, "address": "127.0.0.1", "port": b.port}
                        for n, b in backends.items()
                    ],
                    "leadership": {
                        "source": "consul",
                        "mode": "follow",
                        "consul": {"service": consul_name, "tag": "primary", "wait": WAIT},
                    },
                }
            ],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
            "consul": {"address": consul.address, "register": True},
        }
        if consul.standin is not None:  # reachable from the stand-in's "other host"
            cfg["api"] = {"listen": f"127.0.0.2:{free_low_port()}"}
        cp = ControlPlaneNode(wd, cfg)
        envoy = Envoy(wd, "edge-1", [cp.xds_address])
        mesh = ConsulMesh(consul, cp, envoy, port, consul_name, backends)
        try:
            mesh.tag("m0", ["primary"])
            mesh.tag("m1", ["replica"])
            cp.start()
            envoy.start()
            yield mesh
        finally:
            envoy.stop()
            cp.stop()
            for member in backends:
                consul.deregister(mesh.service_id(member))


def test_consul_tag_move_reroutes_on_the_blocking_query(consul_mesh: ConsulMesh) -> None:
    m = consul_mesh
    standin = m.consul.standin
    # No primary in the config: Consul's answer establishes m0 (passing and tagged primary).
    wait_until(lambda: m.routed_to() == "m0", 20, what="traffic through Envoy reaches m0")
    assert m.cp.get("/v1/services/orders")["primary"] == "m0"
    if standin is not None:
        # the watch is parked in a blocking query: only a change can wake it before WAIT
        wait_until(lambda: standin.blocked(m.consul_name) >= 1, 10, what="a blocking health query")
        queries_before = len(standin.health_requests)

    changed_at = time.monotonic()
    m.tag("m1", ["primary"])  # Patroni-style: the new leader takes the tag, the old one drops it
    m.tag("m0", ["replica"])
    wait_until(lambda: m.routed_to() == "m1", WAIT, what="traffic through Envoy moves to m1")
    switched = time.monotonic() - changed_at
    assert switched < WAIT, f"the switch took {switched:.2f}s: a poll, not a woken blocking query"
    assert m.cp.get("/v1/services/orders")["primary"] == "m1"
    records = m.cp.get("/v1/failovers")["failovers"]
    assert any(r["new_primary"] == "m1" and r["status"] == "done" for r in records), records
    print(f"\nconsul tag moved -> traffic on m1 after {switched * 1000:.0f} ms (wait {WAIT:g} s)")

    if standin is not None:
        woke = standin.health_requests[queries_before - 1 :]
        # every query after the first carried the index and the configured wait (blocking), and
        # the switch needed a handful of them, not a poll loop
        assert all(
            "index" in q and q.get("wait") == f"{int(WAIT * 1000)}ms"
            for q in standin.health_requests[1:]
        ), standin.health_requests
        assert len(woke) <= 6, f"{len(woke)} health queries for one change: {woke}"

    # The primary's check fails and nobody else carries the tag: fail closed (Envoy refuses new
    # connections rather than guess), then its check passes again: back on m1.
    failed_at = time.monotonic()
    m.consul.put(f"/v1/agent/check/fail/{m.service_id('m1')}-alive")
    wait_until(m.refused, WAIT, what="fail-closed: Envoy refuses connections")
    assert time.monotonic() - failed_at < WAIT
    assert m.cp.get("/v1/services/orders")["primary"] is None
    m.consul.put(f"/v1/agent/check/pass/{m.service_id('m1')}-alive")
    wait_until(lambda: m.routed_to() == "m1", WAIT, what="traffic back on m1")


def test_control_plane_registers_itself_with_a_healthz_check(consul_mesh: ConsulMesh) -> None:
    m = consul_mesh
    api_port = int(m.cp.config["api"]["listen"].rsplit(":", 1)[1])
    services = m.consul.get("/v1/agent/services")
    mine = [
        s
        for s in services.values()
        if s["Service"] == "repstage-mesh" and (s.get("Meta") or {}).get("node_id") == "cp-1"
    ]
    assert len(mine) == 1, services
    assert mine[0]["Port"] == api_port, mine
    service_id = mine[0]["ID"]

    def healthz_check() -> dict[str, Any] | None:
        checks = m.consul.get("/v1/agent/checks")
        for check in checks.values():
            if check["ServiceID"] == service_id:
                return check
        return None

    check = wait_until(healthz_check, 10, what="the control plane's check")
    assert check["Type"] == "http", check
    api_host = m.cp.config["api"]["listen"].rsplit(":", 1)[0]
    assert (check.get("Definition") or {}).get("HTTP") == f"http://{api_host}:{api_port}/healthz", check
    # Consul (or the stand-in) runs the check against the node's /healthz: it turns passing.
    wait_until(
        lambda: (c := healthz_check()) is not None and c["Status"] == "passing",
        15,
        what="the /healthz check passing",
    )
