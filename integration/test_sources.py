"""Leadership probes against real Redis 7 and PostgreSQL 15, and tiny HTTP/TCP servers.

Defaults throughout (interval 0.1 s, timeout 0.25 s, fall 3, rise 2). Detection times are printed
(`pytest -s`) for the record; the assertions are on what is observed, not on speed, except for
generous deadlines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from repstage_mesh.core.models import ServiceSpec
from repstage_mesh.core.observations import MemberStatus, Observation, ProbeOutcome
from repstage_mesh.sources.probes import ProbeRunner

from .databases import (
    PostgresPair,
    RedisGroup,
    postgres_pair_fixture,
    redis_group_fixture,
)

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

__all__ = ["postgres_pair_fixture", "redis_group_fixture"]  # pytest finds the fixtures here


class Collector:
    """The runner's callback: keeps every Observation, lets a test wait for one."""

    def __init__(self) -> None:
        self.items: list[Observation] = []

    def __call__(self, observation: Observation) -> None:
        self.items.append(observation)

    async def wait_for(
        self, predicate: Callable[[Observation], bool], timeout: float, what: str
    ) -> Observation:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for obs in self.items[seen:]:
                if predicate(obs):
                    return obs
            seen = len(self.items)
            if time.monotonic() > deadline:
                raise AssertionError(f"no observation {what} within {timeout} s; got {self.items}")
            await asyncio.sleep(0.005)

    def last(self, member: str) -> Observation | None:
        return next((o for o in reversed(self.items) if o.member == member), None)


def spec(name: str, protocol: str, members: dict[str, int], **probe: Any) -> ServiceSpec:
    return ServiceSpec.model_validate(
        {
            "name": name,
            "protocol": protocol,
            "listen_port": 15999,
            "members": [{"name": m, "address": "127.0.0.1", "port": p} for m, p in members.items()],
            "leadership": {"source": "probe", "probe": probe},
        }
    )


async def settled(
    collector: Collector, expected: dict[str, MemberStatus], timeout: float = 5
) -> None:
    for member, status in expected.items():

        def match(o: Observation, m: str = member, s: MemberStatus = status) -> bool:
            return o.member == m and o.status is s

        await collector.wait_for(match, timeout, f"{member} {status}")


# --- Redis ------------------------------------------------------------------------------------


async def test_redis_roles_offsets_and_kill(redis_group_fixture: RedisGroup) -> None:
    redis = redis_group_fixture
    collector = Collector()
    runner = ProbeRunner(collector, offset_refresh=0.2)
    runner.set_services([spec("orders", "redis", {n: redis.port(n) for n in redis.names})])
    await runner.start()
    try:
        await settled(
            collector,
            {"r0": MemberStatus.PRIMARY, "r1": MemberStatus.REPLICA, "r2": MemberStatus.REPLICA},
        )
        r1 = collector.last("r1")
        assert r1 is not None and r1.upstream == redis.address("r0") and r1.source == "probe:redis"
        assert r1.offset is not None and "link connected" in r1.detail

        # Writes move the primary's offset; the replicas' offsets follow (periodic refresh).
        await asyncio.to_thread(
            lambda: [redis.command("r0", "SET", f"k{i}", "v" * 100) for i in range(50)]
        )
        primary_offset = int(redis.role("r0")[1])
        assert primary_offset > 0
        for name in ("r0", "r1", "r2"):

            def caught_up(o: Observation, n: str = name) -> bool:
                return o.member == n and (o.offset or 0) >= primary_offset

            await collector.wait_for(caught_up, 5, f"{name} offset >= {primary_offset}")
        latest = runner.latest("orders", "r1")
        assert (
            latest is not None
            and latest.status is MemberStatus.REPLICA
            and (latest.offset or 0) >= primary_offset
        )

        # kill -9: refused at once (confirmed on a fresh connection), DOWN after `refused_fall`
        # (2) refused probes, the second one `retry_interval` after the first.
        killed_at = time.monotonic()
        await asyncio.to_thread(redis.kill, "r0")
        down = await collector.wait_for(
            lambda o: o.member == "r0" and o.status is MemberStatus.DOWN, 5, "r0 down"
        )
        print(
            f"\nredis kill -9 → DOWN observed after {(down.at - killed_at) * 1000:.0f} ms: {down.detail}"
        )
        assert down.detail.startswith("refused")
        assert down.cause is ProbeOutcome.REFUSED
        assert "2 consecutive refused connections" in down.detail
        # Other members are untouched (a replica whose primary died is still a replica).
        assert all(o.status is not MemberStatus.DOWN for o in collector.items if o.member != "r0")
    finally:
        await runner.stop()


async def test_redis_sigstop_is_down_by_timeouts_and_recovers(
    redis_group_fixture: RedisGroup,
) -> None:
    redis = redis_group_fixture
    collector = Collector()
    runner = ProbeRunner(collector)
    runner.set_services([spec("orders", "redis", {n: redis.port(n) for n in redis.names})])
    await runner.start()
    try:
        await settled(collector, {"r0": MemberStatus.PRIMARY, "r1": MemberStatus.REPLICA})
        stopped_at = time.monotonic()
        redis.stop("r0")
        down = await collector.wait_for(
            lambda o: o.member == "r0" and o.status is MemberStatus.DOWN, 5, "r0 down"
        )
        print(
            f"\nredis SIGSTOP → DOWN observed after {(down.at - stopped_at) * 1000:.0f} ms: {down.detail}"
        )
        assert down.detail.startswith("timeout")
        assert "timeout, timeout, timeout" in down.detail
        resumed_at = time.monotonic()
        redis.cont("r0")
        up = await collector.wait_for(
            lambda o: o.member == "r0" and o.at > resumed_at, 5, "r0 back"
        )
        assert up.status is MemberStatus.PRIMARY
        print(f"redis SIGCONT → PRIMARY again after {(up.at - resumed_at) * 1000:.0f} ms")
    finally:
        await runner.stop()


async def test_redis_promotion_is_seen(redis_group_fixture: RedisGroup) -> None:
    redis = redis_group_fixture
    collector = Collector()
    runner = ProbeRunner(collector)
    runner.set_services([spec("orders", "redis", {n: redis.port(n) for n in redis.names})])
    await runner.start()
    try:
        await settled(collector, {"r1": MemberStatus.REPLICA})
        await asyncio.to_thread(redis.command, "r1", "REPLICAOF", "NO", "ONE")
        promoted = await collector.wait_for(
            lambda o: o.member == "r1" and o.status is MemberStatus.PRIMARY, 5, "r1 primary"
        )
        assert promoted.upstream is None
        # r2 re-pointed to r1: its upstream changes while it stays a replica.
        await asyncio.to_thread(
            redis.command, "r2", "REPLICAOF", "127.0.0.1", str(redis.port("r1"))
        )
        await collector.wait_for(
            lambda o: (
                o.member == "r2"
                and o.status is MemberStatus.REPLICA
                and o.upstream == redis.address("r1")
            ),
            5,
            "r2 following r1",
        )
    finally:
        await runner.stop()


# --- PostgreSQL -------------------------------------------------------------------------------


async def test_postgres_roles_lsns_kill_and_stop(postgres_pair_fixture: PostgresPair) -> None:
    pg = postgres_pair_fixture
    collector = Collector()
    runner = ProbeRunner(collector, offset_refresh=0.2)
    runner.set_services(
        [spec("billing", "postgres", {"pg0": pg.port("pg0"), "pg1": pg.port("pg1")})]
    )
    await runner.start()
    try:
        await settled(collector, {"pg0": MemberStatus.PRIMARY, "pg1": MemberStatus.REPLICA})
        standby = collector.last("pg1")
        assert (
            standby is not None
            and standby.upstream == pg.address("pg0")
            and standby.source == "probe:postgres"
        )

        def write() -> int:
            pg.query("pg0", "CREATE TABLE IF NOT EXISTS t (x int)")
            pg.query("pg0", "INSERT INTO t SELECT generate_series(1, 1000)")
            lsn = pg.query("pg0", "SELECT pg_current_wal_lsn()::text")[0][0]
            high, low = lsn.split("/")
            return (int(high, 16) << 32) + int(low, 16)

        lsn = await asyncio.to_thread(write)
        await collector.wait_for(
            lambda o: o.member == "pg0" and (o.offset or 0) >= lsn, 5, "primary LSN"
        )
        await collector.wait_for(
            lambda o: o.member == "pg1" and (o.offset or 0) >= lsn, 5, "standby replayed LSN"
        )

        stopped_at = time.monotonic()
        pg.stop("pg1")
        down = await collector.wait_for(
            lambda o: o.member == "pg1" and o.status is MemberStatus.DOWN, 5, "pg1 down"
        )
        print(
            f"\npostgres SIGSTOP → DOWN after {(down.at - stopped_at) * 1000:.0f} ms: {down.detail}"
        )
        assert down.detail.startswith("timeout")
        pg.cont("pg1")
        await collector.wait_for(
            lambda o: o.member == "pg1" and o.status is MemberStatus.REPLICA and o.at > down.at,
            10,
            "pg1 back",
        )

        killed_at = time.monotonic()
        await asyncio.to_thread(pg.kill, "pg0")
        down = await collector.wait_for(
            lambda o: o.member == "pg0" and o.status is MemberStatus.DOWN, 5, "pg0 down"
        )
        print(f"postgres kill -9 → DOWN after {(down.at - killed_at) * 1000:.0f} ms: {down.detail}")
        assert down.detail.startswith("refused")
    finally:
        await runner.stop()


# --- HTTP and TCP -----------------------------------------------------------------------------


async def test_http_probe_status_means_role() -> None:
    state = {"primary": True}

    async def primary(_: web.Request) -> web.Response:
        return web.Response(status=200 if state["primary"] else 503)

    app = web.Application()
    app.router.add_get("/primary", primary)
    runner_web = web.AppRunner(app)
    await runner_web.setup()
    site = web.TCPSite(runner_web, "127.0.0.1", 0)
    await site.start()
    port = runner_web.addresses[0][1]
    collector = Collector()
    runner = ProbeRunner(collector)
    runner.set_services([spec("api", "http", {"h0": port}, kind="http", path="/primary")])
    await runner.start()
    try:
        first = await collector.wait_for(lambda o: o.member == "h0", 5, "h0")
        assert (first.status, first.detail, first.source) == (
            MemberStatus.PRIMARY,
            "HTTP 200",
            "probe:http",
        )
        state["primary"] = False
        demoted = await collector.wait_for(
            lambda o: o.status is MemberStatus.REPLICA, 5, "h0 replica"
        )
        assert demoted.detail == "HTTP 503"
        await runner_web.cleanup()
        down = await collector.wait_for(lambda o: o.status is MemberStatus.DOWN, 5, "h0 down")
        assert down.detail.startswith("refused")
    finally:
        await runner.stop()
        await runner_web.cleanup()


async def test_tcp_probe_up_and_refused() -> None:
    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    collector = Collector()
    runner = ProbeRunner(collector)
    runner.set_services([spec("plain", "tcp", {"t0": port})])
    await runner.start()
    try:
        up = await collector.wait_for(lambda o: o.member == "t0", 5, "t0")
        assert (up.status, up.detail, up.source) == (MemberStatus.UNKNOWN, "up", "probe:tcp")
        server.close()
        await server.wait_closed()
        down = await collector.wait_for(lambda o: o.status is MemberStatus.DOWN, 5, "t0 down")
        assert down.detail.startswith("refused")
    finally:
        await runner.stop()
        server.close()


async def test_a_redis_probe_cancelled_at_any_moment_stops(redis_group_fixture: RedisGroup) -> None:
    """Cancelling a probing task must end it, wherever the cancellation lands (a dropped
    cancellation once left `repstage-mesh demo` hanging at exit: redis-py wrote through
    asyncio.wait_for, which in Python 3.11 can swallow one)."""
    from repstage_mesh.sources.probers import RedisProber

    port = redis_group_fixture.port(redis_group_fixture.names[0])

    async def probe_forever(prober: RedisProber) -> None:
        while True:
            await prober.probe()
            await asyncio.sleep(0)

    for attempt in range(200):
        prober = RedisProber("127.0.0.1", port, 0.25)
        task = asyncio.create_task(probe_forever(prober))
        for _ in range(attempt % 13):  # land the cancellation at a different point each time
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2.0)
        await prober.close()
        assert done and task.cancelled(), f"attempt {attempt}: the probe went on after its cancellation"
