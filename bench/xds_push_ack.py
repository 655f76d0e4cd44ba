"""push -> ACK latency with real Envoys (SotW and Delta).

One AdsServer in this process, N real Envoys (`.venv/bin/envoy`, concurrency 1, each with its
own --base-id and admin port). Each round swaps the endpoint port of one
ClusterLoadAssignment (the failover-shaped change: one EDS resource) and times, from just
before `cache.set_snapshot` to the moment the server processes each Envoy's ACK (a
ProxyTracker observer's `on_ack`, no polling):

- per Envoy: p50/p99 over the rounds;
- all: the time until the last of the N Envoys has ACKed, p50/p99 over the rounds;
- where the time goes: `set_snapshot` itself (the protocol and framing for every stream, run
  synchronously), the server's `context.write` returning, and, with --envoy-log, Envoy's own
  log of receiving the response and sending the ACK (microsecond timestamps, same clock).

Usage: .venv/bin/python bench/xds_push_ack.py [--envoys 1 20] [--rounds 50] [--modes sotw delta]
       [--envoy-log] [--write-results]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import math
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import grpc.aio

from repstage_mesh.xds import resources as R
from repstage_mesh.xds.cache import SnapshotCache
from repstage_mesh.xds.limits import XdsLimits
from repstage_mesh.xds.protocol import Acked, Nacked, Send
from repstage_mesh.xds.server import AdsServer
from repstage_mesh.xds.tracker import ProxyRecord, ProxyTracker

BENCH_LIMITS = XdsLimits(max_streams_per_peer=100_000, max_streams=100_000)  # one address, many proxies

_WRITES: list[float] = []  # perf_counter() when a context.write returned (timed server)


class TimedAdsServer(AdsServer):
    """AdsServer whose stream writer notes when each `context.write` returned."""

    @staticmethod
    async def _write(context: grpc.aio.ServicerContext, queue: asyncio.Queue[bytes]) -> None:
        while True:
            data = await queue.get()
            await context.write(data)
            _WRITES.append(time.perf_counter())


def version_index(version: str) -> int:
    head = version.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


@dataclass
class AckWatch:
    """Tracker observer: the perf_counter time of each node's EDS ACK of one target version."""

    expected: int
    target: int = -1
    acks: dict[str, float] = field(default_factory=dict)
    sends: dict[str, float] = field(default_factory=dict)
    nacks: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def arm(self, target: int) -> None:
        self.target, self.acks, self.sends = target, {}, {}
        self.done = asyncio.Event()

    def on_connect(self, record: ProxyRecord) -> None:
        pass

    def on_disconnect(self, record: ProxyRecord) -> None:
        pass

    def on_send(self, record: ProxyRecord, send: Send) -> None:
        if send.type_url == R.ENDPOINT and version_index(send.version) == self.target:
            self.sends[record.node.id] = time.perf_counter()

    def on_ack(self, record: ProxyRecord, ack: Acked, latency: float | None) -> None:
        if ack.type_url == R.ENDPOINT and version_index(ack.version) == self.target:
            self.acks.setdefault(record.node.id, time.perf_counter())
            if len(self.acks) >= self.expected:
                self.done.set()

    def on_nack(self, record: ProxyRecord, nack: Nacked) -> None:
        self.nacks.append(f"{record.node.id}: {nack.error}")


async def wait_for(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return False


@dataclass
class Round:
    t0_wall: float
    build: float  # seconds to build and encode the snapshot (before t0, not in the latency)
    set_snapshot: float  # seconds spent inside cache.set_snapshot
    writes: list[float]  # per write: seconds from t0 to context.write returning
    acks: dict[str, float]  # node id -> seconds from t0 to ACK processed
    cpu: float  # CPU seconds of this process (all threads) from t0 to the last ACK


async def run_mode(
    n: int, delta: bool, rounds: int, envoy_log: bool, gap: float, profiler: cProfile.Profile | None = None
) -> dict[str, Any]:
    cache = SnapshotCache()
    tracker = ProxyTracker("bench")
    watch = AckWatch(expected=n)
    tracker.observers.append(watch)
    server = TimedAdsServer(cache, tracker, "bench", limits=BENCH_LIMITS)
    port = await server.start("127.0.0.1", 0)
    listen_ports = [common.free_port()]
    backends = (19001, 19002)
    cache.set_snapshot("", common.build_snapshot(1, listen_ports, backends[0]))
    envoys = [
        common.start_envoy(f"envoy{i}", port, delta, base, debug_config_log=envoy_log)
        for i, base in enumerate(common.base_ids(n))
    ]
    results: list[Round] = []
    try:
        ok = await wait_for(
            lambda: len(tracker.connected()) >= n and all(r.synced(1) for r in tracker.connected()), 60.0
        )
        if not ok:
            dead = [e.node_id for e in envoys if e.process.poll() is not None]
            raise RuntimeError(f"Envoys not synced after 60 s (exited: {dead}); logs in {envoys[0].workdir}")
        await asyncio.sleep(0.5)  # let Envoy finish its warm-up (first listener, stats flush)
        for i in range(rounds):
            version = 2 + i
            tb = time.perf_counter()
            snap = common.build_snapshot(version, listen_ports, backends[(i + 1) % 2])  # built before t0
            build = time.perf_counter() - tb
            watch.arm(version)
            _WRITES.clear()
            t0_wall = time.time()
            c0 = common.cpu_seconds()
            if profiler is not None:
                profiler.enable()
            t0 = time.perf_counter()
            cache.set_snapshot("", snap)
            t1 = time.perf_counter()
            try:
                await asyncio.wait_for(watch.done.wait(), 5.0)
            except TimeoutError:
                print(f"round {i}: only {len(watch.acks)}/{n} ACKs after 5 s; NACKs: {watch.nacks[-3:]}")
            if profiler is not None:
                profiler.disable()
            cpu = common.cpu_seconds() - c0
            results.append(
                Round(t0_wall, build, t1 - t0, [w - t0 for w in _WRITES], {k: v - t0 for k, v in watch.acks.items()}, cpu)
            )
            await asyncio.sleep(gap)
    finally:
        for e in envoys:
            e.stop()
        await server.stop(0.5)
    summary = summarise(results, n)
    summary["mode"] = "delta" if delta else "sotw"
    summary["envoys"] = n
    if envoy_log:
        summary["envoy_log"] = envoy_breakdown(results, envoys)
    return summary


def summarise(results: list[Round], n: int) -> dict[str, Any]:
    per_envoy = [v for r in results for v in r.acks.values()]
    alls = [max(r.acks.values()) for r in results if len(r.acks) == n]
    writes_first = [min(r.writes) for r in results if r.writes]
    writes_last = [max(r.writes) for r in results if r.writes]
    setsnap = [r.set_snapshot for r in results]
    return {
        "rounds": len(results),
        "complete_rounds": len(alls),
        "ack_p50": common.percentile(per_envoy, 50),
        "ack_p99": common.percentile(per_envoy, 99),
        "ack_max": max(per_envoy) if per_envoy else math.nan,
        "all_p50": common.percentile(alls, 50),
        "all_p99": common.percentile(alls, 99),
        "set_snapshot_p50": common.percentile(setsnap, 50),
        "build_p50": common.percentile([r.build for r in results], 50),
        "cpu_p50": common.percentile([r.cpu for r in results], 50),
        "write_first_p50": common.percentile(writes_first, 50),
        "write_last_p50": common.percentile(writes_last, 50),
        "ack_mean": statistics.fmean(per_envoy) if per_envoy else math.nan,
    }


def envoy_breakdown(results: list[Round], envoys: list[common.EnvoyProc]) -> dict[str, Any]:
    """Line the rounds up with Envoy's own log: when it had the EDS response and when it
    sent the ACK (config:debug lines), relative to t0 (wall clock, microseconds)."""
    recv: list[float] = []
    acked: list[float] = []
    for env in envoys[:1]:  # the first Envoy is enough for the breakdown
        events = common.envoy_log_events(env.log_path)
        for r in results:
            window = [(t - r.t0_wall, msg) for t, msg in events if 0 <= t - r.t0_wall < 1.0]
            eds = [(dt, msg) for dt, msg in window if "ClusterLoadAssignment" in msg]
            got = [dt for dt, msg in eds if msg.startswith(("Received gRPC message", "Received DeltaDiscoveryResponse"))]
            # Envoy sends the ACK right after accepting (its debug level has no line for the send).
            sent = [dt for dt, msg in eds if msg.startswith(("gRPC config for", "Delta config for")) and "accepted" in msg]
            if got:
                recv.append(got[0])
            if sent:
                acked.append(sent[0])
    return {
        "samples": len(recv),
        "recv_p50": common.percentile(recv, 50),
        "recv_p99": common.percentile(recv, 99),
        "ack_sent_p50": common.percentile(acked, 50),
        "ack_sent_p99": common.percentile(acked, 99),
        "log_dir": str(envoys[0].workdir),
    }


def table(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | Envoys | rounds | per-Envoy ACK p50 | p99 | max | all ACKed p50 | all p99 "
        "| set_snapshot p50 | first write done p50 | last write done p50 | server CPU per round p50 "
        "| (Snapshot.build p50) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['mode']} | {s['envoys']} | {s['complete_rounds']}/{s['rounds']} | {common.ms(s['ack_p50'])} "
            f"| {common.ms(s['ack_p99'])} | {common.ms(s['ack_max'])} | {common.ms(s['all_p50'])} "
            f"| {common.ms(s['all_p99'])} | {common.ms(s['set_snapshot_p50'])} "
            f"| {common.ms(s['write_first_p50'])} | {common.ms(s['write_last_p50'])} "
            f"| {common.ms(s['cpu_p50'])} | {common.ms(s['build_p50'])} |"
        )
    lines.append("")
    lines.append("All figures in ms from just before `cache.set_snapshot`.")
    logs = [s for s in summaries if "envoy_log" in s]
    if logs:
        lines += [
            "",
            "Envoy's own log (first Envoy, `config:debug`, µs timestamps), ms from t0:",
            "",
            "| mode | Envoys | Envoy received EDS p50 | p99 | Envoy accepted (ACK sent) p50 | p99 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in logs:
            e = s["envoy_log"]
            lines.append(
                f"| {s['mode']} | {s['envoys']} | {common.ms(e['recv_p50'])} | {common.ms(e['recv_p99'])} "
                f"| {common.ms(e['ack_sent_p50'])} | {common.ms(e['ack_sent_p99'])} |"
            )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envoys", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--modes", nargs="+", choices=["sotw", "delta"], default=["sotw", "delta"])
    parser.add_argument("--gap", type=float, default=0.05, help="pause between rounds (s)")
    parser.add_argument("--envoy-log", action="store_true", help="run Envoy with config:debug and use its log")
    parser.add_argument("--profile", type=Path, help="cProfile the timed rounds; write the top functions here")
    parser.add_argument("--fast-parse", action="store_true", help="experiment (SotW): wire-scan request parser")
    parser.add_argument("--ack-fast", action="store_true", help="experiment (SotW): no full _sync on a pure EDS ACK")
    parser.add_argument("--json", type=Path, help="also write the summaries as JSON here")
    args = parser.parse_args()
    print(common.machine())
    if args.fast_parse or args.ack_fast:
        import xds_fanout

        import repstage_mesh.xds.server as xds_server

        if args.fast_parse:
            xds_server.parse_sotw = xds_fanout.fast_parse_sotw
        if args.ack_fast:
            xds_server.SotwStream = xds_fanout.ack_fast_stream_class()  # type: ignore[misc,assignment]
    summaries = []
    for n in args.envoys:
        for mode in args.modes:
            profiler = cProfile.Profile() if args.profile else None
            s = await run_mode(n, mode == "delta", args.rounds, args.envoy_log, args.gap, profiler)
            if profiler is not None and args.profile:
                args.profile.parent.mkdir(parents=True, exist_ok=True)
                with open(args.profile.with_suffix(f".{mode}.{n}.txt"), "w") as f:
                    pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(30)
            summaries.append(s)
            print(json.dumps({k: v for k, v in s.items()}, default=str))
    print(table(summaries))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summaries, indent=1, default=str))


if __name__ == "__main__":
    asyncio.run(main())
