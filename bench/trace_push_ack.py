"""push -> ACK latency through a real `repstage-mesh serve` and real Envoys, failover tracing on
and off.

Setup per block: Redis 7 (a primary and one replica), one `serve` node with a Redis service in
probe/orchestrate mode, N real Envoys bootstrapped by `repstage-mesh bootstrap` against it.
Tracing "on": `telemetry.otlp_endpoint` points at a real OTLP gRPC receiver
(integration/otlp_receiver.py), so every switchover is one trace and every push of it a "push"
span with one "ack" event per Envoy; "off": no endpoint (the SDK is not even imported).

Each round is a planned switchover (POST /v1/services/cache/switchover), which makes two traced
pushes: the fence (fail closed) and the new primary (route). From the leader's failover record:

- commit -> ACK: per Envoy, from the "pushed" event (the commit applied and published to the
  xDS cache) to the moment the engine saw that Envoy synced (it polls the tracker every 2 ms);
  fence and route pushes both count;
- all ACKed: from "pushed" to the last Envoy's ACK, per push;
- send -> ACK: the tracker's own figure for the last EDS response to each Envoy (exact);
- write unavailable: fence committed -> the new primary ACKed by every Envoy.

Blocks alternate off, on, off, on ... so that drift in the shared machine's load hits both.

Usage: .venv/bin/python bench/trace_push_ack.py [--envoys 4] [--rounds 20] [--blocks 2]
       [--write-results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, percentile, write_section
from integration.databases import redis_group
from integration.harness import (
    ControlPlaneNode,
    Envoy,
    free_low_port,
    http_json,
    wait_until,
    workdir,
)
from integration.otlp_receiver import OtlpReceiver

SERVICE = "cache"


@dataclass
class Samples:
    commit_ack_ms: list[float] = field(default_factory=list)  # per Envoy per push
    all_acked_ms: list[float] = field(default_factory=list)  # per push
    send_ack_ms: list[float] = field(default_factory=list)  # per Envoy per route push (EDS)
    write_unavailable_ms: list[float] = field(default_factory=list)  # per switchover
    switchover_ms: list[float] = field(default_factory=list)  # per switchover (POST round trip)
    push_spans: int = 0
    ack_events: int = 0


def _event(record: dict[str, Any], name: str, purpose: str | None = None) -> dict[str, Any]:
    for event in record["timeline"]:
        if event["name"] == name and (purpose is None or event["detail"].get("purpose") == purpose):
            return dict(event)
    raise KeyError(f"{name}/{purpose} not in {[e['name'] for e in record['timeline']]}")


def take(record: dict[str, Any], envoys: int, out: Samples) -> None:
    fence = _event(record, "pushed", "fence")["elapsed_ms"]
    fenced = _event(record, "proxies_fenced")["detail"]["acks"]
    route = _event(record, "pushed", "route")["elapsed_ms"]
    routed = [e["elapsed_ms"] for e in record["timeline"] if e["name"] == "acked"]
    assert len(fenced) == envoys and len(routed) == envoys, (fenced, routed, record["missed_route"])
    fence_acks = [t - fence for t in fenced.values()]
    route_acks = [t - route for t in routed]
    out.commit_ack_ms += fence_acks + route_acks
    out.all_acked_ms += [max(fence_acks), max(route_acks)]
    if record.get("write_unavailable_ms") is not None:
        out.write_unavailable_ms.append(float(record["write_unavailable_ms"]))


def block(traced: bool, envoys: int, rounds: int, out: Samples) -> None:
    with workdir() as wd, OtlpReceiver() as receiver, redis_group(replicas=1) as group:
        members = [{"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in group.names]
        cfg: dict[str, Any] = {
            "services": [{
                "name": SERVICE, "protocol": "redis", "listen_port": free_low_port(), "members": members,
                "primary": "r0", "leadership": {"source": "probe", "mode": "orchestrate"},
            }],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        if traced:
            cfg["telemetry"] = {"otlp_endpoint": f"127.0.0.1:{receiver.port}"}
        cp = ControlPlaneNode(wd, cfg)
        proxies = [Envoy(wd, f"bench-{i}", [cp.xds_address]) for i in range(envoys)]
        try:
            cp.start()
            for envoy in proxies:
                envoy.start()

            def all_synced() -> bool:
                listed = [p for p in cp.get("/v1/proxies") if p["connected"]]
                return len(listed) == envoys and all(p["synced"] for p in listed)

            wait_until(all_synced, 30, 0.05, "every Envoy connected and synced")
            target = "r1"
            for _ in range(rounds):
                # the demoted primary is re-pointed as a replica; once the probes see it as one
                # (a 409 until then) it can take over again
                deadline = time.monotonic() + 20
                while True:
                    started = time.perf_counter()
                    status, record = http_json(
                        "POST", f"{cp.api}/v1/services/{SERVICE}/switchover", {"to": target, "timeout": 30}, timeout=60
                    )
                    if status != 409 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)  # polling the server until the target counts as a replica
                out.switchover_ms.append((time.perf_counter() - started) * 1000.0)
                assert status == 200 and record["status"] == "done", (status, record)
                take(record, envoys, out)
                for proxy in cp.get("/v1/proxies"):
                    latency = proxy["types"].get("eds", {}).get("last_ack_latency_seconds")
                    if proxy["connected"] and latency is not None:
                        out.send_ack_ms.append(latency * 1000.0)
                target = "r0" if target == "r1" else "r1"
                wait_until(all_synced, 10, 0.01, "every Envoy synced")
            if traced:
                want = 2 * rounds
                spans = receiver.wait_for(lambda s: sum(x.name == "push" for x in s) >= want, timeout=30)
                pushes = [s for s in spans if s.name == "push"]
                out.push_spans += len(pushes)
                out.ack_events += sum(1 for p in pushes for e in p.events if e.name == "ack")
        finally:
            for envoy in proxies:
                envoy.stop()
            cp.stop()


def row(name: str, values: list[float]) -> str:
    if not values:
        return f"| {name} | - | - | - | - | 0 |"
    return (f"| {name} | {statistics.median(values):.2f} | {percentile(values, 90):.2f} | "
            f"{percentile(values, 99):.2f} | {max(values):.2f} | {len(values)} |")


def report(args: argparse.Namespace, off: Samples, on: Samples) -> str:
    lines = [
        "## Failover tracing on and off: push -> ACK through a real serve and real Envoys (bench/trace_push_ack.py)",
        "",
        f"Command: `.venv/bin/python bench/trace_push_ack.py --envoys {args.envoys} --rounds {args.rounds} "
        f"--blocks {args.blocks}{' --write-results' if args.write_results else ''}`",
        f"({time.strftime('%Y-%m-%d')}, {machine()}).",
        f"One `repstage-mesh serve` node, {args.envoys} real Envoys (SotW) connected to it, Redis 7 primary + replica,",
        "service in probe/orchestrate mode. Each round is a planned switchover (two pushes: fence, then the",
        "new primary). Tracing on: `telemetry.otlp_endpoint` to a real OTLP gRPC receiver on loopback (one",
        "trace per switchover, a push span per push with one ack event per Envoy); off: no endpoint.",
        f"Blocks alternate off/on, {args.blocks} of each, {args.rounds} switchovers per block.",
        "",
    ]
    for title, key in (
        ("commit -> ACK per Envoy, ms (leader's view: pushed event -> Envoy synced; 2 ms polling)", "commit_ack_ms"),
        ("commit -> last Envoy ACKed, ms (per push)", "all_acked_ms"),
        ("send -> ACK of the last EDS response per Envoy, ms (the tracker's own measure)", "send_ack_ms"),
        ("write unavailable, ms (fence committed -> new primary ACKed by every Envoy)", "write_unavailable_ms"),
        ("whole switchover, ms (POST round trip: catch-up, fence, promote, route)", "switchover_ms"),
    ):
        lines += [f"### {title}", "", "| tracing | median | p90 | p99 | max | samples |", "| --- | --- | --- | --- | --- | --- |",
                  row("off", getattr(off, key)), row("on", getattr(on, key)), ""]
    lines.append(f"Receiver (tracing on): {on.push_spans} push spans with {on.ack_events} ack events "
                 f"(expected {2 * args.rounds * args.blocks} and {2 * args.rounds * args.blocks * args.envoys}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envoys", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20, help="switchovers per block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks of each variant (off, on alternating)")
    parser.add_argument("--write-results", action="store_true", help="write the section into bench/RESULTS.md")
    args = parser.parse_args()
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        os.environ.pop(name, None)
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    off, on = Samples(), Samples()
    for i in range(args.blocks):
        for traced, samples in ((False, off), (True, on)):
            print(f"block {i + 1}/{args.blocks}, tracing {'on' if traced else 'off'} ...", flush=True)
            block(traced, args.envoys, args.rounds, samples)
    text = report(args, off, on)
    print(text)
    if args.write_results:
        write_section("trace_push_ack", text)


if __name__ == "__main__":
    main()
