"""What failover tracing costs on the push -> ACK path, on and off.

Two measurements, both in this process, no sockets on the xDS side:

1. Hot-path calls with tracing OFF (no endpoint: no SDK provider, no-op objects), 1e5 calls
   each, next to an empty method call: `PushTracer.on_ack` (what every ACK pays once the
   tracer is attached), `PushTracer.begin` with no trace context, and a whole
   `start_failover` + 4 phases + `context()` + `end()` (once per failover, not hot).

2. Push -> ACK bookkeeping per 1,000 ACK events: N simulated SotW proxies (the real
   sans-IO protocol and ProxyTracker, with MeshMetrics attached as in a node) each receive
   one changed EDS resource and ACK it; timed from the snapshot update to the last ACK
   recorded. Variants: no PushTracer attached; PushTracer attached with tracing off; tracing
   on (a push span with one "ack" event per proxy, exported over OTLP gRPC to a real receiver
   on loopback: integration/otlp_receiver.py). Export runs on the BatchSpanProcessor thread;
   the flush after each round is timed separately.

Usage: .venv/bin/python bench/tracing_overhead.py [--proxies 1000] [--rounds 15] [--calls 100000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from integration.fake_proxies import FakeProxy, snapshot
from integration.otlp_receiver import OtlpReceiver
from repstage_mesh.config import TelemetryConfig
from repstage_mesh.telemetry import Tracing
from repstage_mesh.telemetry.metrics import MeshMetrics
from repstage_mesh.xds.protocol import Acked
from repstage_mesh.xds.tracker import ProxyTracker


def per_call_ns(fn: Callable[[], object], calls: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


class _Empty:
    def on_ack(self, record: object, ack: object, latency: object) -> None:
        pass


def off_calls(calls: int) -> list[tuple[str, float]]:
    tracing = Tracing.setup(TelemetryConfig(), "cp-1")
    assert not tracing.enabled
    pushes = tracing.push_tracer()
    tracker = ProxyTracker("cp-1")
    proxy = FakeProxy(tracker, 1, "envoy-1")
    proxy.connect(snapshot(1))
    record = tracker.records[1]
    ack = Acked("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", "2-ab", "1")
    empty = _Empty()

    def failover() -> None:
        ft = tracing.start_failover("db", old="a", new="b", cause="primary_down", mode="follow")
        ft.record("detection", start=0.0, end=1.0)
        for name in ("decision", "raft.commit", "promotion"):
            with ft.child(name):
                pass
        ft.context()
        ft.end()

    return [
        ("empty method call (reference)", per_call_ns(lambda: empty.on_ack(record, ack, 0.001), calls)),
        ("PushTracer.on_ack, tracing off", per_call_ns(lambda: pushes.on_ack(record, ack, 0.001), calls)),
        ("PushTracer.begin(no context), off", per_call_ns(lambda: pushes.begin(2, None), calls)),
        ("whole failover trace API, off", per_call_ns(failover, calls // 10)),
    ]


class Variant:
    """One fleet of N simulated proxies on its own tracker, with or without a PushTracer."""

    def __init__(self, mode: str, proxies: int, endpoint: str | None) -> None:
        self.mode = mode
        self.tracing = Tracing.setup(TelemetryConfig(otlp_endpoint=endpoint if mode == "on" else None), "cp-1")
        self.tracker = ProxyTracker("cp-1")
        self.tracker.observers.append(MeshMetrics(CollectorRegistry(), "cp-1"))
        self.pushes = self.tracing.push_tracer()
        if mode != "none":
            self.pushes.attach(self.tracker)
        self.fleet = [FakeProxy(self.tracker, i, f"envoy-{i}") for i in range(1, proxies + 1)]
        snap = snapshot(1, "m0")
        for p in self.fleet:
            p.connect(snap)
            p.respond()
        self.ft = self.tracing.start_failover("db", old="a", new="b", cause="bench", mode="follow")
        self.times: list[float] = []
        self.flushes: list[float] = []
        self.acks = 0

    def round(self, version: int) -> None:
        snap = snapshot(version, f"m{version}")
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            for p in self.fleet:
                p.update(snap)
            self.pushes.begin(version, self.ft.context(), timeout=30.0)
            for p in self.fleet:
                self.acks += p.respond()
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        assert self.pushes.open_pushes() == 0
        self.times.append(elapsed * 1e3 * 1000 / len(self.fleet))
        t0 = time.perf_counter()
        self.tracing.flush(30.0)
        self.flushes.append((time.perf_counter() - t0) * 1e3)

    def close(self) -> None:
        self.ft.end()
        self.tracing.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()

    print(f"## hot-path calls with tracing off ({args.calls:,} calls, best of 5)\n")
    print("| call | ns per call |\n| --- | --- |")
    for name, ns in off_calls(args.calls):
        print(f"| {name} | {ns:.0f} |")

    print(f"\n## push -> ACK bookkeeping, {args.proxies} SotW proxies x {args.rounds} rounds "
          "(ms per 1,000 ACK events; median / p90 over rounds)\n")
    print("| variant | median | p90 | flush after round (median ms) |\n| --- | --- | --- | --- |")
    with OtlpReceiver() as receiver:
        labels = {"none": "no PushTracer attached", "off": "PushTracer attached, tracing off",
                  "on": "tracing on, OTLP gRPC to receiver"}
        variants = [Variant(mode, args.proxies, receiver.endpoint) for mode in labels]
        for r in range(args.rounds):  # interleaved, so drift on a shared machine hits all alike
            for variant in variants:
                variant.round(r + 2)
        for variant in variants:
            variant.close()
            assert variant.acks == args.proxies * args.rounds
            times = variant.times
            p90 = sorted(times)[int(0.9 * (len(times) - 1))]
            print(f"| {labels[variant.mode]} | {statistics.median(times):.2f} | {p90:.2f} "
                  f"| {statistics.median(variant.flushes):.1f} |")
        spans = receiver.wait_for(lambda s: sum(1 for x in s if x.name == "push") >= args.rounds, 30.0)
        events = sum(len(s.events) for s in spans if s.name == "push")
        print(f"\nreceiver got {sum(1 for s in spans if s.name == 'push')} push spans with {events} ack events "
              f"(expected {args.rounds} and {args.rounds * args.proxies})")


if __name__ == "__main__":
    main()
