"""Issue 4 end to end on PostgreSQL 15: a primary (pg0) and a streaming standby (pg1), a real
`repstage-mesh serve` deciding with probes (pg_is_in_recovery()) in orchestrate mode, and a real
Envoy (plain tcp_proxy) carrying a continuous writer. kill -9 of the primary -> pg_promote() on
the standby -> writes resume through Envoy on it; the old primary stays out of routing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from .databases import PostgresPair, postgres_bindir, postgres_pair
from .harness import ControlPlaneNode, Envoy, free_low_port, wait_until, workdir

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

SERVICE = "db"
TABLE_DDL = "CREATE TABLE w (id serial PRIMARY KEY, n integer NOT NULL UNIQUE)"


def mesh_dsn(port: int) -> str:
    # libpq's connect_timeout floor is 2 s; statement_timeout bounds a write on a live server.
    return (
        f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2 "
        "options='-c statement_timeout=1000'"
    )


@dataclass
class Writer:
    """INSERT INTO w (n) through Envoy as fast as it can (autocommit, no hidden retries);
    records (n, id, acknowledged at) for every acknowledged write and counts the failures."""

    port: int
    first: int = 1  # the first n written (n is UNIQUE in the table)
    acked: list[tuple[int, int, float]] = field(default_factory=list)
    failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        n = self.first - 1
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            n += 1
            try:
                if conn is None:
                    conn = psycopg.connect(mesh_dsn(self.port), autocommit=True)
                row = conn.execute("INSERT INTO w (n) VALUES (%s) RETURNING id", (n,)).fetchone()
                assert row is not None
                self.acked.append((n, int(row[0]), time.monotonic()))
            except psycopg.Error:
                self.failed += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.002)  # back off a reconnect loop against a refused port
        if conn is not None:
            conn.close()

    def running_for(self) -> float:
        return time.monotonic() - self.started

    def acked_after(self, at: float) -> int:
        return sum(1 for _, _, t in self.acked if t > at)

    def __enter__(self) -> Writer:
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@dataclass
class PostgresMesh:
    pair: PostgresPair
    cp: ControlPlaneNode
    envoy: Envoy
    port: int

    def primary(self) -> str | None:
        return self.cp.get(f"/v1/services/{SERVICE}")["primary"]

    def values(self, member: str) -> set[int]:
        return {int(r[0]) for r in self.pair.query(member, "SELECT n FROM w")}


@pytest.fixture
def postgres_mesh() -> Iterator[PostgresMesh]:
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL server binaries are not installed (scripts/system-deps.sh)")
    with workdir() as wd, postgres_pair() as pair:
        pair.query("pg0", TABLE_DDL)
        wait_until(
            lambda: pair.query("pg1", "SELECT to_regclass('w') IS NOT NULL")[0][0],
            10,
            what="the table replicated to the standby",
        )
        port = free_low_port()
        members = [{"name": n, "address": "127.0.0.1", "port": pair.port(n)} for n in pair.names]
        cfg: dict[str, Any] = {
            "services": [
                {
                    "name": SERVICE,
                    "protocol": "postgres",
                    "listen_port": port,
                    "members": members,
                    "primary": "pg0",
                    "leadership": {
                        "source": "probe",
                        "mode": "orchestrate",
                        "min_failover_interval": 1.0,
                        "probe": {"user": "postgres", "database": "postgres"},  # trust auth
                    },
                }
            ],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        cp = ControlPlaneNode(wd, cfg)
        envoy = Envoy(wd, "edge-1", [cp.xds_address])
        try:
            cp.start()
            envoy.start()

            def write_through_envoy() -> bool:
                with psycopg.connect(mesh_dsn(port), autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return True

            wait_until(write_through_envoy, 20, what="connections through Envoy reach the primary")
            yield PostgresMesh(pair, cp, envoy, port)
        finally:
            envoy.stop()
            cp.stop()


def test_kill_primary_under_writes_promotes_the_standby(postgres_mesh: PostgresMesh) -> None:
    m = postgres_mesh
    with Writer(m.port) as writer:
        # a second of writes first, so that what async replication loses is a steady-state figure
        wait_until(
            lambda: len(writer.acked) > 200 and writer.running_for() > 1.0,
            15,
            what="the writer is running",
        )
        m.pair.kill("pg0")
        killed_at = time.monotonic()
        wait_until(lambda: m.primary() == "pg1", 20, what="the standby promoted and committed")
        wait_until(
            lambda: writer.acked_after(killed_at) > 100, 15, what="writes resume through Envoy"
        )
    assert m.pair.query("pg1", "SELECT pg_is_in_recovery()")[0][0] is False, "pg1 was not promoted"
    resumed = min(t for _, _, t in writer.acked if t > killed_at)

    records = m.cp.get("/v1/failovers")["failovers"]
    record = next(r for r in records if r["new_primary"] == "pg1" and r["kind"] == "failover")
    assert record["status"] == "done", record
    assert record["old_primary"] == "pg0" and record["mode"] == "orchestrate", record
    names = [e["name"] for e in record["timeline"]]
    for step in ("detected", "decided", "leadership_confirmed", "fenced", "promoted", "committed"):
        assert step in names, (step, names)
    assert (
        names.index("fenced") < names.index("promoted") < names.index("committed")
    )  # break before make
    at = {e["name"]: e["at"] for e in record["timeline"]}
    assert at["fenced"] <= at["promoted"] <= at["committed"], record["timeline"]
    assert record["fence_epoch"] is not None and record["epoch"] > record["fence_epoch"] > 0, record
    assert "pg0" in record["needs_rejoin"], record  # PostgreSQL: never re-joined automatically

    # Every write acknowledged after the new primary was committed is on it. Before that nothing
    # but the dying pg0 can acknowledge (fail closed), so what is missing from then was lost to
    # asynchronous replication (synchronous_commit = off, async standby). The commit time, on the
    # same monotonic clock, is the line rather than the kill: a client thread may record the
    # time of an answer pg0 gave just before it died after `kill()` returned.
    switched = at["committed"]
    on_new = m.values("pg1")
    missing_after = [n for n, _, t in writer.acked if t > switched and n not in on_new]
    lost_before = [n for n, _, t in writer.acked if t <= switched and n not in on_new]
    assert not missing_after, (
        f"{len(missing_after)} writes acknowledged after the new primary was committed are not on pg1"
    )
    replicated = [t for n, _, t in writer.acked if t <= killed_at and n in on_new]
    window = killed_at - max(replicated) if replicated else float("nan")
    print(
        f"\nkill -> first write acknowledged through Envoy {resumed - killed_at:.3f}s; acked "
        f"{len(writer.acked)}, failed {writer.failed}, lost to async replication {len(lost_before)} "
        f"(the last {window * 1000:.0f} ms before the kill)"
    )
    print([(e["name"], e["elapsed_ms"]) for e in record["timeline"]])

    # The old primary comes back still claiming to be primary (a split brain in the database):
    # it stays out of routing, nothing re-points it, and no write through the mesh reaches it.
    m.pair.start("pg0")
    assert m.pair.query("pg0", "SELECT pg_is_in_recovery()")[0][0] is False
    before_restart = m.values("pg0")
    with Writer(m.port, first=writer.acked[-1][0] + 1_000_000) as writer2:
        # a second of writes: the probes see pg0 claiming primary again (rise 2 x 0.1 s, settle)
        wait_until(
            lambda: len(writer2.acked) > 100 and writer2.running_for() > 1.0,
            15,
            what="writes after the old primary returned",
        )
    assert m.primary() == "pg1"
    assert m.values("pg0") == before_restart, "a write through the mesh reached the old primary"
    on_new = m.values("pg1")
    assert all(n in on_new for n, _, _ in writer2.acked), "an acknowledged write is not on pg1"
    service = m.cp.get(f"/v1/services/{SERVICE}")
    assert service["primary"] == "pg1" and service["epoch"] == record["epoch"], service
    repoints = [
        r
        for r in m.cp.get("/v1/failovers")["failovers"]
        if r["kind"] == "repoint" and r["old_primary"] == "pg0"
    ]
    assert not repoints, f"the old PostgreSQL primary was handed to Repoint: {repoints}"
