"""Promotion against real Redis 7 and PostgreSQL 15, and the whole decision loop on real Redis:
probes -> decider -> runner -> REPLICAOF, with an in-memory Raft stand-in and proxies that ACK.

Timings are printed (`pytest -s`); assertions are on outcomes, with generous deadlines.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from repstage_mesh.core.models import (
    CommandEnvelope,
    Member,
    MeshState,
    Outcome,
    PutService,
    ServiceSpec,
)
from repstage_mesh.core.observations import Observation
from repstage_mesh.core.state import apply
from repstage_mesh.decide import Decider, FailoverRecord, ProxyAcks
from repstage_mesh.failover.promote import (
    DatabasePromoter,
    postgres_promote,
    redis_promote,
    repoint_old_primary,
)
from repstage_mesh.failover.runner import FailoverRunner
from repstage_mesh.sources.probes import ProbeRunner

from .databases import (
    HOST,
    PostgresPair,
    RedisGroup,
    free_port,
    postgres_pair_fixture,
    redis_group_fixture,
    wait_until,
)

__all__ = ["postgres_pair_fixture", "redis_group_fixture"]  # pytest finds the fixtures here


def members(group: RedisGroup | PostgresPair) -> dict[str, Member]:
    return {n: Member(name=n, address=HOST, port=group.port(n)) for n in group.names}


def redis_spec(group: RedisGroup, mode: str = "orchestrate") -> ServiceSpec:
    return ServiceSpec.model_validate({
        "name": "cache", "protocol": "redis", "listen_port": 16379, "primary": "r0",
        "members": [{"name": n, "address": HOST, "port": group.port(n)} for n in group.names],
        "leadership": {"source": "probe", "mode": mode, "ack_deadline": 0.5,
                       "min_failover_interval": 2.0},
    })


async def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


# --- the promotion functions ----------------------------------------------------------------------


async def test_redis_promote_repoints_replicas_and_the_old_primary_when_it_returns(
    redis_group_fixture: RedisGroup,
) -> None:
    group = redis_group_fixture
    m = members(group)
    group.command("r0", "SET", "before", "1")
    group.wait_in_sync("r0", ["r1", "r2"])
    group.kill("r0")
    started = time.monotonic()
    result = await redis_promote(m["r1"], [m["r0"], m["r2"]], timeout=2.0)
    print(f"\nredis promote: {1000 * (time.monotonic() - started):.1f} ms: {result}")
    assert result.ok, result.detail
    assert result.repointed == ("r2",) and result.failed == ("r0",)
    assert group.role("r1")[0] == "master"
    group.command("r1", "SET", "after", "2")
    group.wait_in_sync("r1", ["r2"])
    assert group.command("r2", "GET", "before") == "1"

    group.start("r0")  # comes back as an (empty) master: the isolated old primary
    assert group.role("r0")[0] == "master"
    back = await repoint_old_primary(m["r0"], m["r1"], timeout=2.0)
    assert back.ok, back.detail
    group.wait_in_sync("r1", ["r0", "r2"])
    assert group.command("r0", "GET", "after") == "2"


async def test_redis_promote_of_an_unreachable_member_fails_within_its_timeout(
    redis_group_fixture: RedisGroup,
) -> None:
    group = redis_group_fixture
    m = members(group)
    group.stop("r1")  # silent: connections hang
    try:
        started = time.monotonic()
        result = await redis_promote(m["r1"], [m["r0"], m["r2"]], timeout=0.5)
        assert time.monotonic() - started < 3.0  # bounded by the timeout (0.5 s)
        assert not result.ok and "r1" in result.detail
        assert group.role("r0")[0] == "master" and group.role("r2")[0] == "slave"
        dead = Member(name="gone", address=HOST, port=free_port())
        result = await redis_promote(dead, [], timeout=0.5)
        assert not result.ok and "gone" in result.detail
    finally:
        group.cont("r1")


async def test_postgres_promote_of_the_standby_and_the_old_primary_needs_rejoin(
    postgres_pair_fixture: PostgresPair,
) -> None:
    pg = postgres_pair_fixture
    pg.query("pg0", "CREATE TABLE t (v int)")
    pg.query("pg0", "INSERT INTO t VALUES (1)")
    wait_until(lambda: pg.query("pg1", "SELECT count(*) FROM t") == [(1,)], 15, "row on standby")
    pg.kill("pg0")
    spec = ServiceSpec.model_validate({
        "name": "db", "protocol": "postgres", "listen_port": 15432, "primary": "pg0",
        "members": [{"name": n, "address": HOST, "port": pg.port(n)} for n in pg.names],
        "leadership": {"source": "probe", "mode": "orchestrate"},
    })
    started = time.monotonic()
    result = await DatabasePromoter().promote(spec, "pg1", "pg0", epoch=7, timeout=10.0)
    print(f"\npg_promote: {1000 * (time.monotonic() - started):.1f} ms: {result}")
    assert result.ok, result.detail
    assert result.needs_rejoin == ("pg0",)
    assert pg.query("pg1", "SELECT pg_is_in_recovery()") == [(False,)]
    pg.query("pg1", "INSERT INTO t VALUES (2)")  # writable
    again = await postgres_promote(members(pg)["pg1"], timeout=5.0)
    assert again.ok and "already primary" in again.detail
    down = await DatabasePromoter().repoint(spec, "pg0", "pg1", timeout=2.0)
    assert not down.ok and down.failed == ("pg0",)  # unreachable: try again when it is back
    pg.start("pg0")  # the old primary comes back as a primary of its own timeline
    rejoin = await DatabasePromoter().repoint(spec, "pg0", "pg1", timeout=2.0)
    assert not rejoin.ok and rejoin.needs_rejoin == ("pg0",) and "re-joined" in rejoin.detail
    assert pg.query("pg0", "SELECT pg_is_in_recovery()") == [(False,)]  # left alone


# --- the whole loop on real Redis -----------------------------------------------------------------


class Loop:
    """Probes -> Decider -> FailoverRunner -> DatabasePromoter, with an in-memory log."""

    def __init__(self, spec: ServiceSpec, offset_refresh: float = 1.0) -> None:
        self.state = MeshState()
        self.decider = Decider("n1", settle=0.2, catchup_timeout=5.0)
        self.done: list[FailoverRecord] = []
        self.runner = FailoverRunner(
            self.decider, self.submit, self.confirm, self.await_proxies, DatabasePromoter(),
            time.monotonic, commit_timeout=1.0, promote_timeout=3.0, on_done=self.done.append,
        )
        self.probes = ProbeRunner(self.observe, offset_refresh=offset_refresh)
        self.observations: list[Observation] = []
        self._apply(PutService(spec=spec))
        self.probes.set_services(self.state.services.values())

    def _apply(self, command: Any) -> Outcome:
        self.state, outcome = apply(self.state, command, self.state.index + 1)
        self.runner.on_state(self.state)
        return outcome

    async def submit(self, envelope: CommandEnvelope, timeout: float) -> Outcome:
        return self._apply(envelope.command)

    async def confirm(self, timeout: float) -> bool:
        return True

    async def await_proxies(self, min_index: int, deadline: float) -> ProxyAcks:
        return ProxyAcks({"envoy-1": time.monotonic()})

    def observe(self, obs: Observation) -> None:
        self.observations.append(obs)
        self.runner.observe(obs)

    @property
    def primary(self) -> str | None:
        svc = self.state.service("cache")
        return svc.primary if svc is not None else None

    async def __aenter__(self) -> Loop:
        await self.probes.start()
        self.runner.start(interval=0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.probes.stop()
        await self.runner.close()


async def test_kill_the_primary_promotes_the_most_advanced_replica_and_repoints_the_old_one(
    redis_group_fixture: RedisGroup,
) -> None:
    group = redis_group_fixture
    async with Loop(redis_spec(group)) as loop:
        await until(lambda: loop.decider.status().get("cache", {}).get("members", {}).get("r2", {})
                    .get("status") == "replica", 5, "first observations")
        group.command("r0", "SET", "k", "v")
        group.wait_in_sync("r0", ["r1", "r2"])

        def settled_replicas() -> bool:  # a kill is now detected within the decider's settle (0.2 s)
            members = loop.decider.status().get("cache", {}).get("members", {})
            return all(members.get(n, {}).get("status") == "replica"
                       and time.monotonic() - (members[n].get("since") or math.inf) > 0.3 for n in ("r1", "r2"))

        await until(settled_replicas, 5, "replicas settled")
        killed = time.monotonic()
        group.kill("r0")
        await until(lambda: loop.done, 10, "a finished failover")
        record = loop.done[0]
        print(f"\nkill -> promoted and committed: {1000 * (time.monotonic() - killed):.0f} ms; "
              f"timeline: {[(e.name, e.elapsed_ms) for e in record.timeline]}")
        assert record.status == "done", record.reason
        assert record.new_primary == "r1"  # equal offsets: member order
        assert loop.primary == "r1" and group.role("r1")[0] == "master"
        wait_until(lambda: group.role("r2")[2] == group.port("r1"), 5, "r2 follows r1")
        assert group.command("r1", "GET", "k") == "v"

        group.start("r0")  # back as a master with an empty dataset
        await until(lambda: any(r.kind == "repoint" and r.status != "running" for r in loop.decider.records()),
                    10, "the old primary repointed")
        wait_until(lambda: group.role("r0")[0] == "slave" and group.role("r0")[1] == HOST
                   and group.role("r0")[2] == group.port("r1"), 10, "r0 follows r1")
        assert loop.primary == "r1"
        assert [r.kind for r in loop.done].count("failover") == 1


async def test_switchover_on_real_redis_waits_for_catch_up_and_reports_the_window(
    redis_group_fixture: RedisGroup,
) -> None:
    group = redis_group_fixture
    async with Loop(redis_spec(group), offset_refresh=0.05) as loop:
        await until(lambda: all(loop.decider.status().get("cache", {}).get("members", {}).get(n, {})
                                .get("status") in ("primary", "replica") for n in group.names),
                    5, "first observations")
        for i in range(50):
            group.command("r0", "SET", f"k{i}", str(i))
        record = await loop.runner.switchover("cache", "r2", timeout=5.0)
        print(f"\nswitchover: write-unavailable window {record.write_unavailable_ms} ms, "
              f"total {record.duration_ms} ms")
        assert record.status == "done", record.reason
        assert loop.primary == "r2" and group.role("r2")[0] == "master"
        wait_until(lambda: group.role("r0")[0] == "slave" and group.role("r0")[2] == group.port("r2"),
                   5, "old primary follows r2")
        assert group.command("r2", "GET", "k49") == "49"
        names = [e.name for e in record.timeline]
        assert names.index("caught_up") < names.index("fenced") < names.index("promoted")
        assert record.write_unavailable_ms is not None


# --- secrets: the operator's password reaches only the hosts it is meant for (issue 13) ----------


async def test_a_redis_password_from_secrets_reaches_only_its_hosts(
    redis_group_fixture: RedisGroup, monkeypatch: Any,
) -> None:
    """Real Redis with requirepass: the prober and the promoter authenticate with the secret
    the service names; a secret whose `hosts` do not list the member is never sent (NOAUTH)."""
    from repstage_mesh.config import Secrets, SecretSource

    group = redis_group_fixture
    for name in group.names:  # requirepass on every member; replication authenticates too
        group.command(name, "CONFIG", "SET", "masterauth", "cache-secret")
    for name in group.names:
        group.command(name, "CONFIG", "SET", "requirepass", "cache-secret")
    monkeypatch.setenv("CACHE_PASSWORD", "cache-secret")
    monkeypatch.setenv("REPSTAGE_RAFT__PASSWORD", "never-sent-0123456789")
    spec = redis_spec(group)
    spec = spec.model_copy(update={"leadership": spec.leadership.model_copy(update={
        "probe": spec.leadership.probe.model_copy(update={"password_secret": "cache-password"})})})
    allowed = Secrets({"cache-password": SecretSource(env="CACHE_PASSWORD", hosts=(HOST,))})
    elsewhere = Secrets({"cache-password": SecretSource(env="CACHE_PASSWORD", hosts=("10.0.0.5",))})

    offsets = await DatabasePromoter(secrets=allowed).positions(spec, group.names, timeout=2.0)
    assert all(isinstance(v, int) for v in offsets.values()), offsets
    withheld = await DatabasePromoter(secrets=elsewhere).positions(spec, group.names, timeout=2.0)
    assert set(withheld.values()) == {None}, withheld  # no password sent: NOAUTH, unknown
    refused = await DatabasePromoter(secrets=elsewhere).promote(spec, "r1", "r0", epoch=5, timeout=3.0)
    assert not refused.ok and ("NOAUTH" in refused.detail or "uthentication" in refused.detail), refused.detail
    promoted = await DatabasePromoter(secrets=allowed).promote(spec, "r1", "r0", epoch=6, timeout=5.0)
    assert promoted.ok, promoted.detail
