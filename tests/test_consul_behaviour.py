"""Issue 14, item 3: Consul as real agents behave. One test per point, against ConsulStandIn,
which behaves as Consul does in each (its docstring says where it cannot).

Each test names the behaviour of Consul it relies on and the decision RepStage made about it
(README, "Consul as a leadership source").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from consul_standin import AclPolicy, ConsulStandIn
from fakes import eventually as _eventually

from repstage_mesh.core.models import ServiceSpec
from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.sources.consul import ConsulSource, consul_client
from repstage_mesh.sources.consul_registration import ConsulRegistration


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    await _eventually(predicate, what, timeout)


MEMBERS = {"pg-a": 25001, "pg-b": 25002, "pg-c": 25003}


def spec_for(consul_name: str, members: dict[str, int], *, address: str = "127.0.0.1",
             wait: float = 30.0, tag: str = "primary") -> ServiceSpec:
    return ServiceSpec.model_validate({
        "name": "orders",
        "protocol": "postgres",
        "listen_port": 15432,
        "members": [{"name": m, "address": address, "port": p} for m, p in members.items()],
        "leadership": {"source": "consul",
                       "consul": {"service": consul_name, "wait": wait, "tag": tag}},
    })


class Seen:
    """Observations and anomalies a source reported."""

    def __init__(self) -> None:
        self.items: list[Observation] = []
        self.anomalies: list[tuple[str, str]] = []

    def __call__(self, observation: Observation) -> None:
        self.items.append(observation)

    def anomaly(self, service: str, kind: str) -> None:
        self.anomalies.append((service, kind))

    def last(self, member: str) -> Observation | None:
        return next((o for o in reversed(self.items) if o.member == member), None)

    def status(self, member: str) -> MemberStatus | None:
        last = self.last(member)
        return last.status if last is not None else None

    async def until(self, member: str, status: MemberStatus, what: str = "") -> Observation:
        await eventually(lambda: self.status(member) is status, 10,
                         what or f"{member} {status.value}")
        last = self.last(member)
        assert last is not None
        return last


async def register(
    address: str, service: str, sid: str, port: int, tags: list[str], *,
    token: str | None = None, check: dict[str, Any] | None = None, address_of: str = "127.0.0.1",
) -> None:
    client = consul_client(address, token)
    try:
        await client.agent.service.register(
            service, service_id=sid, address=address_of, port=port, tags=tags,
            check=check if check is not None else {"TTL": "10m", "Status": "passing"},
        )
    finally:
        await client.close()


async def put(address: str, path: str, body: Any = None, token: str | None = None) -> int:
    import aiohttp

    headers = {"X-Consul-Token": token} if token else {}
    async with aiohttp.ClientSession() as session, session.put(
        f"http://{address}{path}", json=body, headers=headers
    ) as response:
        return response.status


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    """started(standin, spec, **kwargs) → (source, seen); everything stopped at the end."""
    made: list[ConsulSource] = []

    async def start(standin: ConsulStandIn, spec: ServiceSpec, **kwargs: Any) -> tuple[ConsulSource, Seen]:
        seen = Seen()
        source = ConsulSource(seen, address=standin.address, on_anomaly=seen.anomaly, **kwargs)
        made.append(source)
        source.set_services([spec])
        await source.start()
        return source, seen

    try:
        yield start
    finally:
        for source in made:
            await source.stop()


@pytest.fixture
async def standins() -> AsyncIterator[Callable[..., Any]]:
    made: list[ConsulStandIn] = []

    async def make(**kwargs: Any) -> ConsulStandIn:
        standin = ConsulStandIn(**kwargs)
        made.append(standin)
        await standin.start()
        return standin

    try:
        yield make
    finally:
        for standin in made:
            await standin.close()


# --- blocking queries ----------------------------------------------------------------------


async def test_after_errors_an_unchanged_consul_is_read_again(standins: Any, started: Any) -> None:
    """Bug: after `unknown_after_errors` the watch kept its index, Consul came back unchanged
    with the same index, and members stayed UNKNOWN. Now the query after an error sends no
    index, and every answer is read."""
    standin = await standins()
    await register(standin.address, "pg", "pg-a", 25001, ["primary"])
    source, seen = await started(standin, spec_for("pg", {"pg-a": 25001}, wait=0.2),
                                 initial_backoff=0.01, max_backoff=0.05, unknown_after_errors=2)
    await seen.until("pg-a", MemberStatus.PRIMARY)
    index_before = standin.service_index("pg")
    await eventually(lambda: source.stats["orders"].index == index_before, 5, "watch on the index")
    standin.fail_next(3)
    await seen.until("pg-a", MemberStatus.UNKNOWN, "UNKNOWN while Consul fails")
    back = await seen.until("pg-a", MemberStatus.PRIMARY, "PRIMARY again, nothing changed")
    assert "passing" in back.detail
    assert standin.service_index("pg") == index_before  # Consul itself did not change
    after_errors = [q for q in standin.health_requests if "index" not in q]
    assert len(after_errors) >= 2  # the first query, and the first one after the errors


async def test_an_index_of_zero_is_a_reset_and_does_not_spin(standins: Any, started: Any) -> None:
    """Consul's docs: an X-Consul-Index of 0 is a bug to guard against; block on 1 next."""
    standin = await standins()
    await register(standin.address, "pg", "pg-a", 25001, ["primary"])
    standin.zero_index_next(1)
    source, seen = await started(standin, spec_for("pg", {"pg-a": 25001}))
    await seen.until("pg-a", MemberStatus.PRIMARY)
    stats = source.stats["orders"]
    await eventually(lambda: stats.resets == 1 and stats.blocking, 5, "reset, then blocking")
    sent = [q.get("index") for q in standin.health_requests]
    assert sent[:2] == [None, "1"], sent  # after the 0, index 1: a query that blocks
    await eventually(lambda: standin.blocked("pg") == 1, 5, "held by the stand-in")
    assert len(standin.health_requests) <= 3  # no busy loop


async def test_wait_jitter_is_within_the_source_timeout(
    standins: Any, started: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consul holds a blocking query up to wait + wait/16; the source's timeout allows it."""
    import consul_standin

    spreads: list[float] = []

    def most(low: float, high: float) -> float:
        spreads.append(high)
        return high  # the largest jitter Consul may add

    monkeypatch.setattr(consul_standin.random, "uniform", most)
    standin = await standins()
    await register(standin.address, "pg", "pg-a", 25001, ["primary"])
    source, seen = await started(standin, spec_for("pg", {"pg-a": 25001}, wait=0.32))
    await seen.until("pg-a", MemberStatus.PRIMARY)
    await eventually(lambda: source.stats["orders"].responses >= 3, 10, "blocking queries elapsing")
    assert source.stats["orders"].errors == 0
    assert pytest.approx(0.02) in spreads  # wait/16


# --- ACLs and the token --------------------------------------------------------------------

ACL = {"mgmt": AclPolicy(), "weak": AclPolicy(services=frozenset(), node_read=False, write=False)}


async def test_acl_filtered_answer_is_unknown_logged_and_counted(
    standins: Any, started: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A token without node:read/service:read gets 200 [] with X-Consul-Results-Filtered-By-ACLs:
    true. Members are UNKNOWN (never DOWN, never fail-closed), logged at ERROR, counted."""
    standin = await standins(acl=ACL)
    await register(standin.address, "pg", "pg-a", 25001, ["primary"], token="mgmt")
    caplog.set_level(logging.ERROR, "repstage_mesh.sources.consul")
    _, seen = await started(standin, spec_for("pg", {"pg-a": 25001}), token="weak")
    hidden = await seen.until("pg-a", MemberStatus.UNKNOWN)
    assert "ACL" in hidden.detail
    assert ("orders", "acl_filtered") in seen.anomalies
    assert any("ACL" in r.getMessage() for r in caplog.records)
    assert all(o.status is not MemberStatus.DOWN for o in seen.items)


async def test_empty_answer_without_token_is_unknown_not_down(standins: Any, started: Any) -> None:
    """Consul tells only an authenticated request that it filtered; an anonymous one just gets
    200 []. An empty answer is UNKNOWN: nothing proves the members are down."""
    standin = await standins(acl=ACL)
    await register(standin.address, "pg", "pg-a", 25001, ["primary"], token="mgmt")
    _, seen = await started(standin, spec_for("pg", {"pg-a": 25001}))
    await seen.until("pg-a", MemberStatus.UNKNOWN)
    assert ("orders", "empty_answer") in seen.anomalies
    # With a non-empty answer, an absent member is DOWN ("not registered").
    open_standin = await standins()
    await register(open_standin.address, "pg", "pg-b", 25002, ["replica"])
    _, seen2 = await started(open_standin, spec_for("pg", {"pg-a": 25001, "pg-b": 25002}))
    gone = await seen2.until("pg-a", MemberStatus.DOWN)
    assert gone.detail == "not registered in Consul"


async def test_configured_token_wins_over_the_environment(
    standins: Any, started: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """py-consul lets CONSUL_HTTP_TOKEN override its `token` argument; ours wins, and the
    environment is used only when the config has no token."""
    standin = await standins(acl=ACL)
    await register(standin.address, "pg", "pg-a", 25001, ["primary"], token="mgmt")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "weak")
    _, seen = await started(standin, spec_for("pg", {"pg-a": 25001}), token="mgmt")
    await seen.until("pg-a", MemberStatus.PRIMARY, "seen with the configured token")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "mgmt")
    _, from_env = await started(standin, spec_for("pg", {"pg-a": 25001}))
    await from_env.until("pg-a", MemberStatus.PRIMARY, "seen with the environment's token")


# --- node checks, no checks, two instances ---------------------------------------------------


async def test_node_checks_decide_per_member(standins: Any, started: Any) -> None:
    """Health answers carry node-level checks: serfHealth critical or `_node_maintenance` ⇒
    DOWN; a custom node check at warning ⇒ still healthy, flagged; `_service_maintenance` ⇒ DOWN."""
    standin = await standins(nodes={"n1": "127.0.0.1", "n2": "127.0.0.2", "n3": "127.0.0.3"})
    for node, member, tags in (("n1", "pg-a", ["primary"]), ("n2", "pg-b", ["replica"]),
                               ("n3", "pg-c", ["replica"])):
        await register(standin.agent_address(node), "pg", member, MEMBERS[member], tags)
    _, seen = await started(standin, spec_for("pg", MEMBERS))
    await seen.until("pg-c", MemberStatus.REPLICA)
    standin.set_serf("n2", "critical")
    down = await seen.until("pg-b", MemberStatus.DOWN)
    assert "serfHealth" in down.detail
    assert await put(standin.agent_address("n3"), "/v1/agent/maintenance?enable=true&reason=patch") == 200
    maintenance = await seen.until("pg-c", MemberStatus.DOWN)
    assert "_node_maintenance" in maintenance.detail
    assert await put(standin.agent_address("n1"), "/v1/agent/check/register",
                     {"Name": "disk", "CheckID": "disk", "TTL": "10m", "Status": "warning"}) == 200
    await eventually(lambda: ("orders", "warning") in seen.anomalies, 5, "the warning flagged")
    assert seen.status("pg-a") is MemberStatus.PRIMARY
    assert await put(standin.agent_address("n1"), "/v1/agent/service/maintenance/pg-a?enable=true") == 200
    drained = await seen.until("pg-a", MemberStatus.DOWN)
    assert "_service_maintenance:pg-a" in drained.detail


async def test_instance_without_checks_is_judged_on_tags_and_flagged(
    standins: Any, started: Any
) -> None:
    """Consul counts an instance with no checks as passing (`?passing` returns it); so do we,
    and we say that only its tags and node vouch for it."""
    standin = await standins()
    await register(standin.address, "pg", "pg-a", 25001, ["primary"], check={})
    _, seen = await started(standin, spec_for("pg", {"pg-a": 25001}))
    primary = await seen.until("pg-a", MemberStatus.PRIMARY)
    assert "no service check" in primary.detail
    assert ("orders", "no_checks") in seen.anomalies


async def test_two_instances_for_one_member_is_unknown(
    standins: Any, started: Any, caplog: pytest.LogCaptureFixture
) -> None:
    standin = await standins(nodes={"n1": "127.0.0.1", "n2": "127.0.0.2"})
    await register(standin.agent_address("n1"), "pg", "pg-a", 25001, ["primary"])
    await register(standin.agent_address("n2"), "pg", "old-pg-a", 25001, ["replica"])
    caplog.set_level(logging.ERROR, "repstage_mesh.sources.consul")
    _, seen = await started(standin, spec_for("pg", {"pg-a": 25001}))
    guess = await seen.until("pg-a", MemberStatus.UNKNOWN)
    assert "refusing to guess" in guess.detail
    assert any("refusing to guess" in r.getMessage() for r in caplog.records)


# --- checks over time: TTL, re-registration, reaper ------------------------------------------


async def test_ttl_check_expires_to_critical(standins: Any, started: Any) -> None:
    standin = await standins()
    await register(standin.address, "pg", "pg-a", 25001, ["primary"],
                   check={"CheckID": "alive", "TTL": "300ms", "Status": "passing"})
    _, seen = await started(standin, spec_for("pg", {"pg-a": 25001}))
    await seen.until("pg-a", MemberStatus.PRIMARY)
    expired = await seen.until("pg-a", MemberStatus.DOWN, "the TTL expired")
    assert "TTL expired" in expired.detail


async def test_reregistration_keeps_check_status_and_unmentioned_checks(standins: Any) -> None:
    """Consul keeps a re-registered check's status (an explicit Status is ignored) and the
    checks the new registration leaves out."""
    standin = await standins()
    checks = [{"CheckID": "a", "TTL": "10m", "Status": "passing"},
              {"CheckID": "b", "TTL": "10m", "Status": "passing"}]
    body = {"ID": "pg-a", "Name": "pg", "Port": 25001, "Checks": checks}
    assert await put(standin.address, "/v1/agent/service/register", body) == 200
    standin.set_check("a", "critical", "down")
    again = {**body, "Checks": [{"CheckID": "a", "TTL": "10m", "Status": "passing"}]}
    assert await put(standin.address, "/v1/agent/service/register", again) == 200
    assert standin.checks[("standin", "a")].data["Status"] == "critical"
    assert ("standin", "b") in standin.checks
    assert await put(standin.address, "/v1/agent/service/register?replace-existing-checks", again) == 200
    assert ("standin", "b") not in standin.checks


async def healthz_server(host: str = "0.0.0.0") -> tuple[web.AppRunner, int, dict[str, int]]:
    state = {"code": 200}

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(status=state["code"])

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    return runner, runner.addresses[0][1], state


async def test_wildcard_bind_registers_an_address_the_agent_can_check(standins: Any) -> None:
    """Bug: a wildcard API bind registered no address and a check on 127.0.0.1, which a remote
    agent runs against its own loopback: always critical. Now the agent's node address (or
    consul.register_address) is registered and checked."""
    standin = await standins(nodes={"far": "127.0.0.2"}, remote=frozenset({"far"}))
    runner, port, _ = await healthz_server()
    registration = ConsulRegistration(address=standin.address, check_interval=0.05)
    try:
        service_id = await registration.register_self("cp-1", f"0.0.0.0:{port}")
        assert registration.registered_address == ("127.0.0.2", port)
        check = standin.checks[("far", f"service:{service_id}")]
        assert check.data["Definition"]["HTTP"] == f"http://127.0.0.2:{port}/healthz"
        await eventually(lambda: check.data["Status"] == "passing", 10, "the check passing")
        # What the old registration got from this agent: its own loopback, refused.
        assert await put(standin.address, "/v1/agent/check/register", {
            "CheckID": "loopback", "ServiceID": service_id, "Interval": "50ms",
            "HTTP": f"http://127.0.0.1:{port}/healthz"}) == 200
        assert await standin.run_check("loopback") == "critical"
    finally:
        await registration.stop()
        await runner.cleanup()


async def test_reaped_registration_is_registered_again(standins: Any) -> None:
    """Consul's reaper removes a service critical for DeregisterCriticalServiceAfter; the node
    notices it is gone and registers again (anti-entropy)."""
    standin = await standins(reap_interval=0.05, min_deregister_after=0.2)
    runner, port, state = await healthz_server("127.0.0.1")
    restored: list[int] = []
    registration = ConsulRegistration(
        address=standin.address, register_address=f"127.0.0.1:{port}", check_interval=0.05,
        deregister_after=0.2, resync_interval=0.1, on_restore=lambda: restored.append(1),
    )
    try:
        service_id = await registration.register_self("cp-1", f"0.0.0.0:{port}")
        state["code"] = 503  # /healthz fails: critical, then reaped
        await eventually(lambda: ("standin", service_id) in standin.reaped, 10, "reaped")
        state["code"] = 200
        await eventually(lambda: registration.restored >= 1, 10, "registered again")
        assert restored
        await eventually(
            lambda: standin.checks.get(("standin", f"service:{service_id}")) is not None
            and standin.checks[("standin", f"service:{service_id}")].data["Status"] == "passing",
            10, "passing again",
        )
    finally:
        await registration.stop()
        await runner.cleanup()


# --- Patroni ------------------------------------------------------------------------------------


class Patroni:
    """Patroni's Consul registration (patroni/dcs/consul.py `_update_service`): ID `scope/name`,
    address from connect_address (a DNS name here), tags [role] (+ `master` on the primary),
    an HTTP check on its REST API at /<role>, registered again on every role change."""

    def __init__(self, standin: ConsulStandIn, name: str, node: str) -> None:
        self.standin, self.name, self.node = standin, name, node
        self.role = "replica"
        self.runner: web.AppRunner | None = None
        self.api = ""

    async def start(self) -> None:
        async def role(request: web.Request) -> web.Response:
            wanted = request.match_info["role"]
            return web.Response(status=200 if wanted == self.role else 503, text=self.role)

        app = web.Application()
        app.router.add_get("/{role}", role)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.api = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def register(self, role: str, tags_v2: bool = False) -> None:
        from consul import Check

        self.role = role
        tags = ["master"] if tags_v2 and role == "primary" else [role] + (["master"] if role == "primary" else [])
        client = consul_client(self.standin.agent_address(self.node))
        try:
            await client.agent.service.register(
                "batman", service_id=f"batman/{self.name}", address=f"{self.name}.db.example",
                port=5432, tags=tags, enable_tag_override=True,
                check=Check.http(f"{self.api}/{role}", "5s", deregister="150s"),
            )
        finally:
            await client.close()

    async def check(self) -> str:
        return str(await self.standin.run_check(f"service:batman/{self.name}", self.node))


async def test_patroni_registration_and_role_change_with_a_kept_status(
    standins: Any, started: Any
) -> None:
    """Patroni's new primary registers again with tags primary+master and a /primary check; Consul
    keeps the status its /replica check last had (critical: /replica answers 503 once promoted).
    That status was measured on another URL: it is ignored until the check runs on /primary."""
    standin = await standins(nodes={"n0": "127.0.0.1", "n1": "127.0.0.2", "n2": "127.0.0.3"},
                             run_checks=False)
    patronis = {f"pg-{i}": Patroni(standin, f"pg-{i}", f"n{i}") for i in range(3)}
    spec = ServiceSpec.model_validate({
        "name": "orders", "protocol": "postgres", "listen_port": 15432,
        "members": [{"name": n, "address": f"10.1.0.1{i}", "port": 5432}
                    for i, n in enumerate(patronis)],
        "leadership": {"source": "consul", "consul": {"service": "batman"}},
    })
    try:
        for name, p in patronis.items():
            await p.start()
            await p.register("primary" if name == "pg-0" else "replica")
            assert await p.check() == "passing"
        _, seen = await started(standin, spec)
        await seen.until("pg-0", MemberStatus.PRIMARY)  # matched by ID scope/name, not address
        await seen.until("pg-1", MemberStatus.REPLICA)

        old, new = patronis["pg-0"], patronis["pg-1"]
        old.role = "stopped"
        assert await old.check() == "critical"
        await seen.until("pg-0", MemberStatus.DOWN)
        new.role = "primary"  # promoted: its /replica check now fails...
        assert await new.check() == "critical"
        await seen.until("pg-1", MemberStatus.DOWN)
        await new.register("primary")  # ...and Consul keeps that status across the new registration
        assert standin.checks[("n1", "service:batman/pg-1")].data["Status"] == "critical"
        primary = await seen.until("pg-1", MemberStatus.PRIMARY, "the new primary, stale check ignored")
        assert "ignored until run on its new URL" in primary.detail
        assert ("orders", "stale_check") in seen.anomalies
        assert await new.check() == "passing"  # the /primary check ran: no longer stale
        await old.register("replica")  # the old primary rejoins as a replica; kept: critical
        await seen.until("pg-0", MemberStatus.REPLICA)
    finally:
        for p in patronis.values():
            if p.runner is not None:
                await p.runner.cleanup()


async def test_patroni_2_master_tag_and_a_superseded_primary(standins: Any, started: Any) -> None:
    """Patroni 2.x tags its primary `master` only; with the default tag it counts. Two instances
    passing and tagged primary: the newest registration wins, the older one is DOWN."""
    standin = await standins(nodes={"n0": "127.0.0.1", "n1": "127.0.0.2"}, run_checks=False)
    a, b = Patroni(standin, "pg-0", "n0"), Patroni(standin, "pg-1", "n1")
    spec = spec_for("batman", {"pg-0": 5432, "pg-1": 5433}, address="10.9.9.9")
    try:
        for p in (a, b):
            await p.start()
        await a.register("primary", tags_v2=True)
        await b.register("replica")
        for p in (a, b):
            assert await p.check() == "passing"
        _, seen = await started(standin, spec)
        await seen.until("pg-0", MemberStatus.PRIMARY)
        b.role = "primary"
        await b.register("primary", tags_v2=True)  # a has not noticed yet: still tagged, passing
        await seen.until("pg-1", MemberStatus.PRIMARY)
        superseded = await seen.until("pg-0", MemberStatus.DOWN)
        assert "superseded" in superseded.detail
    finally:
        for p in (a, b):
            if p.runner is not None:
                await p.runner.cleanup()


async def test_registration_is_made_once_consul_is_up() -> None:
    """Consul down when the node starts: the first registration fails, the resync makes it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    registration = ConsulRegistration(
        address=f"127.0.0.1:{port}", resync_interval=0.05, request_timeout=2
    )
    standin = ConsulStandIn(run_checks=False)
    try:
        with pytest.raises(Exception):  # noqa: B017 (whatever py-consul raises on a refusal)
            await registration.register_self("cp-1", "127.0.0.1:9")
        await standin.start(port=port)
        await eventually(lambda: ("standin", "repstage-mesh-cp-1") in standin.services, 10,
                         "registered by the resync")
    finally:
        await registration.stop()
        await standin.close()


async def test_a_churning_answer_is_paced_not_a_busy_loop(standins: Any, started: Any) -> None:
    """Consul's docs: rate-limit the blocking loop so that a result changing very fast degrades
    into polling. Burst, then at most `max_query_rate` queries per second."""
    import time

    standin = await standins()
    await register(standin.address, "pg", "pg-a", 25001, ["primary"],
                   check={"CheckID": "flap", "TTL": "10m", "Status": "passing"})
    source, seen = await started(standin, spec_for("pg", {"pg-a": 25001}),
                                 max_query_rate=20.0, query_burst=2)
    await seen.until("pg-a", MemberStatus.PRIMARY)
    before, started_at = len(standin.health_requests), time.monotonic()
    for n in range(300):  # the check output changes every millisecond: every query returns at once
        standin.set_check("flap", "passing", f"run {n}")
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - started_at
    sent = len(standin.health_requests) - before
    assert ("orders", "rate_limited") in seen.anomalies
    assert source.stats["orders"].rate_limited
    assert sent <= 2 + 20.0 * elapsed + 2, (sent, elapsed)


def test_consul_anomalies_and_reregistrations_are_exposed_as_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from repstage_mesh.telemetry.metrics import MeshMetrics

    registry = CollectorRegistry()
    metrics = MeshMetrics(registry, "cp-1")
    metrics.observe_consul_anomaly("orders", "acl_filtered")
    metrics.consul_reregistrations.inc()
    text = generate_latest(registry).decode()
    assert 'repstage_consul_anomalies_total{kind="acl_filtered",service="orders"} 1.0' in text
    assert "repstage_consul_reregistrations_total 1.0" in text


async def test_registration_with_a_write_only_token_is_kept_without_reading_it(
    standins: Any,
) -> None:
    """A token that may register but not read its service gets 403 on the resync's look: the
    registration is sent again (Consul keeps its check's status), never counted as restored."""
    writer = AclPolicy(services=frozenset(), node_read=True, write=True)
    standin = await standins(acl={"writer": writer}, run_checks=False)
    registration = ConsulRegistration(
        address=standin.address, token="writer", resync_interval=0.05, request_timeout=2
    )
    try:
        service_id = await registration.register_self("cp-1", "127.0.0.1:9")
        first = standin.services[("standin", service_id)]["ModifyIndex"]
        await eventually(
            lambda: standin.services[("standin", service_id)]["ModifyIndex"] > first, 10,
            "registered again by the resync",
        )
        assert registration.restored == 0
    finally:
        await registration.stop()
