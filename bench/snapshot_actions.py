"""Snapshot actions on real servers: how long a take lasts, how big it is, and what it does to
a writer on the primary (per-write latency straight to the primary, no mesh), with and without
a snapshot of the replica running. Prints a markdown table; never pass/fail.

    .venv/bin/python bench/snapshot_actions.py --redis-keys 200000 --pg-rows 200000 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.databases import HOST, postgres_bindir, postgres_pair, redis_group
from repstage_mesh.snapshots.actions import SnapshotTarget, build_action


@dataclass
class Settings:
    storage: str
    take_timeout: float = 600.0
    s3_endpoint_url: str | None = None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class LatencyWriter(threading.Thread):
    def __init__(self, write) -> None:
        super().__init__(daemon=True)
        self.write, self.samples, self.stop = write, [], threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            t0 = time.perf_counter()
            self.write(i)
            self.samples.append((time.perf_counter() - t0) * 1000)
            i += 1


def phase(write, seconds: float, take=None) -> tuple[list[float], list[float]]:
    """Writer latencies for `seconds`; with `take`, snapshots run back to back meanwhile."""
    writer = LatencyWriter(write)
    writer.start()
    takes: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if take is None:
            time.sleep(0.05)
            continue
        t0 = time.perf_counter()
        take(len(takes))
        takes.append(time.perf_counter() - t0)
    writer.stop.set()
    writer.join()
    return writer.samples, takes


def row(name: str, base: list[float], during: list[float], takes: list[float], size: int) -> str:
    return (f"| {name} | {len(takes)} | {statistics.median(takes):.2f} s | {size / 1e6:.1f} MB | "
            f"{pct(base, 0.5):.3f} / {pct(base, 0.99):.3f} ms | "
            f"{pct(during, 0.5):.3f} / {pct(during, 0.99):.3f} ms |")


def bench_redis(keys: int, seconds: float, method: str, out: Path) -> str:
    with redis_group(replicas=1) as group:
        primary = redis.Redis(host=HOST, port=group.port("r0"))
        for start in range(0, keys, 1000):
            primary.mset({f"bench:{i}": "x" * 100 for i in range(start, min(keys, start + 1000))})
        group.wait_in_sync("r0", ["r1"], timeout=60)
        action = build_action("redis", Settings((out / method).as_uri()),
                              redis_local_rdb=method == "bgsave")
        sizes: list[int] = []

        def take(n: int) -> None:
            target = SnapshotTarget("svc", "r1", HOST, group.port("r1"), "redis", "replica", 1,
                                    f"{method}-{n}")
            sizes.append(asyncio.run(action.take(target, 600)).size_bytes)

        base, _ = phase(lambda i: primary.set(f"base:{i}", i), seconds)
        during, takes = phase(lambda i: primary.set(f"during:{i}", i), seconds, take)
    return row(f"redis {keys} keys, {method}", base, during, takes, sizes[0])


def bench_postgres(rows: int, seconds: float, out: Path) -> str:
    with postgres_pair(full_page_writes=True) as pair:
        pair.query("pg0", "CREATE TABLE kv (key text PRIMARY KEY, value text)")
        pair.query("pg0", f"INSERT INTO kv SELECT 'b:' || i, repeat('x', 100) FROM generate_series(1, {rows}) i")
        pair.wait_streaming("pg0", "pg1")
        conn = psycopg.connect(pair.dsn("pg0"), autocommit=True)
        action = build_action("postgres", Settings((out / "pg").as_uri()), pg_bindir=postgres_bindir())
        sizes: list[int] = []

        def take(n: int) -> None:
            target = SnapshotTarget("svc", "pg1", HOST, pair.port("pg1"), "postgres", "replica", 1,
                                    f"pg-{n}")
            sizes.append(asyncio.run(action.take(target, 600)).size_bytes)

        def writer(prefix: str):
            return lambda i: conn.execute("INSERT INTO kv VALUES (%s, 'v')", (f"{prefix}:{i}",))

        base, _ = phase(writer("base"), seconds)
        during, takes = phase(writer("during"), seconds, take)
        conn.close()
    return row(f"postgres {rows} rows, pg_basebackup", base, during, takes, sizes[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-keys", type=int, default=200000)
    parser.add_argument("--pg-rows", type=int, default=200000)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="repstage-bench-snap-") as tmp:
        out = Path(tmp)
        lines = [
            "| snapshot | takes | take p50 | stored | writer p50 / p99, no snapshot | writer p50 / p99, snapshots running |",
            "| --- | --- | --- | --- | --- | --- |",
            bench_redis(args.redis_keys, args.seconds, "replication", out),
            bench_redis(args.redis_keys, args.seconds, "bgsave", out),
            bench_postgres(args.pg_rows, args.seconds, out),
        ]
    print("\n".join(lines))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
