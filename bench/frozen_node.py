"""How long does an Envoy keep routing by a frozen control-plane node's config? (issue 11)

Three `repstage-mesh serve` nodes on loopback (one Raft cluster), two TCP members `a` and `b`
that answer every line with their name, one real Envoy bootstrapped by `repstage-mesh
bootstrap` with all three xDS addresses (the default keepalive of `filters/bootstrap.py`).
Each round:

1. find the node the Envoy's ADS stream is on (`GET /v1/proxies` on each node); if it is the
   Raft leader, start another Envoy (so the commit below needs no election: the worst case for
   the Envoy);
2. SIGSTOP that node (a paused VM, a stalled disk);
3. switch the primary through a live node (`POST /v1/services/orders/primary`), t0 = its answer
   (the commit);
4. open a fresh connection through the Envoy every 5 ms until one reaches the new primary:
   t1. Report t1 - t0 and the time from SIGSTOP to t1;
5. SIGCONT the node, wait for the cluster to converge.

Usage::

    .venv/bin/python bench/frozen_node.py --rounds 10

Prints a table; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import loadavg, percentile
from integration.cluster3 import cluster3, two_tcp_members
from integration.harness import (
    ControlPlaneNode,
    Envoy,
    ask_once,
    cluster_leader,
    http_json,
    wait_until,
)

SERVICE = "orders"
PRIMARY = f"/v1/services/{SERVICE}/primary"


def serving(nodes: list[ControlPlaneNode], envoy: Envoy) -> list[ControlPlaneNode]:
    out = []
    for node in nodes:
        status, proxies = http_json("GET", f"{node.api}/v1/proxies", timeout=1.0)
        if status == 200 and any(p["node_id"] == envoy.node_id and p["connected"] for p in proxies):
            out.append(node)
    return out


def routed_to(port: int) -> str:
    try:
        return ask_once(port, "probe", timeout=0.5).split(":", 1)[0]
    except OSError:
        return "-"


def one_round(wd: Path, nodes: list[ControlPlaneNode], port: int, n: int) -> dict[str, Any]:
    leader = cluster_leader(nodes)
    envoy: Envoy | None = None
    on: ControlPlaneNode | None = None
    for attempt in range(12):
        envoy = Envoy(wd, f"edge-{n}-{attempt}", [x.xds_address for x in nodes]).start()
        found = wait_until(lambda e=envoy: serving(nodes, e), 20, 0.05, "envoy on a node")
        if found[0] is not leader:
            on = found[0]
            break
        envoy.stop()
    assert envoy is not None and on is not None, "every Envoy landed on the leader"
    try:
        before = http_json("GET", f"{leader.api}{PRIMARY}")[1]["primary"]
        target = "b" if before == "a" else "a"
        wait_until(lambda: routed_to(port) == before, 20, 0.01, f"traffic reaches {before}")
        writer = next(x for x in nodes if x is not on)
        on.proc.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        status, body = http_json("POST", f"{writer.api}{PRIMARY}", {"member": target}, timeout=10.0)
        committed = time.monotonic()
        assert status == 200, body
        wait_until(lambda: routed_to(port) == target, 30, 0.005, f"traffic reaches {target}")
        routed = time.monotonic()
        moved_to = [x.name for x in serving([x for x in nodes if x is not on], envoy)]
        return {"node": on.name, "commit_ms": (committed - stopped) * 1000,
                "from_commit_ms": (routed - committed) * 1000, "from_stop_ms": (routed - stopped) * 1000,
                "moved_to": ",".join(moved_to)}
    finally:
        on.proc.signal(signal.SIGCONT)
        envoy.stop()
        wait_until(lambda: all(http_json("GET", f"{x.api}/readyz", timeout=1.0)[0] == 200 for x in nodes),
                   30, 0.1, "every node ready again")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    print(f"load average before: {loadavg()}")
    rows = []
    with two_tcp_members(SERVICE) as service, cluster3([service.spec]) as c:
        for n in range(args.rounds):
            row = one_round(c.wd, c.nodes, service.port, n)
            rows.append(row)
            print(f"round {n + 1}: frozen {row['node']}, commit {row['commit_ms']:.0f} ms after SIGSTOP, "
                  f"new primary routed {row['from_commit_ms']:.0f} ms after the commit "
                  f"({row['from_stop_ms']:.0f} ms after SIGSTOP), Envoy now on {row['moved_to']}")
    if rows:
        for key in ("from_commit_ms", "from_stop_ms"):
            values = [r[key] for r in rows]
            print(f"{key}: p50 {percentile(values, 50):.0f} ms, max {max(values):.0f} ms, "
                  f"min {min(values):.0f} ms ({len(values)} rounds)")
    print(f"load average after: {loadavg()}  (pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
