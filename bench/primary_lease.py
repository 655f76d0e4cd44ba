"""Primary lease (xds.primary_lease_ms, issue 11): time to fail closed, and what renewing costs.

Three `repstage-mesh serve` nodes on loopback, two TCP members `a` and `b` that answer every line
with their name, one real Envoy bootstrapped with ONE node's xDS address (never the Raft
leader): when that node freezes, the Envoy is cut off from every live node. Per lease length
(`off` is the default, static stability), each round:

1. a connection is opened through the Envoy and held; a writer opens a fresh connection every
   5 ms and notes who answered;
2. the Envoy's node is SIGSTOPped; the switch a <-> b is announced through the leader (t0 = the
   fence commit in the announce's record, on this host's monotonic clock);
3. the writer runs until `--window` seconds after t0: reported are the time from t0 to the first
   refused connection, the writes that reached the demoted primary after t0 and after
   t0 + the lease's bound (1.1 x lease), and whether the held connection was closed;
4. SIGCONT, wait until the Envoy routes the new primary again.

Cost (`--cost-seconds`, no freeze): the CPU time of the Envoy's node and of the leader and the
Raft commit index over that window, with one Envoy attached, and the bytes of one renewal.

Usage::

    .venv/bin/python bench/primary_lease.py --leases off,1000,3000 --rounds 3

Prints a table; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import loadavg, percentile
from integration.cluster3 import cluster3, two_tcp_members
from integration.harness import (
    ControlPlaneNode,
    LineClient,
    ask_once,
    cluster_leader,
    http_json,
    wait_until,
)

SERVICE = "orders"
PRIMARY = f"/v1/services/{SERVICE}/primary"


def routed_to(port: int) -> str:
    """Who answered a write on a fresh connection; "-" refused or closed by the Envoy,
    "timeout" no answer within 1 s (a loaded machine: neither routed nor refused)."""
    try:
        return ask_once(port, "write", timeout=1.0).split(":", 1)[0]
    except TimeoutError:
        return "timeout"
    except OSError:
        return "-"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lease_rounds(node: ControlPlaneNode) -> tuple[float, float]:
    """(renewals, skipped) from the node's /metrics (0, 0 with the lease off)."""
    with urllib.request.urlopen(f"{node.api}/metrics", timeout=2.0) as answer:
        text = answer.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("repstage_xds_lease_renewals_total", "repstage_xds_lease_skipped_total"))}
    return values.get("repstage_xds_lease_renewals_total", 0.0), values.get("repstage_xds_lease_skipped_total", 0.0)


def commit_index(node: ControlPlaneNode) -> int:
    return int(http_json("GET", f"{node.api}/v1/cluster", timeout=2.0)[1]["commit_index"])


class Writer(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.seen: list[tuple[float, str]] = []
        self.stop_at = float("inf")

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            self.seen.append((time.monotonic(), routed_to(self.port)))
            time.sleep(0.005)  # the write rate of this benchmark


def one_round(nodes: list[ControlPlaneNode], on: ControlPlaneNode, port: int, lease_s: float | None,
              window: float) -> dict[str, Any]:
    leader = cluster_leader(nodes)
    before = http_json("GET", f"{leader.api}{PRIMARY}")[1]["primary"]
    target = "b" if before == "a" else "a"
    wait_until(lambda: routed_to(port) == before, 30, 0.01, f"traffic reaches {before}")
    held = LineClient(port)
    assert held.ask("hold").startswith(before)
    writer = Writer(port)
    writer.start()
    time.sleep(random.uniform(0.0, lease_s / 3 if lease_s else 0.1))  # a random phase of the renewals
    on.proc.signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        status, body = http_json("POST", f"{leader.api}{PRIMARY}", {"member": target}, timeout=30.0)
        answered = time.monotonic()
        assert status == 200, body
        timeline = {event["name"]: event for event in body["failover"]["timeline"]}
        t0 = timeline["fenced"]["at"]  # the fence commit, on the leader's (this host's) monotonic clock
        writer.stop_at = t0 + window
        writer.join()
        refused = next((at - t0 for at, who in writer.seen if at > t0 and who == "-"), None)
        bound = lease_s * 1.1 if lease_s else None
        row = {
            "refused_s": refused,
            "refused_after_freeze_s": None if refused is None else refused + t0 - frozen,
            "to_old_after_commit": sum(1 for at, who in writer.seen if at > t0 and who == before),
            "to_old_after_bound": (sum(1 for at, who in writer.seen if at > t0 + bound + 0.05 and who == before)
                                   if bound else None),
            "held_closed": held.closed_by_peer(),
            "announce_s": answered - t0,
            "covered_by_lease": timeline.get("proxies_fenced", {}).get("detail", {}).get("covered_by_lease"),
            "writes": sum(1 for at, _ in writer.seen if at > t0),
        }
    finally:
        held.close()
        on.proc.signal(signal.SIGCONT)
    wait_until(lambda: routed_to(port) == target, 60, 0.02, f"thawed: traffic reaches {target}")
    return row


def cost(nodes: list[ControlPlaneNode], on: ControlPlaneNode, seconds: float) -> dict[str, float]:
    leader = cluster_leader(nodes)
    pids = {"node": on.proc.pid, "leader": leader.proc.pid}
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    idx0 = commit_index(leader)
    rounds0 = lease_rounds(on)
    time.sleep(seconds)  # the measured window
    rounds1 = lease_rounds(on)
    return {
        "node_cpu_ms_per_s": (cpu_seconds(pids["node"]) - cpu0["node"]) * 1000 / seconds,
        "leader_cpu_ms_per_s": (cpu_seconds(pids["leader"]) - cpu0["leader"]) * 1000 / seconds,
        "commits_per_s": (commit_index(leader) - idx0) / seconds,
        "renewed": rounds1[0] - rounds0[0],
        "skipped": rounds1[1] - rounds0[1],
    }


def run(lease: str, rounds: int, window: float, cost_seconds: float) -> tuple[list[dict[str, Any]], dict[str, float]]:
    lease_s = None if lease == "off" else int(lease) / 1000
    options = {"xds": {"primary_lease_ms": int(lease)}} if lease_s else None
    with two_tcp_members(SERVICE) as service, cluster3([service.spec], options) as c:
        nodes, port = c.nodes, service.port
        leader = cluster_leader(nodes)
        on = next(n for n in nodes if n is not leader)
        c.envoy("edge-1", [on])
        wait_until(lambda: routed_to(port) == "a", 30, 0.01, "traffic reaches a")
        spent = cost(nodes, on, cost_seconds)
        print(f"  lease {lease}: cost window {spent}")
        rows = []
        for n in range(rounds):
            if cluster_leader(nodes) is on:
                print("  (the Envoy's node became leader: round skipped)")
                continue
            row = one_round(nodes, on, port, lease_s, window)
            rows.append(row)
            print(f"  lease {lease} round {n + 1}: {row}")
        return rows, spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", default="off,1000,3000", help="comma-separated: off or milliseconds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=6.0, help="seconds of writes after the commit")
    parser.add_argument("--cost-seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(f"load average before: {loadavg()}")
    print("| lease | commit -> refused: p50 (min / max) | writes to the demoted primary after the commit "
          "(per round) | after commit + 1.1 x lease | held connection closed | node CPU ms/s | leader CPU ms/s "
          "| Raft commits/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for lease in args.leases.split(","):
        rows, spent = run(lease.strip(), args.rounds, args.window, args.cost_seconds)
        refused = [r["refused_s"] for r in rows if r["refused_s"] is not None]
        when = (f"{percentile(refused, 50) * 1000:.0f} ms ({min(refused) * 1000:.0f} / {max(refused) * 1000:.0f})"
                if len(refused) == len(rows) and rows else
                f"never within {args.window:g} s ({len(refused)} of {len(rows)} rounds refused)")
        print(f"| {lease} | {when} | {' / '.join(str(r['to_old_after_commit']) for r in rows)} "
              f"| {' / '.join(str(r['to_old_after_bound']) for r in rows)} "
              f"| {sum(r['held_closed'] for r in rows)} of {len(rows)} "
              f"| {spent['node_cpu_ms_per_s']:.1f} | {spent['leader_cpu_ms_per_s']:.1f} "
              f"| {spent['commits_per_s']:.1f} |")
    print(f"load average after: {loadavg()}  (pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
