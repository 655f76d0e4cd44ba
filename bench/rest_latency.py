"""A REST change on a 3-node cluster of real `serve` processes, on loopback (issue 17).

Usage: .venv/bin/python bench/rest_latency.py [--nodes 3] [--n 300] [--kinds put announce same]
       (`PYTHONPATH=<another tree>` runs that tree's `serve`: old and new side by side)

What it times, from one sequential client on a keep-alive connection, sent to the leader and
to a follower (the answer means: committed through Raft and applied on the node that answers):

- `put`: PUT /v1/services/orders with the spec changed each time (member b's port alternates),
  what `repstage-mesh apply` and an operator's automation send; the change is rendered and
  encoded into a new xDS snapshot on every node. A follower commits it through pysyncobj's own
  forwarding to the leader (no HTTP hop).
- `announce`: POST /v1/services/orders/primary with `"fence": false` (one commit, answered once
  applied), alternating the primary. A follower carries it to the leader's API (one HTTP hop).
- `same`: PUT of an unchanged spec: a commit with nothing to render.

p50/p99 per row, and the load average; nothing asserted (the figures go to bench/RESULTS.md
by hand, with the command).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from raft_commit import SERVICE, base_config  # noqa: E402

from integration.harness import (  # noqa: E402
    ControlPlaneNode,
    cluster_leader,
    raft_cluster,
    start_cluster,
    workdir,
)

WARMUP = 10


def _spec(config: dict[str, Any], port_b: int) -> dict[str, Any]:
    spec = dict(config["services"][0])
    spec.pop("primary", None)
    spec["members"] = [dict(m) for m in spec["members"]]
    spec["members"][1]["port"] = port_b
    spec.pop("name")
    return spec


def _requests(kind: str, config: dict[str, Any]) -> Callable[[int], tuple[str, str, bytes]]:
    path = f"/v1/services/{SERVICE}"
    if kind == "put":
        specs = [json.dumps(_spec(config, p)).encode() for p in (20002, 20003)]
        return lambda i: ("PUT", path, specs[i % 2])
    if kind == "same":
        same = json.dumps(_spec(config, 20002)).encode()
        return lambda i: ("PUT", path, same)
    bodies = [json.dumps({"member": m, "fence": False}).encode() for m in ("b", "a")]
    return lambda i: ("POST", path + "/primary", bodies[i % 2])


def timed(node: ControlPlaneNode, make: Callable[[int], tuple[str, str, bytes]], n: int) -> list[float]:
    host, port = node.config["api"]["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    samples = []
    try:
        for i in range(n + WARMUP):
            method, path, body = make(i)
            start = time.perf_counter()
            conn.request(method, path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            took = time.perf_counter() - start
            if response.status not in (200, 201):
                raise RuntimeError(f"{method} {path} on {node.name}: {response.status} {raw!r}")
            if i >= WARMUP:
                samples.append(took)
    finally:
        conn.close()
    return samples


def _cpu(lead: ControlPlaneNode, nodes: list[ControlPlaneNode]) -> dict[str, float]:
    """CPU seconds so far: the leader node, the followers (summed), their xDS workers, this
    client (each request's CPU shows where a change costs, beside its latency)."""
    out = {"leader": 0.0, "leader workers": 0.0, "followers": 0.0, "follower workers": 0.0}
    for node in nodes:
        role = "leader" if node is lead else "followers"
        out[role] += common.process_cpu(node.proc.pid)
        workers = "leader workers" if node is lead else "follower workers"
        out[workers] += sum(common.process_cpu(pid) for pid in common.children_of(node.proc.pid))
    out["client"] = common.cpu_seconds()
    return out


def run(size: int, n: int, kinds: list[str], xds_workers: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with workdir() as wd:
        config = base_config()
        nodes = raft_cluster(wd, size, config)
        for node in nodes if xds_workers is not None else ():
            node.config["xds"]["workers"] = xds_workers
        try:
            start_cluster(nodes, 60)
            lead = cluster_leader(nodes, 20)
            follower = next(x for x in nodes if x is not lead)
            for kind in kinds:
                make = _requests(kind, config)
                for role, node in (("leader", lead), ("follower", follower)):
                    cpu_before = _cpu(lead, nodes)
                    samples = timed(node, make, n)
                    cpu = {k: (v - cpu_before[k]) * 1000 / (n + WARMUP) for k, v in _cpu(lead, nodes).items()}
                    rows.append({
                        "kind": kind, "on": role, "n": len(samples),
                        "p50": common.percentile(samples, 50) * 1000,
                        "p99": common.percentile(samples, 99) * 1000,
                    })
                    print(f"{kind:9} {role:9} n={len(samples)} p50 {rows[-1]['p50']:.2f} ms "
                          f"p99 {rows[-1]['p99']:.2f} ms; CPU ms per request: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()), flush=True)
        finally:
            for node in nodes:
                node.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| request | sent to | requests | p50 ms | p99 ms |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['on']} | {r['n']} | {r['p50']:.2f} | {r['p99']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--kinds", nargs="+", default=["put", "announce", "same"],
                        choices=["put", "announce", "same"])
    parser.add_argument("--xds-workers", type=int, help="xds.workers of every node (default: the config's)")
    args = parser.parse_args()
    before = common.loadavg()
    rows = run(args.nodes, args.n, args.kinds, args.xds_workers)
    print(f"load average before {before}, after {common.loadavg()}")
    print(table(rows))


if __name__ == "__main__":
    main()
