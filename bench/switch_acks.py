"""An announced switch on one node with N real Envoys: from the commit to the last Envoy's ACK
(issue 17 item 4).

Usage: .venv/bin/python bench/switch_acks.py [--envoys 50] [--runs 30] [--probe]
       (`PYTHONPATH=<another tree>` runs that tree's `serve`: old and new side by side)

One `repstage-mesh serve` node (single-node Raft, health fence, default settings) and N Envoys
(1.40, `--concurrency 1`, SotW ADS, one connection each) on loopback. Each run POSTs
`/v1/services/orders/primary` (break-before-make, alternating a and b) and reads the failover
record the answer carries; its timeline is the control plane's own clock:

- fence: `fenced` (the fail-closed commit returned to the runner) -> `proxies_fenced` (the last
  Envoy's ACK of it woke the runner);
- route: `committed` (the new primary's commit) -> the last `acked` event (the last Envoy's
  ACK time as the tracker recorded it).

Both are "commit to the last ACK" for one announced switch as the record sees it; but the
runner's clock reads `committed` when it resumes after the commit, which is after the render
(and, in trees before issue 17's changes, often after the push too). `--probe` measures from
the commit itself instead: `bench/switch_probe/sitecustomize.py` is loaded into the `serve`
process and timestamps the SetPrimary entry's apply (pysyncobj's thread), the render and
encode, every send and every ACK; the table splits each commit -> last ACK into its parts.
Nothing asserted; prints p50/p99 and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

from integration.harness import (  # noqa: E402
    ControlPlaneNode,
    free_low_port,
    http_json,
    wait_until,
    workdir,
)

SERVICE = "orders"


def _elapsed(record: dict[str, Any], name: str, last: bool = False) -> float | None:
    times = [float(e["elapsed_ms"]) for e in record["timeline"] if e["name"] == name]
    if not times:
        return None
    return max(times) if last else times[0]


PROBE = ROOT / "bench" / "switch_probe"
PARTS = ("commit->render", "render+encode", "->1st send", "1st->last send", "last send->last ACK",
         "commit->last ACK")


def probe_parts(prefix: str, envoys: int) -> list[dict[str, float]]:
    """Per commit (fence and route alike) from the probe's events: its parts, ms."""
    events: list[list[Any]] = []
    for path in Path(prefix).parent.glob(Path(prefix).name + ".*"):
        events += [json.loads(line) for line in path.read_text().splitlines() if line]
    events.sort(key=lambda e: e[0])
    starts = [i for i, e in enumerate(events) if e[1] == "applied"]
    rows = []
    for k, i in enumerate(starts):
        window = events[i: starts[k + 1] if k + 1 < len(starts) else len(events)]
        at = {name: [e[0] for e in window if e[1] == name] for name in ("publish_start", "publish_end", "send", "ack")}
        if not at["publish_start"] or len(at["send"]) < envoys or len(at["ack"]) < envoys:
            continue
        t0, sends = events[i][0], at["send"]
        values = (at["publish_start"][0] - t0, at["publish_end"][0] - at["publish_start"][0],
                  sends[0] - at["publish_end"][0], sends[-1] - sends[0], at["ack"][-1] - sends[-1], at["ack"][-1] - t0)
        row = {name: v * 1000 for name, v in zip(PARTS, values, strict=True)}
        row["kind"] = events[i][2] if len(events[i]) > 2 else "?"
        for e in window:  # commit -> the last ACK of each type this commit changed
            if e[1] == "ack" and len(e) > 3:
                row[f"last {e[3]} ACK"] = (e[0] - t0) * 1000
        rows.append(row)
    return rows


def measure(envoys: int, runs: int, probe: bool = False, transport: str = "h2", nice: int = 0) -> dict[str, Any]:
    config = {
        "services": [{
            "name": SERVICE, "protocol": "tcp", "listen_port": free_low_port(),
            "members": [{"name": "a", "address": "127.0.0.1", "port": 20001},
                        {"name": "b", "address": "127.0.0.1", "port": 20002}],
            "primary": "a",
        }],
        "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        "xds": {"listen": f"127.0.0.1:{free_low_port()}", "transport": transport},
    }
    fence, route, answered = [], [], []
    with workdir() as wd:
        prefix = str(wd / "probe")
        if probe:
            os.environ["SWITCH_PROBE_OUT"] = prefix
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROBE), os.environ.get("PYTHONPATH")]))
        node = ControlPlaneNode(wd, config, name="cp-1").start()
        xds_port = int(node.xds_address.rsplit(":", 1)[1])
        procs = [common.start_envoy(f"edge-{i}", xds_port, False, base, nice=nice, parent=wd)
                 for i, base in enumerate(common.base_ids(envoys))]
        try:
            def synced() -> bool:
                proxies = node.get("/v1/proxies")
                items = proxies["proxies"] if isinstance(proxies, dict) else proxies
                return sum(1 for p in items if p.get("synced")) >= envoys

            wait_until(synced, 120, 0.25, f"{envoys} Envoys synced")
            load = common.loadavg()
            pids = [proc.process.pid for proc in procs]
            idle = _cpu_rate(pids, node.proc.pid, 3.0)  # cores the Envoys and node use doing nothing
            cpu_before, wall_before = _cpu_of(pids, node.proc.pid), time.monotonic()
            for i in range(runs):
                member = "ba"[i % 2]
                started = time.perf_counter()
                status, body = http_json("POST", f"{node.api}/v1/services/{SERVICE}/primary",
                                         {"member": member}, timeout=30)
                answered.append((time.perf_counter() - started) * 1000)
                assert status == 200, body
                record = body["failover"]
                f0, f1 = _elapsed(record, "fenced"), _elapsed(record, "proxies_fenced")
                c0, c1 = _elapsed(record, "committed"), _elapsed(record, "acked", last=True)
                acked = sum(1 for e in record["timeline"] if e["name"] == "acked")
                if None in (f0, f1, c0, c1) or acked < envoys:
                    print(f"run {i}: incomplete record ({acked} acked): {json.dumps(record)[:400]}")
                    continue
                fence.append(f1 - f0)  # type: ignore[operator]
                route.append(c1 - c0)  # type: ignore[operator]
            wall = time.monotonic() - wall_before
            cpu = [after - before - rate * wall for after, before, rate in
                   zip(_cpu_of(pids, node.proc.pid), cpu_before, idle, strict=True)]
        finally:
            for proc in procs:
                proc.stop()
            node.stop()
        parts = probe_parts(prefix, envoys) if probe else []
    return {"envoys": envoys, "runs": len(route), "load_before": load, "load_after": common.loadavg(),
            "fence": fence, "route": route, "answered": answered, "parts": parts,
            "idle_cores": idle, "cpu_per_switch_ms": [c * 1000 / max(1, runs) for c in cpu]}


def _cpu_of(envoys: list[int], node: int) -> tuple[float, float]:
    """CPU seconds so far of the Envoys (summed) and of the node with its xDS workers."""
    return (sum(common.process_cpu(pid) for pid in envoys),
            common.process_cpu(node) + sum(common.process_cpu(pid) for pid in common.children_of(node)))


def _cpu_rate(envoys: list[int], node: int, seconds: float) -> tuple[float, float]:
    """Cores the Envoys and the node use while nothing changes (health checks, stats, ticks)."""
    before = _cpu_of(envoys, node)
    time.sleep(seconds)  # a measuring window, not synchronisation
    after = _cpu_of(envoys, node)
    return (after[0] - before[0]) / seconds, (after[1] - before[1]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envoys", type=int, default=50)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--probe", action="store_true", help="time each part from the commit itself")
    parser.add_argument("--transport", choices=["h2", "grpc"], default="h2", help="the node's xds.transport")
    parser.add_argument("--envoy-nice", type=int, default=0, metavar="N",
                        help="run the Envoys at niceness N: the control plane is not preempted by the Envoys "
                        "its sends wake (what separate hosts give)")
    args = parser.parse_args()
    out = measure(args.envoys, args.runs, args.probe, args.transport, args.envoy_nice)
    p = common.percentile
    both = out["fence"] + out["route"]
    print(f"{out['envoys']} Envoys (nice {args.envoy_nice}), {out['runs']} switches, "
          f"load {out['load_before']} -> {out['load_after']}")
    for name in ("fence", "route"):
        xs = out[name]
        if xs:
            print(f"  {name}: commit -> last ACK p50 {p(xs, 50):.1f} ms, p99 {p(xs, 99):.1f} ms, max {max(xs):.1f} ms")
    if both:
        print(f"  both commits: p50 {p(both, 50):.1f} ms, p99 {p(both, 99):.1f} ms "
              f"(POST answered p50 {p(out['answered'], 50):.0f} ms)")
    print(f"  idle: the Envoys use {out['idle_cores'][0]:.2f} cores, the node {out['idle_cores'][1]:.2f}; "
          f"CPU per switch (two commits) beyond idle: Envoys {out['cpu_per_switch_ms'][0]:.0f} ms, "
          f"node {out['cpu_per_switch_ms'][1]:.0f} ms")
    if out["parts"]:
        print(f"  probe, {len(out['parts'])} commits (fence and route), ms: " + ", ".join(
            f"{name} p50 {p([r[name] for r in out['parts']], 50):.2f} / p99 {p([r[name] for r in out['parts']], 99):.2f}"
            for name in PARTS))
        for kind in ("fence", "route"):
            rows = [r for r in out["parts"] if r["kind"] == kind]
            names = [*PARTS, *sorted({k for r in rows for k in r if k.startswith("last ") and k.endswith(" ACK")})]
            if rows:
                print(f"  probe, {kind} commits ({len(rows)}), p50 / p99 ms: " + ", ".join(
                    f"{name} {p([r[name] for r in rows if name in r], 50):.2f} / "
                    f"{p([r[name] for r in rows if name in r], 99):.2f}" for name in names if any(name in r for r in rows)))
    if os.environ.get("SWITCH_ACKS_JSON"):
        Path(os.environ["SWITCH_ACKS_JSON"]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
