"""Primary write latency through the mesh, with and without replica snapshots (issue 16:
"primary write latency p99 through the mesh is within 10% of the same load without a snapshot").

Three `repstage-mesh serve` nodes (`integration/cluster3.py`), two real Envoys whose admins prove
the drain, Redis 7 with a primary and two replicas holding `--keys` keys. A writer sends `SET`s
through Envoy's primary port at a steady `--rate` (one connection, paced: open loop, a late
request is not skipped, its latency counts) and times each. Rounds alternate, `--rounds` times:

- `without`: `--seconds` of writes, no snapshot;
- `with`: the same, while replica snapshots run back to back through the workflow
  (`POST /v1/services/cache/snapshots`, drained from the read pool, the RDB transfer from the
  replica, returned), the next asked as soon as one ends.

Prints p50/p99 per round and over all rounds of each kind, the ratio, and the load average.
Never passes or fails on time.

Usage::

    .venv/bin/python bench/snapshot_latency.py --rounds 4 --seconds 10 --rate 500
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import loadavg, percentile
from integration.cluster3 import cluster3
from integration.databases import RedisGroup, redis_group
from integration.harness import ControlPlaneNode, free_low_port, http_json, wait_until
from integration.snapshot_chaos import replicas_seen


class PacedWriter:
    """SET through the mesh every 1/rate s for `seconds`; the latency of each, in ms."""

    def __init__(self, port: int, rate: float) -> None:
        self.client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        self.period = 1.0 / rate
        self.errors = 0

    def run(self, seconds: float) -> list[float]:
        out: list[float] = []
        start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) < start + seconds:
            due = start + n * self.period
            if due > now:
                time.sleep(due - now)  # the pace of the load, not synchronisation
            t0 = time.perf_counter()
            try:
                self.client.set(f"lat:{n % 1000}", n)
                out.append((time.perf_counter() - t0) * 1000)
            except redis.RedisError:
                self.errors += 1
            n += 1
        return out


class Snapshots(threading.Thread):
    """Replica snapshots back to back until stopped; each one's result."""

    def __init__(self, leader: ControlPlaneNode) -> None:
        super().__init__(daemon=True)
        self.leader = leader
        self.stop_at = threading.Event()
        self.ended: list[dict[str, Any]] = []
        self.busy = 0.0

    def run(self) -> None:
        while not self.stop_at.is_set():
            t0 = time.monotonic()
            status, started = http_json("POST", f"{self.leader.api}/v1/services/cache/snapshots", {}, timeout=10.0)
            assert status == 202, (status, started)
            path = f"{self.leader.api}/v1/services/cache/snapshots/{started['id']}"
            entry = wait_until(lambda p=path: (e := http_json("GET", p, timeout=2.0)[1])["status"] != "running"
                               and e["pool"] == "in" and e, 120, 0.02, "the snapshot ends")
            self.busy += time.monotonic() - t0
            self.ended.append(entry)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of `pids` and their reaped children (Redis' forks), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def round_of(port: int, rate: float, seconds: float, leader: ControlPlaneNode | None) -> tuple[list[float], int, float]:
    snaps = Snapshots(leader) if leader is not None else None
    if snaps is not None:
        snaps.start()
        wait_until(lambda: snaps.busy > 0 or bool(snaps.ended) or _draining(leader), 30, 0.01, "a snapshot runs")
    writer = PacedWriter(port, rate)
    latencies = writer.run(seconds)
    writer.client.close()
    done, busy = 0, 0.0
    if snaps is not None:
        snaps.stop_at.set()
        snaps.join(120)
        done = sum(e["status"] == "completed" for e in snaps.ended)
        busy = snaps.busy
        failed = [e for e in snaps.ended if e["status"] != "completed"]
        assert not failed, failed
    assert writer.errors == 0, f"{writer.errors} write errors"
    return latencies, done, busy


def _draining(leader: ControlPlaneNode | None) -> bool:
    assert leader is not None
    status, body = http_json("GET", f"{leader.api}/v1/services/cache/snapshots", timeout=2.0)
    return status == 200 and any(s["status"] == "running" for s in body["snapshots"])


def load_keys(group: RedisGroup, keys: int) -> None:
    client = group.client("r0")
    for start in range(0, keys, 10_000):
        client.mset({f"k:{i}": "x" * 64 for i in range(start, min(keys, start + 10_000))})
    group.wait_in_sync("r0", ["r1", "r2"], timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=500.0, help="SETs per second through the primary port")
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    print(f"load average before: {loadavg()}")
    with redis_group(replicas=2) as group:
        load_keys(group, args.keys)
        listen, read = free_low_port(), free_low_port()
        members = [{"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in group.names]
        service = {"name": "cache", "protocol": "redis", "listen_port": listen, "read_port": read,
                   "members": members, "primary": "r0", "leadership": {"source": "probe", "mode": "follow"}}
        with cluster3([service], start=False) as c:
            envoys = [c.envoy(f"edge-{i}", start=False) for i in (1, 2)]
            for node in c.nodes:
                node.config["snapshots"] = {"envoy_admins": [f"127.0.0.1:{e.admin_port}" for e in envoys]}
            c.start()
            probe = redis.Redis(host="127.0.0.1", port=listen, socket_timeout=1)
            wait_until(lambda: probe.set("probe", 1), 30, 0.05, "writes through Envoy reach r0")
            probe.close()
            leader = c.leader(timeout=30)
            wait_until(lambda: replicas_seen(leader), 30, 0.05, "the leader's probes see both replicas")
            round_of(listen, args.rate, 2.0, None)  # warm-up, not counted
            mesh = [n.proc.pid for n in c.nodes] + [e.proc.pid for e in envoys]
            dbs = [server.process.pid for server in group.servers.values()]
            pooled: dict[str, list[float]] = {"without": [], "with": []}
            per_round: dict[str, list[float]] = {"without": [], "with": []}
            print("| round | snapshots | p50 ms | p99 ms | max ms | writes | snapshots completed "
                  "| CPU s: nodes + Envoys / Redis |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for n in range(args.rounds):
                for kind in ("without", "with"):
                    cpu0 = cpu_seconds(mesh), cpu_seconds(dbs)
                    lat, done, _ = round_of(listen, args.rate, args.seconds, leader if kind == "with" else None)
                    cpu = cpu_seconds(mesh) - cpu0[0], cpu_seconds(dbs) - cpu0[1]
                    pooled[kind] += lat
                    per_round[kind].append(percentile(lat, 99))
                    print(f"| {n + 1} | {kind} | {percentile(lat, 50):.3f} | {percentile(lat, 99):.3f} | {max(lat):.1f} "
                          f"| {len(lat)} | {done if kind == 'with' else '-'} | {cpu[0]:.1f} / {cpu[1]:.1f} |", flush=True)
            p99 = {k: percentile(v, 99) for k, v in pooled.items()}
            for kind, values in pooled.items():
                print(f"| all | {kind} | {percentile(values, 50):.3f} | {p99[kind]:.3f} | {max(values):.1f} "
                      f"| {len(values)} | | |")
            median = {k: percentile(v, 50) for k, v in per_round.items()}
            print(f"p99 over all writes, with / without: {p99['with'] / p99['without']:.3f}; "
                  f"median of the rounds' p99, with / without: {median['with'] / median['without']:.3f}")
    print(f"load average after: {loadavg()}  (pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
