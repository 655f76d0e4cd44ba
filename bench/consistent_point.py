"""The client-visible write stall of a cross-service consistent point (issue 16 item 5).

Two Redis services (a primary and a replica each), three `repstage-mesh serve` nodes, one real
Envoy; a writer through the mesh writes to A, then B, then A... (each write waits for the one
before) and times every write. Each run asks for a consistent point over both services and
waits until its snapshots ended; the run's stall is the slowest write that started between the
request and the release (plus 0.3 s). Both ways of taking the point are measured: the fork on a
caught-up replica (default) and the fork on the primary (`"member": "primary"`). Prints a
markdown table; never pass/fail.

    .venv/bin/python bench/consistent_point.py --runs 20 --hold-ms 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.harness import cluster_leader, wait_until
from integration.test_consistent_point import Writer, follow, mesh


def pct(values: list[float], q: float) -> float:
    """Nearest rank: with 20 values p99 is the largest."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-int(q * 100) * len(ordered) // 100) - 1))] if ordered else float("nan")


def one_point(m: Any, writer: Writer, member: str) -> dict[str, Any]:
    leader = cluster_leader(m.nodes)
    asked = time.monotonic()
    status, started = leader.call("POST", "/v1/consistent-points", {"services": ["svc-a", "svc-b"], "member": member})
    assert status == 202, started
    point = follow(leader, started["id"], lambda p: p["status"] not in ("intent", "holding"), 20)
    released = time.monotonic()
    for service, snapshot_id in point["snapshots"].items():
        wait_until(lambda s=service, i=snapshot_id: leader.get(f"/v1/services/{s}/snapshots/{i}")["status"] != "running",
                   60, what="the snapshots")
    time.sleep(0.3)  # let the writer's last held write come back (measurement, not synchronisation)
    during = [sec for start, sec in list(writer.latencies) if asked <= start <= released + 0.3]
    return {"status": point["status"], "held_ms": point["held_ms"], "stall_ms": max(during) * 1000 if during else 0.0,
            "writes": len(during), "error": point["error"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hold-ms", type=int, default=200)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    with mesh(hold_ms=args.hold_ms) as m, Writer(m.ports).running() as writer:
        baseline = sorted(sec for _, sec in writer.latencies)
        for member in ("replica", "primary"):
            runs = [one_point(m, writer, member) for _ in range(args.runs)]
            stalls = [r["stall_ms"] for r in runs if r["status"] == "released"]
            held = [r["held_ms"] for r in runs if r["status"] == "released"]
            rows.append((member, runs, stalls, held))
        errors = list(writer.errors)
    load_after = os.getloadavg()
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; window {args.hold_ms} ms; "
          f"baseline write p50 {pct(baseline, 0.5) * 1000:.2f} ms, p99 {pct(baseline, 0.99) * 1000:.2f} ms; "
          f"write errors {len(errors)}")
    print("| point taken on | runs | released | stall p50 ms | stall p99 ms | stall max ms | over the window | held (leader) p50 / max ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for member, runs, stalls, held in rows:
        over = sum(1 for s in stalls if s > args.hold_ms)
        print(f"| {member} | {len(runs)} | {len(stalls)} | {pct(stalls, 0.5):.1f} | {pct(stalls, 0.99):.1f} | "
              f"{max(stalls, default=float('nan')):.1f} | {over} | {pct(held, 0.5):.1f} / {max(held, default=float('nan')):.1f} |")
        for r in runs:
            if r["status"] != "released":
                print(f"  not released: {r['status']} {r['error']}")


if __name__ == "__main__":
    main()
