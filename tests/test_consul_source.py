"""The Consul leadership source and the node's registration, against ConsulStandIn and, when
CONSUL_HTTP_ADDR is set, against a real agent (marker consul_agent: `pytest -m consul_agent`).

The shared cases go through Consul's HTTP API only (register members with TTL checks, pass or
fail the checks), so they mean the same against either target. Cases that need to reach inside
(the index going backwards, injected errors) run against the stand-in alone.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from consul_standin import ConsulStandIn, parse_duration

from repstage_mesh.core.models import LeadershipMode, ServiceSpec
from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.sources.consul import ConsulSource, consul_client, parse_consul_address
from repstage_mesh.sources.consul_health import (
    BlockingIndex,
    HealthAnswer,
    QueryPacer,
    read_health,
)
from repstage_mesh.sources.consul_registration import ConsulRegistration

WAIT = 30.0  # the blocking query's wait: every change must arrive well before it


class Collector:
    def __init__(self) -> None:
        self.items: list[Observation] = []

    def __call__(self, observation: Observation) -> None:
        self.items.append(observation)

    async def wait_for(
        self, predicate: Callable[[Observation], bool], timeout: float, what: str
    ) -> Observation:
        deadline = time.monotonic() + timeout
        while True:
            for obs in self.items:
                if predicate(obs):
                    return obs
            if time.monotonic() > deadline:
                raise AssertionError(f"no observation {what} within {timeout} s; got {self.items}")
            await asyncio.sleep(0.005)

    def status(self, member: str) -> MemberStatus | None:
        return next((o.status for o in reversed(self.items) if o.member == member), None)


async def until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class Target:
    """A Consul HTTP API to test against, driven only through that API."""

    kind: str
    address: str
    client: Any
    standin: ConsulStandIn | None
    prefix: str

    async def register_member(
        self, service: str, member: str, port: int, tags: list[str], status: str = "passing"
    ) -> None:
        await self.client.agent.service.register(
            service,
            service_id=f"{self.prefix}{member}",
            address="127.0.0.1",
            port=port,
            tags=tags,
            check={"CheckID": f"service:{self.prefix}{member}", "TTL": "10m", "Status": status},
        )

    async def set_check(self, member: str, status: str) -> None:
        check_id = f"service:{self.prefix}{member}"
        call = {
            "passing": self.client.agent.check.ttl_pass,
            "warning": self.client.agent.check.ttl_warn,
            "critical": self.client.agent.check.ttl_fail,
        }[status]
        await call(check_id)


@pytest.fixture(params=["standin", pytest.param("agent", marks=pytest.mark.consul_agent)])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    standin = None
    if request.param == "standin":
        standin = ConsulStandIn()
        address = await standin.start()
    else:
        address = os.environ.get("CONSUL_HTTP_ADDR", "")
        if not address:
            pytest.skip("CONSUL_HTTP_ADDR is not set")
    client = consul_client(address)
    prefix = f"rst-{uuid.uuid4().hex[:8]}-"
    try:
        yield Target(request.param, address, client, standin, prefix)
    finally:
        services = await client.agent.services()
        for service_id in services:
            if service_id.startswith(prefix):
                await client.agent.service.deregister(service_id)
        await client.close()
        if standin is not None:
            await standin.close()


def service_spec(
    consul_name: str, members: dict[str, int], *, by_id_prefix: str = "", wait: float = WAIT
) -> ServiceSpec:
    return ServiceSpec.model_validate(
        {
            "name": "orders",
            "protocol": "postgres",
            "listen_port": 15432,
            "members": [{"name": m, "address": "127.0.0.1", "port": p} for m, p in members.items()],
            "leadership": {"source": "consul", "consul": {"service": consul_name, "wait": wait}},
        }
    )


MEMBERS = {"pg-a": 25001, "pg-b": 25002, "pg-c": 25003}


async def started_source(target: Target, spec: ServiceSpec, collector: Collector) -> ConsulSource:
    source = ConsulSource(collector, address=target.address)
    source.set_services([spec])
    await source.start()
    return source


# --- shared cases: stand-in and real agent ---------------------------------------------------


async def test_members_map_to_statuses(target: Target) -> None:
    name = f"{target.prefix}pg"
    await target.register_member(name, "pg-a", 25001, ["primary"])
    await target.register_member(name, "pg-b", 25002, ["replica"])
    await target.register_member(name, "pg-c", 25003, ["replica"], status="critical")
    spec = service_spec(name, {**MEMBERS, "pg-d": 25004})
    collector = Collector()
    source = await started_source(target, spec, collector)
    try:
        await until(
            lambda: len({o.member for o in collector.items}) == 4, 10, "four members observed"
        )
        assert collector.status("pg-a") is MemberStatus.PRIMARY
        assert collector.status("pg-b") is MemberStatus.REPLICA
        assert collector.status("pg-c") is MemberStatus.DOWN
        assert collector.status("pg-d") is MemberStatus.DOWN
        by_member = {o.member: o for o in collector.items}
        assert "critical" in by_member["pg-c"].detail
        assert by_member["pg-d"].detail == "not registered in Consul"
        assert all(o.source == "consul" and o.service == "orders" for o in collector.items)
    finally:
        await source.stop()


async def test_health_change_wakes_the_blocking_query(target: Target) -> None:
    name = f"{target.prefix}pg"
    await target.register_member(name, "pg-a", 25001, ["primary"])
    await target.register_member(name, "pg-b", 25002, ["replica"])
    spec = service_spec(name, {"pg-a": 25001, "pg-b": 25002})
    collector = Collector()
    source = await started_source(target, spec, collector)
    try:
        await collector.wait_for(
            lambda o: o.member == "pg-a" and o.status is MemberStatus.PRIMARY, 10, "pg-a primary"
        )
        stats = source.stats["orders"]
        await until(lambda: stats.blocking, 5, "a blocking query outstanding")
        standin = target.standin
        if standin is not None:
            await until(lambda: standin.blocked(name) == 1, 5, "the stand-in holding the query")
        responses_before = stats.responses

        changed_at = time.monotonic()
        await target.set_check("pg-a", "critical")  # Patroni: the old leader fails its check
        await target.register_member(name, "pg-b", 25002, ["primary"])  # and the new one is tagged
        new_primary = await collector.wait_for(
            lambda o: o.member == "pg-b" and o.status is MemberStatus.PRIMARY,
            WAIT / 2,
            "pg-b primary",
        )
        down = await collector.wait_for(
            lambda o: o.member == "pg-a" and o.status is MemberStatus.DOWN, 5, "pg-a down"
        )
        # The blocking query woke on the change: far sooner than its wait, no poll interval involved.
        assert new_primary.at - changed_at < WAIT / 2
        assert down.at - changed_at < WAIT / 2
        assert stats.responses - responses_before <= 3  # woken, not polled
        print(
            f"\nconsul health change → new primary observed after {(new_primary.at - changed_at) * 1000:.1f} ms ({target.kind})"
        )
    finally:
        await source.stop()


async def test_stop_returns_promptly_during_a_blocking_query(target: Target) -> None:
    name = f"{target.prefix}pg"
    await target.register_member(name, "pg-a", 25001, ["primary"])
    collector = Collector()
    source = await started_source(target, service_spec(name, {"pg-a": 25001}, wait=300), collector)
    await collector.wait_for(lambda o: o.member == "pg-a", 10, "pg-a")
    await until(lambda: source.stats["orders"].blocking, 5, "blocking query outstanding")
    started = time.monotonic()
    await asyncio.wait_for(source.stop(), 2.0)
    assert time.monotonic() - started < 2.0


async def test_registration_with_its_healthz_check(target: Target) -> None:
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    node_id = f"{target.prefix}cp-1"
    registration = ConsulRegistration(address=target.address)
    try:
        service_id = await registration.register_self(node_id, f"127.0.0.1:{port}")
        assert service_id == f"repstage-mesh-{node_id}"
        services = await target.client.agent.services()
        assert services[service_id]["Service"] == "repstage-mesh"
        assert services[service_id]["Port"] == port
        assert services[service_id]["Meta"] == {"node_id": node_id}
        checks = {
            c["CheckID"]: c
            for c in (await target.client.agent.checks()).values()
            if c["ServiceID"] == service_id
        }
        assert len(checks) == 1
        (check,) = checks.values()
        assert check["Type"] == "http"
        if "Definition" in check and check["Definition"].get("HTTP"):
            assert check["Definition"]["HTTP"] == f"http://127.0.0.1:{port}/healthz"
            assert parse_duration(str(check["Definition"]["Interval"])) == 1.0

        async def passing() -> bool:
            entries = (await target.client.health.service("repstage-mesh", passing=True))[1]
            return any(e["Service"]["ID"] == service_id for e in entries)

        deadline = time.monotonic() + 10
        while not await passing():  # the agent runs the check against our /healthz
            assert time.monotonic() < deadline, "the /healthz check never passed"
            await asyncio.sleep(0.05)
    finally:
        await registration.stop()
        await runner.cleanup()
    services = await target.client.agent.services()
    assert f"repstage-mesh-{node_id}" not in services


# --- stand-in only: what cannot be provoked on a real agent ----------------------------------


@pytest.fixture
async def standin() -> AsyncIterator[ConsulStandIn]:
    s = ConsulStandIn()
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_index_going_backwards_resets_the_watch(standin: ConsulStandIn) -> None:
    client = consul_client(standin.address)
    try:
        await client.agent.service.register(
            "pg",
            service_id="pg-a",
            address="127.0.0.1",
            port=25001,
            tags=["primary"],
            check={"TTL": "10m", "Status": "passing"},
        )
        await client.agent.service.register(
            "pg",
            service_id="pg-b",
            address="127.0.0.1",
            port=25002,
            tags=["replica"],
            check={"TTL": "10m", "Status": "passing"},
        )
    finally:
        await client.close()
    spec = service_spec("pg", {"pg-a": 25001, "pg-b": 25002})
    collector = Collector()
    source = ConsulSource(collector, address=standin.address)
    source.set_services([spec])
    await source.start()
    try:
        stats = source.stats["orders"]
        await until(lambda: stats.blocking and standin.blocked("pg") == 1, 5, "blocking query")
        high = stats.index
        assert high is not None and high > 3
        standin.rewind_index("pg", 2)  # e.g. a snapshot restore on the servers
        await until(lambda: stats.resets == 1, 5, "the reset")
        await until(
            lambda: stats.blocking and stats.index == 2 and standin.blocked("pg") == 1,
            5,
            "blocking again from index 2",
        )
        # The query after the backwards answer carried no index (it did not block).
        sent = [r.get("index") for r in standin.health_requests]
        rewound_at = sent.index(str(high))
        assert sent[rewound_at + 1] is None, sent
        # A change now wakes it at once; with the stale high index it would sleep through it.
        changed_at = time.monotonic()
        standin.set_check("service:pg-a", "critical")
        down = await collector.wait_for(
            lambda o: o.member == "pg-a" and o.status is MemberStatus.DOWN, WAIT / 2, "pg-a down"
        )
        assert down.at - changed_at < WAIT / 2
    finally:
        await source.stop()


async def test_errors_back_off_report_unknown_and_recover(standin: ConsulStandIn) -> None:
    client = consul_client(standin.address)
    try:
        await client.agent.service.register(
            "pg",
            service_id="pg-a",
            address="127.0.0.1",
            port=25001,
            tags=["primary"],
            check={"TTL": "10m", "Status": "passing"},
        )
    finally:
        await client.close()
    standin.fail_next(4)
    collector = Collector()
    source = ConsulSource(
        collector,
        address=standin.address,
        initial_backoff=0.02,
        max_backoff=0.2,
        unknown_after_errors=3,
    )
    source.set_services([service_spec("pg", {"pg-a": 25001})])
    await source.start()
    try:
        unknown = await collector.wait_for(
            lambda o: o.status is MemberStatus.UNKNOWN, 5, "unknown while Consul fails"
        )
        assert "consul unreachable" in unknown.detail
        primary = await collector.wait_for(
            lambda o: o.status is MemberStatus.PRIMARY, 5, "primary after recovery"
        )
        assert primary.at > unknown.at
        assert source.stats["orders"].errors == 4
        assert [o.status for o in collector.items] == [MemberStatus.UNKNOWN, MemberStatus.PRIMARY]
    finally:
        await source.stop()


async def test_set_services_follows_config(standin: ConsulStandIn) -> None:
    collector = Collector()
    source = ConsulSource(collector, address=standin.address)
    probe_spec = ServiceSpec.model_validate(
        {
            "name": "other",
            "listen_port": 15000,
            "members": [{"name": "x", "address": "127.0.0.1", "port": 1}],
            "leadership": {"source": "probe"},
        }
    )
    source.set_services([probe_spec, service_spec("pg", {"pg-a": 25001})])
    await source.start()
    try:
        assert set(source.stats) == {"orders"}  # only consul-sourced services are watched
        await collector.wait_for(lambda o: o.member == "pg-a", 5, "pg-a")
        source.set_services([probe_spec])
        await until(lambda: not source._tasks, 5, "watch stopped")
    finally:
        await source.stop()


# --- pure parts ------------------------------------------------------------------------------


def entry(
    service_id: str,
    port: int,
    tags: list[str],
    *statuses: str,
    address: str = "",
    node_address: str = "127.0.0.1",
) -> dict[str, Any]:
    checks = [{"CheckID": "serfHealth", "Status": "passing"}] + [
        {"CheckID": f"c{i}", "Status": s, "Output": "out"} for i, s in enumerate(statuses)
    ]
    return {
        "Node": {"Node": "n1", "Address": node_address},
        "Service": {
            "ID": service_id,
            "Service": "pg",
            "Tags": tags,
            "Address": address,
            "Port": port,
        },
        "Checks": checks,
    }


def observe(spec: ServiceSpec, entries: list[dict[str, Any]], tag: str = "primary") -> dict[str, Any]:
    return read_health(spec, HealthAnswer(20, entries), tag, 5.0).observations


def test_health_observations_matching_and_precedence() -> None:
    spec = service_spec("pg", MEMBERS)
    entries = [
        entry("pg-a", 1, ["primary"], "passing"),  # matched by ID although the port differs
        entry(
            "patroni-node-2", 25002, ["primary"], "passing", "critical"
        ),  # by address:port; critical → down
        entry(
            "whatever", 25003, ["replica"], "passing", address="10.9.9.9"
        ),  # service address wins: no match
        entry("stray", 9999, ["primary"], "passing"),  # matches nothing
    ]
    out = observe(spec, entries)
    assert {m: o.status for m, o in out.items()} == {
        "pg-a": MemberStatus.PRIMARY,
        "pg-b": MemberStatus.DOWN,
        "pg-c": MemberStatus.DOWN,
    }
    assert out["pg-b"].detail.startswith("critical: c1")
    assert out["pg-c"].detail == "not registered in Consul"
    assert all(o.at == 5.0 and o.offset is None for o in out.values())
    # Two instances for one member: refuse to guess.
    both = read_health(
        spec,
        HealthAnswer(20, [entry("pg-a", 25001, ["primary"], "passing"), entry("x", 25001, ["replica"], "passing")]),
        "primary",
        0.0,
    )
    assert both.observations["pg-a"].status is MemberStatus.UNKNOWN
    assert [a.kind for a in both.anomalies] == ["ambiguous"]
    # A failing node check (serfHealth) takes the member down.
    dead_node = entry("pg-a", 25001, ["primary"], "passing")
    dead_node["Checks"][0]["Status"] = "critical"
    assert observe(spec, [dead_node])["pg-a"].status is MemberStatus.DOWN


def test_custom_tag() -> None:
    spec = service_spec("pg", {"pg-a": 25001})
    out = observe(spec, [entry("pg-a", 25001, ["leader"], "passing")], "leader")
    assert out["pg-a"].status is MemberStatus.PRIMARY
    # With a custom tag, Patroni 2.x's `master` is not a primary tag.
    out = observe(spec, [entry("pg-a", 25001, ["master"], "passing")], "leader")
    assert out["pg-a"].status is MemberStatus.REPLICA


def test_blocking_index_rules() -> None:
    index = BlockingIndex()
    assert index.value is None
    assert not index.answered(40) and index.value == 40
    assert not index.answered(40) and index.value == 40  # unchanged: not a reset
    assert index.answered(12) and index.value is None  # backwards: start over, no blocking
    assert not index.answered(12) and index.value == 12
    assert index.answered(0) and index.value == 1  # 0: a reset that still blocks (on 1)
    index.failed()
    assert index.value is None and index.resets == 2


def test_query_pacer_bursts_then_paces() -> None:
    pacer = QueryPacer(rate=10.0, burst=2)
    assert [pacer.delay(0.0), pacer.delay(0.0)] == [0.0, 0.0]
    assert pacer.delay(0.0) == pytest.approx(0.1)  # the third at once waits one interval
    assert pacer.delay(5.0) == 0.0  # refilled after a quiet spell
    assert pacer.limited == 1


def _patroni_check(url: str, output: str, status: str = "passing") -> dict[str, Any]:
    return {"CheckID": "service:batman/pg-a", "ServiceID": "batman/pg-a", "Status": status,
            "Output": output, "Definition": {"HTTP": url}}


@pytest.mark.parametrize(
    ("checks", "filtered", "expected", "kinds"),
    [
        # the kept status was measured on /replica: ignored, the tag decides
        ([_patroni_check("http://h:8008/primary", "HTTP GET http://h:8008/replica: 503 Service "
                         "Unavailable Output: ", "critical")], False, MemberStatus.PRIMARY,
         ["stale_check"]),
        ([_patroni_check("http://h:8008/primary", 'Get "http://h:8008/replica": dial tcp: refused',
                         "critical")], False, MemberStatus.PRIMARY, ["stale_check"]),
        # measured on its own URL: it counts
        ([_patroni_check("http://h:8008/primary", "HTTP GET http://h:8008/primary: 503 Service "
                         "Unavailable Output: ", "critical")], False, MemberStatus.DOWN, []),
        ([{"CheckID": "disk", "ServiceID": "", "Status": "warning", "Output": "80%"}], False,
         MemberStatus.PRIMARY, ["no_checks", "warning"]),
        ([{"CheckID": "_node_maintenance", "ServiceID": "", "Status": "critical",
           "Notes": "patching"}], False, MemberStatus.DOWN, []),
        ([], True, MemberStatus.PRIMARY, ["acl_filtered", "no_checks"]),
    ],
)
def test_health_reading_table(
    checks: list[dict[str, Any]], filtered: bool, expected: MemberStatus, kinds: list[str]
) -> None:
    spec = service_spec("batman", {"pg-a": 25001, "pg-b": 25002})
    instance = entry("batman/pg-a", 5432, ["primary", "master"], address="pg-a.db.example")
    instance["Checks"] += checks
    reading = read_health(spec, HealthAnswer(20, [instance], filtered), "primary", 0.0)
    assert reading.observations["pg-a"].status is expected
    assert sorted(a.kind for a in reading.anomalies) == kinds
    # pg-b is absent: DOWN in a full answer, UNKNOWN when ACLs may have hidden it
    absent = reading.observations["pg-b"].status
    assert absent is (MemberStatus.UNKNOWN if filtered else MemberStatus.DOWN)


def test_empty_answer_and_superseded_primary() -> None:
    spec = service_spec("pg", {"pg-a": 25001, "pg-b": 25002})
    empty = read_health(spec, HealthAnswer(20, []), "primary", 0.0)
    assert {o.status for o in empty.observations.values()} == {MemberStatus.UNKNOWN}
    assert [a.kind for a in empty.anomalies] == ["empty_answer"]
    old, new = entry("pg-a", 25001, ["primary"]), entry("pg-b", 25002, ["primary"])
    old["Service"]["ModifyIndex"], new["Service"]["ModifyIndex"] = 30, 31
    out = read_health(spec, HealthAnswer(40, [old, new]), "primary", 0.0).observations
    assert out["pg-b"].status is MemberStatus.PRIMARY
    assert out["pg-a"].status is MemberStatus.DOWN and "superseded" in out["pg-a"].detail
    orchestrated = spec.model_copy(update={"leadership": spec.leadership.model_copy(
        update={"mode": LeadershipMode.ORCHESTRATE})})
    out = read_health(orchestrated, HealthAnswer(40, [old, new]), "primary", 0.0).observations
    assert {o.status for o in out.values()} == {MemberStatus.PRIMARY}  # the decider keeps its own
    new["Service"]["ModifyIndex"] = 30  # no order between them: both claims go to the decider
    out = read_health(spec, HealthAnswer(40, [old, new]), "primary", 0.0).observations
    assert {o.status for o in out.values()} == {MemberStatus.PRIMARY}


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (None, {}),
        ("127.0.0.1:8500", {"host": "127.0.0.1", "port": 8500, "scheme": "http"}),
        (
            "https://consul.example.com",
            {"host": "consul.example.com", "port": 443, "scheme": "https"},
        ),
        ("http://10.0.0.1:18500", {"host": "10.0.0.1", "port": 18500, "scheme": "http"}),
    ],
)
def test_parse_consul_address(address: str | None, expected: dict[str, Any]) -> None:
    assert parse_consul_address(address) == expected


def test_parse_duration() -> None:
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("10") == 10.0
    with pytest.raises(ValueError):
        parse_duration("10 s")
