"""The client-visible write stall of a cross-service consistent point (issue 16 item 5).

Two Redis services (a primary and a replica each), three `repstage-mesh serve` nodes, one real
Envoy; a writer through the mesh writes to A, then B, then A... (each write waits for the one
before) and times every write. Each run asks for a consistent point over both services and
waits until its snapshots ended; the run's stall is the slowest write that started between the
request and the release (plus 0.3 s). Both ways of taking the point are measured: the fork on a
caught-up replica (default) and the fork on the primary (`"member": "primary"`). Prints a
markdown table; never pass/fail. A third way puts an http service in the point with a Redis one
(`svc-a` + `web`): an http writer POSTs through the mesh in a loop, and the run's http figure
is how long Envoy answered its writes 503 (first 503 to the last one).

    .venv/bin/python bench/consistent_point.py --runs 20 --hold-ms 200
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.harness import cluster_leader, wait_until
from integration.test_consistent_point import Writer, follow, mesh, web_write


class WebWriter:
    """POSTs through the mesh in a loop; keeps (time, status)."""

    def __init__(self, port: int) -> None:
        self.port, self.answers, self.stop = port, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            status, _ = web_write(self.port)
            self.answers.append((time.monotonic(), status))

    def held_ms(self, since: float) -> float:
        held = [t for t, status in list(self.answers) if t >= since and status == 503]
        return (max(held) - min(held)) * 1000 if held else 0.0


def pct(values: list[float], q: float) -> float:
    """Nearest rank: with 20 values p99 is the largest."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-int(q * 100) * len(ordered) // 100) - 1))] if ordered else float("nan")


def one_point(m: Any, writer: Writer, member: str, web: WebWriter | None = None) -> dict[str, Any]:
    leader = cluster_leader(m.nodes)
    asked = time.monotonic()
    services = ["svc-a", "web"] if web is not None else ["svc-a", "svc-b"]
    status, started = leader.call("POST", "/v1/consistent-points", {"services": services, "member": member})
    assert status == 202, started
    point = follow(leader, started["id"], lambda p: p["status"] not in ("intent", "holding"), 20)
    released = time.monotonic()
    for service, snapshot_id in point["snapshots"].items():
        wait_until(lambda s=service, i=snapshot_id: leader.get(f"/v1/services/{s}/snapshots/{i}")["status"] != "running",
                   60, what="the snapshots")
    time.sleep(0.3)  # let the writer's last held write come back (measurement, not synchronisation)
    during = [sec for start, sec in list(writer.latencies) if asked <= start <= released + 0.3]
    return {"status": point["status"], "held_ms": point["held_ms"], "stall_ms": max(during) * 1000 if during else 0.0,
            "writes": len(during), "error": point["error"], "web_503_ms": web.held_ms(asked) if web is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hold-ms", type=int, default=200)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    with mesh(hold_ms=args.hold_ms, web=True) as m, Writer(m.ports).running() as writer:
        wait_until(lambda: web_write(m.ports["web"])[0] == 200, 20, what="the web service")
        baseline = sorted(sec for _, sec in writer.latencies)
        web = WebWriter(m.ports["web"])
        web.thread.start()
        for member in ("replica", "primary", "replica+web"):
            runs = [one_point(m, writer, member.split("+")[0], web if "web" in member else None) for _ in range(args.runs)]
            stalls = [r["stall_ms"] for r in runs if r["status"] == "released"]
            held = [r["held_ms"] for r in runs if r["status"] == "released"]
            rows.append((member, runs, stalls, held))
        web.stop.set()
        web.thread.join(10)
        errors = list(writer.errors)
        web_errors = sum(1 for _, status in web.answers if status not in (200, 503))
    load_after = os.getloadavg()
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; window {args.hold_ms} ms; "
          f"baseline write p50 {pct(baseline, 0.5) * 1000:.2f} ms, p99 {pct(baseline, 0.99) * 1000:.2f} ms; "
          f"write errors {len(errors)}; http answers neither 200 nor 503: {web_errors}")
    print("| point taken on | runs | released | stall p50 ms | stall p99 ms | stall max ms | over the window | held (leader) p50 / max ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for member, runs, stalls, held in rows:
        over = sum(1 for s in stalls if s > args.hold_ms)
        print(f"| {member} | {len(runs)} | {len(stalls)} | {pct(stalls, 0.5):.1f} | {pct(stalls, 0.99):.1f} | "
              f"{max(stalls, default=float('nan')):.1f} | {over} | {pct(held, 0.5):.1f} / {max(held, default=float('nan')):.1f} |")
        web_held = [r["web_503_ms"] for r in runs if r["web_503_ms"] is not None and r["status"] == "released"]
        if web_held:
            print(f"  http writes answered 503 (Retry-After) per run: p50 {pct(web_held, 0.5):.1f} ms, "
                  f"p99 {pct(web_held, 0.99):.1f} ms, max {max(web_held):.1f} ms")
        for r in runs:
            if r["status"] != "released":
                print(f"  not released: {r['status']} {r['error']}")


if __name__ == "__main__":
    main()
