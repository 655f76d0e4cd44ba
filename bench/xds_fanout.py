"""Fan-out: many simulated ADS clients on ONE AdsServer, one change, time until all ACKed.

Three kinds of process (this file runs as each, by --role):

- server: an AdsServer (SotW and Delta) in its own process, so its RSS and CPU are its own.
  Driven over stdin/stdout with JSON lines: it waits for N synced streams, reports its RSS,
  and on `push` swaps the endpoint port of one ClusterLoadAssignment (built before t0) and
  times, from just before `cache.set_snapshot`, each stream's EDS ACK (a ProxyTracker
  observer's on_ack, no polling), the last `context.write` returning, and its CPU seconds.
- client (one or more processes): grpcio aio stubs holding M streams over M/C channels
  (`--per-channel C`, each channel its own TCP connection). Each stream sends the initial
  CDS, EDS (naming the clusters) and LDS requests with a node id, ACKs every response with
  its version and nonce (EDS ACKs name the clusters again, as Envoy does) and records when it
  received each EDS response. Responses are parsed minimally: a hand-written scan of the
  top-level fields version/type_url/nonce (`--parse betterproto` uses betterproto2's
  DiscoveryResponse.parse instead, to show its cost).
- the driver (default): for each stream count starts a server and the clients, waits until
  every stream is synced, pushes `--pushes` times, and prints/records a table.

Clocks: every process uses time.monotonic() (CLOCK_MONOTONIC, one clock for the machine).

Usage: .venv/bin/python bench/xds_fanout.py [--streams 1000 5000 10000] [--clients 2]
       [--per-channel 100] [--pushes 3] [--services 1] [--delta] [--plot]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import math
import os
import pstats
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import grpc
import grpc.aio
from h2_ads_client import H2Client, H2Stream

from repstage_mesh.xds import resources as R
from repstage_mesh.xds import wire
from repstage_mesh.xds.cache import SnapshotCache
from repstage_mesh.xds.limits import XdsLimits
from repstage_mesh.xds.protocol import Acked, Nacked, Send
from repstage_mesh.xds.server import AdsServer
from repstage_mesh.xds.tracker import ProxyRecord, ProxyTracker
from repstage_mesh.xds.workers import WorkerPool

# Thousands of simulated proxies share one address here: lift the per-peer stream limit.
BENCH_LIMITS = XdsLimits(max_streams_per_peer=100_000, max_streams=100_000)

SOTW_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
TYPES = (R.CLUSTER, R.ENDPOINT, R.LISTENER)


def version_index(version: str) -> int:
    head = version.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


# ============================================================ server process ===================

_WRITE_DONE: list[float] = [0.0]  # monotonic time the latest context.write returned


class TimedAdsServer(AdsServer):
    """AdsServer whose stream writer notes when the latest `context.write` returned."""

    @staticmethod
    async def _write(context: grpc.aio.ServicerContext, queue: asyncio.Queue[bytes]) -> None:
        while True:
            data = await queue.get()
            await context.write(data)
            _WRITE_DONE[0] = time.monotonic()


@dataclass
class EdsAckWatch:
    target: int = -1
    t0: float = 0.0
    acks: list[float] = field(default_factory=list)
    nacks: int = 0
    expected: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def arm(self, target: int, expected: int) -> None:
        self.target, self.expected, self.acks, self.nacks = target, expected, [], 0
        self.done = asyncio.Event()

    def on_connect(self, record: ProxyRecord) -> None:
        pass

    def on_disconnect(self, record: ProxyRecord) -> None:
        pass

    def on_send(self, record: ProxyRecord, send: Send) -> None:
        pass

    def on_ack(self, record: ProxyRecord, ack: Acked, latency: float | None) -> None:
        if ack.type_url == R.ENDPOINT and version_index(ack.version) == self.target:
            self.acks.append(time.monotonic())
            if len(self.acks) >= self.expected:
                self.done.set()

    def on_nack(self, record: ProxyRecord, nack: Nacked) -> None:
        self.nacks += 1


def _rss_all(pool: WorkerPool | None) -> int:
    """The server's RSS: the node process and, with --workers, every worker process."""
    return common.rss_bytes() + sum(common.rss_bytes(pid) for pid in (pool.pids() if pool else []))


def _cpu_all(pool: WorkerPool | None) -> float:
    return time.process_time() + sum(proc_cpu_seconds(pid) for pid in (pool.pids() if pool else []))


async def serve(
    services: int, profile: Path | None, options: list[str], fast_parse: bool, gc_freeze: bool, ack_fast: bool,
    listen_port: int = 0, first_version: int = 1, workers: int = 0, transport: str = "h2",
) -> None:
    import repstage_mesh.xds.server as xds_server

    if ack_fast:
        xds_server.SotwStream = ack_fast_stream_class()  # type: ignore[misc,assignment]

    if fast_parse:
        xds_server.parse_sotw = fast_parse_sotw

    for opt in options:  # an experiment: extra grpc server options, without editing xds/
        key, _, value = opt.partition("=")
        xds_server._GRPC_OPTIONS.append((key, int(value)))
    cache = SnapshotCache()
    tracker = ProxyTracker("bench")
    watch = EdsAckWatch()
    tracker.observers.append(watch)
    listen_ports = [20000 + i for i in range(services)]  # never bound: no Envoy here
    version = first_version  # a restarted server (--restart) renders what the old one last had
    cache.set_snapshot("", common.build_snapshot(version, listen_ports, 19001 + version % 2))
    # --workers N: the node's WorkerPool (xds.workers); the ACKs are seen as the node sees them
    pool = WorkerPool(workers, cache, tracker, "bench", limits=BENCH_LIMITS, transport=transport) if workers else None
    server = pool or TimedAdsServer(cache, tracker, "bench", limits=BENCH_LIMITS, transport=transport)
    port = await server.start("127.0.0.1", listen_port)
    started_at = time.monotonic()
    gc.collect()
    out = sys.stdout

    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    say({"port": port, "pid": os.getpid(), "rss": _rss_all(pool)})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd = json.loads(line)
            if cmd["cmd"] == "wait_synced":
                # Cheap polling (a count) first: checking every stream's sync state costs the
                # server ~30 µs a stream, which would slow down the very thing being measured.
                n, deadline = cmd["n"], time.monotonic() + cmd["timeout"]
                while time.monotonic() < deadline and len(tracker.connected()) < n:
                    await asyncio.sleep(0.2)
                all_connected = time.monotonic()
                while time.monotonic() < deadline:
                    if all(r.synced(version) for r in tracker.connected()):
                        break
                    await asyncio.sleep(0.25)
                connected = tracker.connected()
                synced = sum(1 for r in connected if r.synced(version))
                gc.collect()
                if gc_freeze:  # experiment: long-lived stream state out of the collector's way
                    gc.freeze()
                say({"connected": len(connected), "synced": synced, "rss": _rss_all(pool),
                     "all_connected_at": all_connected, "synced_at": time.monotonic(), "started_at": started_at})
            elif cmd["cmd"] == "push":
                version += 1
                snap = common.build_snapshot(version, listen_ports, 19001 + version % 2)  # before t0
                expected = len(tracker.connected())
                watch.arm(version, expected)
                profiler = cProfile.Profile() if profile else None
                c0, n0 = _cpu_all(pool), time.process_time()
                if profiler is not None:
                    profiler.enable()
                t0 = time.monotonic()
                cache.set_snapshot("", snap)
                t1 = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.done.wait(), cmd["timeout"])
                t_end = time.monotonic()
                if profiler is not None and profile is not None:
                    profiler.disable()
                    with open(profile, "w") as f:
                        pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(40)
                cpu, node_cpu = _cpu_all(pool) - c0, time.process_time() - n0
                say({
                    "version": version, "t0": t0, "set_snapshot": t1 - t0, "expected": expected,
                    "acks": [a - t0 for a in watch.acks], "nacks": watch.nacks,
                    # only the in-process grpc transport records it (not workers, not h2)
                    "last_write": _WRITE_DONE[0] - t0 if _WRITE_DONE[0] >= t0 else math.nan, "cpu": cpu, "node_cpu": node_cpu, "wall": t_end - t0,
                    "rss": _rss_all(pool),
                })
            elif cmd["cmd"] == "quit":
                return
    finally:
        await server.stop(0)


def fast_parse_sotw(data: bytes, *_limits: Any) -> Any:
    """Experiment (--fast-parse): the server's parse_sotw done by a wire scan instead of
    betterproto2's DiscoveryRequest.parse (which builds a pydantic validator per message).
    Node and error_detail are still parsed with betterproto2, only when present."""
    from envoy_data_plane.envoy.config.core.v3 import Node
    from envoy_data_plane.google.rpc import Status

    import repstage_mesh.xds.server as xds_server
    from repstage_mesh.xds.protocol import SotwRequest

    version = type_url = nonce = ""
    names: list[str] = []
    node = error = None
    i, n = 0, len(data)
    while i < n:
        key = 0
        shift = 0
        while True:
            b = data[i]
            i += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        number, wtype = key >> 3, key & 7
        if wtype != 2:
            raise ValueError(f"unexpected wire type {wtype}")
        length = 0
        shift = 0
        while True:
            b = data[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        chunk = data[i:i + length]
        i += length
        if number == 1:
            version = chunk.decode()
        elif number == 2:
            node = xds_server.node_info(Node.parse(chunk))
        elif number == 3:
            names.append(chunk.decode())
        elif number == 4:
            type_url = chunk.decode()
        elif number == 5:
            nonce = chunk.decode()
        elif number == 6:
            st = Status.parse(chunk)
            error = st.message or f"code {st.code}"
    return SotwRequest(type_url, version, nonce, tuple(names), error, node)


def ack_fast_stream_class() -> type:
    """Experiment (--ack-fast): a SotwStream that, on a pure EDS ACK (the latest nonce, no
    error, the same names), records the ACK without re-running _sync over every type: an EDS
    ACK cannot change what any type should hold (references and gating go through clusters,
    listeners and routes), so _sync would find nothing to send."""
    from repstage_mesh.xds.protocol import SotwRequest, SotwStream

    class AckFastSotwStream(SotwStream):
        def receive(self, request: SotwRequest) -> list[Any]:
            state = self.types.get(request.type_url)
            if (
                request.type_url == R.ENDPOINT and state is not None and request.error is None
                and request.response_nonce and request.response_nonce == state.last_nonce
                and request.response_nonce in state.pending
            ):
                names = set(request.resource_names)
                if names - {"*"} == state.names and ("*" in names) == state.wildcard:
                    pending = state.pending.pop(request.response_nonce)
                    state.acked = pending.resources
                    state.acked_version = pending.version
                    return [Acked(request.type_url, pending.version, pending.nonce)]
            return super().receive(request)

    return AckFastSotwStream


# ============================================================ client process ===================


def scan_response(data: bytes, delta: bool) -> tuple[str, str, str]:
    """(version, type_url, nonce) of a (Delta)DiscoveryResponse, reading only top-level fields
    and skipping the resources' bytes."""
    version = type_url = nonce = ""
    i, n = 0, len(data)
    while i < n:
        key = 0
        shift = 0
        while True:
            b = data[i]
            i += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        number, wtype = key >> 3, key & 7
        if wtype == 2:
            length = 0
            shift = 0
            while True:
                b = data[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            if number == 1:
                version = data[i:i + length].decode()
            elif number == 4:
                type_url = data[i:i + length].decode()
            elif number == 5:
                nonce = data[i:i + length].decode()
            i += length
        elif wtype == 0:
            while data[i] & 0x80:
                i += 1
            i += 1
        else:
            raise ValueError(f"unexpected wire type {wtype} in response")
    return version, type_url, nonce


def parse_betterproto(data: bytes, delta: bool) -> tuple[str, str, str]:
    from envoy_data_plane.envoy.service.discovery.v3 import (
        DeltaDiscoveryResponse,
        DiscoveryResponse,
    )

    if delta:
        d = DeltaDiscoveryResponse.parse(data)
        return d.system_version_info, d.type_url, d.nonce
    m = DiscoveryResponse.parse(data)
    return m.version_info, m.type_url, m.nonce


def sotw_request(type_url: str, names: Iterable[str], version: str = "", nonce: str = "", node_id: str = "") -> bytes:
    """DiscoveryRequest{version_info=1, node=2, resource_names=3, type_url=4, response_nonce=5}."""
    parts = [wire.string_field(1, version)]
    if node_id:
        parts.append(wire.field(2, wire.string_field(1, node_id) + wire.string_field(2, "bench")))
    parts.extend(wire.string_field(3, name) for name in names)
    parts.append(wire.string_field(4, type_url))
    parts.append(wire.string_field(5, nonce))
    return b"".join(parts)


def delta_request(type_url: str, subscribe: Iterable[str] = (), nonce: str = "", node_id: str = "") -> bytes:
    """DeltaDiscoveryRequest{node=1, type_url=2, resource_names_subscribe=3, response_nonce=6}."""
    parts = []
    if node_id:
        parts.append(wire.field(1, wire.string_field(1, node_id) + wire.string_field(2, "bench")))
    parts.append(wire.string_field(2, type_url))
    parts.extend(wire.string_field(3, name) for name in subscribe)
    parts.append(wire.string_field(6, nonce))
    return b"".join(parts)


@dataclass
class StreamState:
    eds_version: int = -1
    eds_received: float = 0.0
    initial: set[str] = field(default_factory=set)
    retries: int = 0
    last_error: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # type -> the version it ACKed last
    reconnects: int = 0  # streams re-opened after the config was complete (server gone)
    reconnect_failures: int = 0  # re-opened streams that failed again (refused, cancelled)
    failed_at: list[float] = field(default_factory=list)  # when (time.monotonic())


async def run_stream(
    channel: grpc.aio.Channel, node_id: str, names: list[str], delta: bool, parse: Any,
    state: StreamState, ready: asyncio.Event, counter: list[int], total: int,
) -> None:
    """One ADS stream; like Envoy, it opens a new stream when the server ends it before the
    first responses came (back-off 0.25 s doubling to 2 s), and counts those retries."""
    backoff = 0.25
    while True:
        try:
            await ads_stream(channel, node_id, names, delta, parse, state, ready, counter, total)
            return
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            if len(state.initial) == len(TYPES):
                # Like Envoy: come back at once (the channel waits for the server), with the
                # versions held; a failure of that new stream counts as a reconnect failure.
                if state.reconnects and state.versions.get("reopened") == "1":
                    state.reconnect_failures += 1
                    state.failed_at.append(time.monotonic())
                state.reconnects += 1
                state.versions["reopened"] = "1"
                continue
            state.retries += 1
            state.last_error = (
                f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def opening_requests(node_id: str, names: list[str], delta: bool, state: StreamState) -> list[bytes]:
    """A stream's first requests, one per type (the node id in the first; held versions)."""
    return [
        delta_request(t, names if t == R.ENDPOINT else [], node_id=node_id if k == 0 else "") if delta
        else sotw_request(t, names if t == R.ENDPOINT else [], state.versions.get(t, ""), node_id=node_id if k == 0 else "")
        for k, t in enumerate(TYPES)
    ]


def take_response(
    data: bytes, names: list[str], delta: bool, parse: Any, state: StreamState, ready: asyncio.Event,
    counter: list[int], total: int,
) -> bytes:
    """Record a response (its version; when EDS arrived) and return its ACK."""
    now = time.monotonic()
    version, type_url, nonce = parse(data, delta)
    state.versions[type_url] = version
    state.versions["reopened"] = "0"  # the re-opened stream works
    if type_url == R.ENDPOINT:
        state.eds_version, state.eds_received = version_index(version), now
    if len(state.initial) < len(TYPES):
        state.initial.add(type_url)
        if len(state.initial) == len(TYPES):
            counter[0] += 1
            if counter[0] >= total:
                ready.set()
    if delta:
        return delta_request(type_url, nonce=nonce)
    return sotw_request(type_url, names if type_url == R.ENDPOINT else (), version, nonce)


async def ads_stream(
    channel: grpc.aio.Channel, node_id: str, names: list[str], delta: bool, parse: Any,
    state: StreamState, ready: asyncio.Event, counter: list[int], total: int,
) -> None:
    call = channel.stream_stream(DELTA_METHOD if delta else SOTW_METHOD)(wait_for_ready=bool(state.reconnects))
    for request in opening_requests(node_id, names, delta, state):
        await call.write(request)
    while True:
        data = await call.read()
        if data is grpc.aio.EOF:
            return
        await call.write(take_response(data, names, delta, parse, state, ready, counter, total))


def h2_client(
    port: int, states: list[StreamState], per_channel: int, names: list[str], delta: bool, parse: Any, cid: int,
    ready: asyncio.Event, counter: list[int],
) -> H2Client:
    """The same streams as run_stream's, on bench/h2_ads_client.py (`--client h2`)."""
    total = len(states)

    def first_requests(stream: H2Stream) -> list[bytes]:
        return opening_requests(stream.node_id, names, delta, stream.state)

    def answer(stream: H2Stream, data: bytes) -> bytes:
        return take_response(data, names, delta, parse, stream.state, ready, counter, total)

    streams = [H2Stream(f"c{cid}-{i}", st) for i, st in enumerate(states)]
    return H2Client(port, streams, per_channel, TYPES, DELTA_METHOD if delta else SOTW_METHOD, first_requests, answer)


async def client(
    port: int, streams: int, per_channel: int, services: int, delta: bool, parse_name: str, cid: int, kind: str,
) -> None:
    parse = parse_betterproto if parse_name == "betterproto" else scan_response
    names = common.service_names(services)
    states = [StreamState() for _ in range(streams)]
    ready = asyncio.Event()
    counter = [0]
    out = sys.stdout
    lean = h2_client(port, states, per_channel, names, delta, parse, cid, ready, counter) if kind == "h2" else None
    opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    channels = [] if lean is not None else [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts)
        for _ in range(math.ceil(streams / per_channel))
    ]

    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    t_start = time.monotonic()
    tasks = [] if lean is not None else [
        asyncio.create_task(
            run_stream(channels[i // per_channel], f"c{cid}-{i}", names, delta, parse, states[i], ready, counter, streams)
        )
        for i in range(streams)
    ]
    if lean is not None:
        await lean.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ready.wait(), float(os.environ.get("FANOUT_READY_TIMEOUT", "120")))
    hist = [0] * (len(TYPES) + 1)
    for st in states:
        hist[len(st.initial)] += 1
    errors = [repr(t.exception())[:1500] for t in tasks if t.done() and not t.cancelled() and t.exception()]
    errors += lean.errors if lean is not None else []
    say({"ready": counter[0], "connect_s": time.monotonic() - t_start, "rss": common.rss_bytes(),
         "types_received_histogram": hist, "errors": errors[:3], "failed": len(errors),
         "retries": sum(st.retries for st in states), "streams_retried": sum(1 for st in states if st.retries),
         "retry_errors": sorted({st.last_error for st in states if st.last_error})[:3]})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    c0 = time.process_time()
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            if cmd["cmd"] == "mark":
                c0 = time.process_time()
                say({"marked": True})
            elif cmd["cmd"] == "report":
                target = cmd["version"]
                got = [s.eds_received for s in states if s.eds_version >= target]
                say({"received": got, "cpu": time.process_time() - c0, "failed": sum(t.done() for t in tasks)})
            elif cmd["cmd"] == "reconnects":
                say({"reconnects": sum(s.reconnects for s in states),
                     "reconnect_failures": sum(s.reconnect_failures for s in states),
                     # the old server's workers stop one after the other: a stream re-opened
                     # at once may land on one still stopping; these failed on the new server
                     "failures_on_new": sum(1 for s in states for t in s.failed_at if t > cmd["exited"]),
                     "responses_after": sum(1 for s in states if s.eds_received > cmd["since"]),
                     "failed": sum(t.done() for t in tasks)})
            elif cmd["cmd"] == "quit":
                break
    finally:
        if lean is not None:
            lean.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close(None)


# ============================================================ micro (no sockets) ==============


def micro(n: int, services: int) -> str:
    """The server's per-stream CPU for one push, piece by piece, without gRPC: n SotwStreams
    synced at version 1, then update(snapshot 2), frame, parse the ACK, receive the ACK, and
    the tracker's bookkeeping. CPU time (time.process_time), so other load on the machine
    does not count. Also the clients' parse of a response."""
    from repstage_mesh.xds.server import frame, parse_sotw

    names = common.service_names(services)
    ports = [20000 + i for i in range(services)]
    snap1 = common.build_snapshot(1, ports, 19002)
    snap2 = common.build_snapshot(2, ports, 19001)

    def synced_streams(cls: Any) -> list[Any]:
        out = []
        for _ in range(n):
            st = cls(snap1)
            acts = []
            for k, t in enumerate(TYPES):
                req = sotw_request(t, names if t == R.ENDPOINT else [], node_id="n" if k == 0 else "")
                acts += st.receive(parse_sotw(req))
            for _ in range(3):
                sends = [a for a in acts if isinstance(a, Send)]
                acts = []
                for a in sends:
                    req = sotw_request(a.type_url, names if a.type_url == R.ENDPOINT else [], a.version, a.nonce)
                    acts += st.receive(parse_sotw(req))
            out.append(st)
        return out

    def cpu(fn: Any, items: list[Any]) -> tuple[float, list[Any]]:
        gc.collect()
        c0 = time.process_time()
        res = [fn(x) for x in items]
        return (time.process_time() - c0) / len(items) * 1e6, res

    from repstage_mesh.xds.protocol import SotwStream

    rows: list[tuple[str, float]] = []
    streams = synced_streams(SotwStream)
    us, sends = cpu(lambda st: st.update(snap2), streams)
    rows.append(("protocol: stream.update(snapshot), first push after the streams synced", us))
    us, frames = cpu(lambda acts: frame(acts[0], "bench", False), sends)
    rows.append(("server.frame (SotW response bytes)", us))
    acks = [sotw_request(a[0].type_url, names, a[0].version, a[0].nonce) for a in sends]
    us, reqs = cpu(parse_sotw, acks)
    rows.append(("server.parse_sotw(ACK) (wire scan)", us))
    us, reqs2 = cpu(fast_parse_sotw, acks)
    rows.append((f"  experiment: fast_parse_sotw(ACK) (wire scan; same result: {reqs2 == reqs})", us))
    from repstage_mesh.xds.cache import SnapshotCache
    from repstage_mesh.xds.server import AdsServer

    reader = AdsServer(SnapshotCache(), ProxyTracker("bench"))
    us, _ = cpu(lambda sa: reader._read(sa[1], sa[0], parse_sotw), list(zip(streams, acks, strict=True)))
    rows.append(("server._read(ACK): limits checked, the same bytes as another stream's parsed once", us))
    us, _ = cpu(lambda sr: sr[0].receive(sr[1]), list(zip(streams, reqs, strict=True)))
    rows.append(("protocol: stream.receive(ACK) (a plain ACK: no sync)", us))
    snap3 = common.build_snapshot(3, ports, 19002)
    us, _ = cpu(lambda st: st.update(snap3), streams)
    rows.append(("protocol: stream.update(snapshot), the next push (unchanged types stay quiet)", us))
    slow_streams = synced_streams(SotwStream)
    for st in slow_streams:
        st.shortcuts = False  # the per-snapshot memo stays; the ACK fast path and quiet types go
    us, ssends = cpu(lambda st: st.update(snap2), slow_streams)
    rows.append(("  without SotwStream.shortcuts: stream.update(snapshot)", us))
    sreqs = [parse_sotw(sotw_request(a[0].type_url, names, a[0].version, a[0].nonce)) for a in ssends]
    us, res = cpu(lambda sr: sr[0].receive(sr[1]), list(zip(slow_streams, sreqs, strict=True)))
    rows.append((f"  without SotwStream.shortcuts: stream.receive(ACK) (full sync; {type(res[0][0]).__name__})", us))
    tracker = ProxyTracker("bench")
    from repstage_mesh.xds.protocol import NodeInfo

    for i, st in enumerate(streams):
        tracker.connect(i, NodeInfo(id=f"n{i}"), st)
    us, _ = cpu(lambda ia: tracker.record(ia[0], ia[1]), list(enumerate(sends)))
    rows.append(("tracker.record(Send)", us))
    rows += _micro_relay(synced_streams(SotwStream), snap2, names)
    rows += _micro_transport(acks, frames)
    us, _ = cpu(lambda f: scan_response(f, False), frames)
    rows.append(("client: scan_response (version/type/nonce only)", us))
    us, _ = cpu(lambda f: parse_betterproto(f, False), frames)
    rows.append(("client: betterproto2 DiscoveryResponse.parse", us))
    lines = [f"| per stream, {n} streams, {services} service(s) | µs CPU |", "|---|---:|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in rows]
    return "\n".join(lines)


def _micro_relay(streams: list[Any], snap: Any, names: list[str]) -> list[tuple[str, float]]:
    """A worker's bookkeeping per stream and push (relay.py), and the node's replay of it: the
    push's Send and the ACK, each recorded, drained into a frame (one mirror per stream) and
    replayed into the node's tracker."""
    from repstage_mesh.xds import relay
    from repstage_mesh.xds.protocol import NodeInfo
    from repstage_mesh.xds.server import parse_sotw

    batcher = relay.FactBatcher()
    worker = relay.ReportingTracker(batcher, control_plane="bench")
    node = ProxyTracker("bench")
    replay = relay.FactReplay(node)
    for i, st in enumerate(streams):
        worker.connect(i, NodeInfo(id=f"n{i}"), st)
    replay.apply(relay.FrameDecoder().feed(relay.encode(("facts", *batcher.drain(worker))))[0][1])
    rows: list[tuple[str, float]] = []
    sends = [st.update(snap) for st in streams]
    for label, actions in (("Send", sends), ("Acked", None)):
        if actions is None:
            actions = [st.receive(parse_sotw(sotw_request(a[0].type_url, names, a[0].version, a[0].nonce)))
                       for st, a in zip(streams, sends, strict=True)]
        gc.collect()
        c0 = time.process_time()
        for i, acts in enumerate(actions):
            worker.record(i, acts)
        c1 = time.process_time()
        facts, guards = batcher.drain(worker)
        c2 = time.process_time()
        frame = relay.encode(("facts", facts, guards))
        c3 = time.process_time()
        replay.apply(relay.FrameDecoder().feed(frame)[0][1])
        c4 = time.process_time()
        n = len(streams)
        rows += [(f"worker: ReportingTracker.record({label})", (c1 - c0) / n * 1e6),
                 (f"worker: FactBatcher.drain after {label} (the mirror)", (c2 - c1) / n * 1e6),
                 (f"worker: the frame to the node ({len(frame) / n:.0f} bytes per stream)", (c3 - c2) / n * 1e6),
                 (f"node: decode and FactReplay.apply ({label})", (c4 - c3) / n * 1e6)]
    return rows


def _micro_transport(acks: list[bytes], frames: list[bytes]) -> list[tuple[str, float]]:
    """The h2 transport's framing per stream and push, 100 streams on one connection: an ACK's
    DATA frame taken in and its window given back, and a response's DATA frame written, by h2
    (the transport before the ninth pass) and by xds/h2_raw.py (what it does now for open calls)."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    from repstage_mesh.xds.h2_raw import CONNECTION_WINDOW, STREAM_WINDOW, RawFraming

    def pair() -> tuple[Any, Any, list[int]]:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        for conn, is_client in ((client, True), (server, False)):
            conn.local_settings = h2.settings.Settings(
                client=is_client, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
            conn.initiate_connection()
            conn.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        for _ in range(2):
            server.receive_data(client.data_to_send())
            client.receive_data(server.data_to_send())
        sids = [client.get_next_available_stream_id() + 2 * i for i in range(100)]
        for sid in sids:
            client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a")])
        server.receive_data(client.data_to_send())
        for sid in sids:
            server.send_headers(sid, [(b":status", b"200")])
        client.receive_data(server.data_to_send())
        return client, server, sids

    prefix = struct.Struct(">BI")
    ack = prefix.pack(0, len(acks[0])) + acks[0]
    response = prefix.pack(0, len(frames[0])) + frames[0]
    rounds = 20
    rows: list[tuple[str, float]] = []
    for label in ("h2", "h2_raw"):
        client, server, sids = pair()
        raw = RawFraming(server)
        calls = {sid: type("Call", (), {"sid": sid, "raw_held": 0, "raw_unacked": 0})() for sid in sids}
        chunks = []
        for _ in range(rounds):
            for sid in sids:
                client.send_data(sid, ack)
            chunks.append(client.data_to_send())
        gc.collect()
        c0 = time.process_time()
        for chunk in chunks:
            if label == "h2":
                for event in server.receive_data(chunk):
                    if isinstance(event, h2.events.DataReceived):
                        server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                server.data_to_send()
            else:
                raw.receive(chunk, calls.get, server.receive_data, lambda call, data, raw=raw: raw.read(call))
                raw.take_output()
        c1 = time.process_time()
        for _ in range(rounds):
            for sid in sids:
                if label == "h2":
                    server.send_data(sid, response)
                else:
                    raw.send(sid, response)
            raw.take_output()
        c2 = time.process_time()
        count = rounds * len(sids)
        rows += [(f"transport ({label}): take in an ACK's DATA frame, give its window back", (c1 - c0) / count * 1e6),
                 (f"transport ({label}): write a response's DATA frame", (c2 - c1) / count * 1e6)]
    return rows


# ============================================================ driver ===========================


class Proc:
    """A child process spoken to in JSON lines over its stdin/stdout."""

    def __init__(self, args: list[str], name: str, log_dir: Path) -> None:
        self.name = name
        self.stderr = open(log_dir / f"{name}.stderr", "w")  # noqa: SIM115
        self.p = subprocess.Popen(
            [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True, bufsize=1,
        )

    def send(self, obj: dict[str, Any]) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(obj) + "\n")
        self.p.stdin.flush()

    def recv(self, timeout: float) -> dict[str, Any]:
        assert self.p.stdout is not None
        import select

        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{self.name}: no answer within {timeout} s (see {self.stderr.name})")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited (rc {self.p.poll()}); see {self.stderr.name}")
        return dict(json.loads(line))

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.p.wait(timeout=10)
            except Exception:
                self.p.kill()
                self.p.wait()
        self.stderr.close()


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_count(args: argparse.Namespace, streams: int, log_dir: Path) -> dict[str, Any]:
    common_args = ["--services", str(args.services)] + (["--delta"] if args.delta else [])
    prof = [f"--server-option={o}" for o in args.server_option] + (["--fast-parse"] if args.fast_parse else [])
    prof += ["--gc-freeze"] if args.gc_freeze else []
    prof += ["--ack-fast"] if args.ack_fast else []
    prof += ["--workers", str(args.workers)] if args.workers else []
    prof += ["--transport", args.transport]
    if args.profile_server:
        prof += ["--profile-server", str(args.profile_server.with_suffix(f".{streams}.txt"))]
    load = common.loadavg()
    server = Proc(["--role", "server", *common_args, *prof], f"server-{streams}", log_dir)
    clients: list[Proc] = []
    try:
        hello = server.recv(30)
        port, rss0 = hello["port"], hello["rss"]
        shares = [streams // args.clients + (1 if k < streams % args.clients else 0) for k in range(args.clients)]
        t_connect = time.monotonic()
        for k, share in enumerate(shares):
            clients.append(Proc(
                ["--role", "client", "--port", str(port), "--count", str(share), "--per-channel", str(args.per_channel),
                 "--parse", args.parse, "--cid", str(k), "--client", args.client, *common_args],
                f"client{k}-{streams}", log_dir,
            ))
        readies = [c.recv(150) for c in clients]
        server.send({"cmd": "wait_synced", "n": streams, "timeout": 60})
        synced = server.recv(90)
        connect_s = time.monotonic() - t_connect
        print(f"  {streams} streams: clients {readies}, server {synced}, {connect_s:.1f} s")
        pushes = []
        for _ in range(args.pushes):
            for c in clients:
                c.send({"cmd": "mark"})
                c.recv(10)
            server_cpu0 = proc_cpu_seconds(server.p.pid)
            server.send({"cmd": "push", "timeout": 30})
            res = server.recv(60)
            res["server_cpu_ticks"] = proc_cpu_seconds(server.p.pid) - server_cpu0
            received: list[float] = []
            client_cpu = []
            for c in clients:
                c.send({"cmd": "report", "version": res["version"]})
                rep = c.recv(30)
                received += [t - res["t0"] for t in rep["received"]]
                client_cpu.append(rep["cpu"])
            res["received"] = received
            res["client_cpu"] = client_cpu
            pushes.append(res)
            time.sleep(0.5)  # let the streams go quiet between pushes
        restart = restart_server(args, server, clients, port, streams, common_args, log_dir) if args.restart else None
        if restart is not None:
            server = restart.pop("server")
            print(f"  restart: {restart}")
        return {
            "restart": restart,
            "streams": streams, "clients": args.clients, "per_channel": args.per_channel, "services": args.services,
            "delta": args.delta, "parse": args.parse, "rss_start": rss0, "rss_synced": synced["rss"],
            "synced": synced["synced"], "connect_s": connect_s, "pushes": pushes,
            "client_rss": [r["rss"] for r in readies], "variant": variant(args), "load": load,
            "client_retries": sum(r.get("retries", 0) for r in readies),
        }
    finally:
        for c in clients:
            c.stop()
        server.stop()


def restart_server(
    args: argparse.Namespace, server: Proc, clients: list[Proc], port: int, streams: int,
    common_args: list[str], log_dir: Path,
) -> dict[str, Any]:
    """A node restart: the server quits, a new one (same port, the same last version) starts;
    every stream comes back at once with the versions it holds. Until all are synced again."""
    version = 1 + args.pushes
    load = common.loadavg()
    server.stop()
    t0 = time.monotonic()
    new = Proc(["--role", "server", "--port", str(port), "--first-version", str(version), *common_args,
                *(["--gc-freeze"] if args.gc_freeze else []),
                *(["--workers", str(args.workers)] if args.workers else []), "--transport", args.transport],
               f"server-{streams}-restarted", log_dir)
    new.recv(30)
    new.send({"cmd": "wait_synced", "n": streams, "timeout": 120})
    synced = new.recv(150)
    took = time.monotonic() - t0
    since = time.monotonic() - took  # an EDS response after the restart would be "something new"
    stats = []
    for c in clients:
        c.send({"cmd": "reconnects", "since": since, "exited": t0})
        stats.append(c.recv(30))
    return {
        "server": new, "synced_s": took, "connected": synced["connected"], "synced": synced["synced"],
        "listening_s": synced["started_at"] - t0, "all_connected_s": synced["all_connected_at"] - t0,
        "all_synced_s": synced["synced_at"] - t0,
        "reconnects": sum(st["reconnects"] for st in stats),
        "reconnect_failures": sum(st["reconnect_failures"] for st in stats),
        "failures_on_new_server": sum(st["failures_on_new"] for st in stats),
        "eds_responses_after_restart": sum(st["responses_after"] for st in stats),
        "failed": sum(st["failed"] for st in stats), "load": load,
    }


def variant(args: argparse.Namespace) -> str:
    parts = []
    if args.server_option:
        parts.append("pending-limits" if all("pending" in o for o in args.server_option) else ",".join(args.server_option))
    if args.fast_parse:
        parts.append("fast-parse")
    if args.gc_freeze:
        parts.append("gc-freeze")
    if args.ack_fast:
        parts.append("ack-fast")
    if args.workers:
        parts.append(f"workers={args.workers}")
    parts.append(args.transport)
    return "+".join(parts) + f", {args.client} clients"


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    n = run["streams"]
    rows = []
    for p in run["pushes"]:
        acks = p["acks"]
        rows.append({
            "acked": len(acks), "ack_p50": common.percentile(acks, 50), "ack_p99": common.percentile(acks, 99),
            "ack_max": max(acks) if acks else math.nan, "all": max(acks) if len(acks) >= n else math.nan,
            "recv_p50": common.percentile(p["received"], 50), "recv_max": max(p["received"], default=math.nan),
            "last_write": p["last_write"], "set_snapshot": p["set_snapshot"], "server_cpu": p["cpu"], "node_cpu": p.get("node_cpu", math.nan),
            "client_cpu": sum(p["client_cpu"]), "wall": p["wall"],
        })
    # the median push by total time represents the run
    rows.sort(key=lambda r: r["ack_max"])
    mid = rows[len(rows) // 2]
    per_stream = (run["rss_synced"] - run["rss_start"]) / max(run["synced"], 1)
    return {**mid, "streams": n, "pushes": len(rows), "per_stream_kb": per_stream / 1024,
            "rss_mb": run["rss_synced"] / 2**20, "connect_s": run["connect_s"],
            "all_pushes_max": [round(r["ack_max"] * 1000) for r in rows], "variant": run["variant"],
            "retries": run["client_retries"], "load": run["load"], "mode": "delta" if run["delta"] else "sotw"}


def table(args: argparse.Namespace, sums: list[dict[str, Any]]) -> str:
    head = (
        "| server | mode | streams | connect s (retries) | ACKed | per-stream ACK p50 | p99 | max (= all ACKed) | client got EDS p50 | max | server last write "
        "| set_snapshot | server CPU s (node) | client CPU s | server RSS MB | RSS/stream KB | max of each push | load avg |"
    )
    lines = [head, "|---|---|" + "---:|" * 15 + "---|"]
    for s in sums:
        lines.append(
            f"| {s['variant']} | {s['mode']} | {s['streams']} | {s['connect_s']:.0f} ({s['retries']}) | {s['acked']} | {common.ms(s['ack_p50'])} | {common.ms(s['ack_p99'])} "
            f"| {common.ms(s['ack_max'])} | {common.ms(s['recv_p50'])} | {common.ms(s['recv_max'])} "
            f"| {common.ms(s['last_write'])} | {common.ms(s['set_snapshot'])} | {s['server_cpu']:.2f} ({s['node_cpu']:.2f}) "
            f"| {s['client_cpu']:.2f} | {s['rss_mb']:.0f} | {s['per_stream_kb']:.1f} | {s['all_pushes_max']} | {s['load']} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=90)
    for run in runs:
        pushes = sorted(run["pushes"], key=lambda p: max(p["acks"], default=0))
        acks = sorted(pushes[len(pushes) // 2]["acks"])
        if acks:
            ax.plot([a * 1000 for a in acks], [100 * (i + 1) / len(acks) for i in range(len(acks))],
                    label=f"{run['streams']} streams")
    ax.set_xlabel("ms from set_snapshot to the stream's ACK (server)")
    ax.set_ylabel("% of streams ACKed")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["driver", "server", "client", "micro"], default="driver")
    parser.add_argument("--streams", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--per-channel", type=int, default=100, help="streams per gRPC channel (TCP connection)")
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--services", type=int, default=1)
    parser.add_argument("--delta", action="store_true")
    parser.add_argument("--parse", choices=["scan", "betterproto"], default="scan")
    parser.add_argument("--plot", type=Path, help="write a CDF plot of ACK times here (PNG)")
    parser.add_argument("--json", type=Path, help="write the raw runs here")
    parser.add_argument("--profile-server", type=Path, help="cProfile the server during each push (to this file)")
    parser.add_argument("--server-option", action="append", default=[], metavar="NAME=INT",
                        help="extra grpc server channel arg (experiment), e.g. grpc.server.max_pending_requests=20000")
    parser.add_argument("--fast-parse", action="store_true",
                        help="experiment: the server parses SotW requests with a wire scan (see fast_parse_sotw)")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="experiment: gc.freeze() in the server once every stream is synced")
    parser.add_argument("--ack-fast", action="store_true",
                        help="experiment: no _sync over every type on a pure EDS ACK (see ack_fast_stream_class)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--first-version", type=int, default=1)
    parser.add_argument("--restart", action="store_true",
                        help="after the pushes, restart the server on the same port: every stream reconnects at once "
                             "with the version it holds (a node restart); time until all are synced again")
    parser.add_argument("--workers", type=int, default=0,
                        help="serve with N xDS worker processes on one port (xds.workers); 0: in the server process")
    parser.add_argument("--count", type=int)
    parser.add_argument("--transport", choices=["h2", "grpc"], default="h2", help="xds.transport of the server")
    parser.add_argument("--cid", type=int, default=0)
    parser.add_argument("--client", choices=["h2", "grpc"], default="h2",
                        help="the simulated proxies: h2 (bench/h2_ads_client.py, lean) or grpcio's asyncio client")
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(serve(args.services, args.profile_server, args.server_option, args.fast_parse, args.gc_freeze,
                          args.ack_fast, args.port or 0, args.first_version, args.workers, args.transport))
        return
    if args.role == "client":
        asyncio.run(client(args.port, args.count, args.per_channel, args.services, args.delta, args.parse, args.cid,
                           args.client))
        return
    print(common.machine())
    if args.role == "micro":
        print(micro(args.count or 2000, args.services))
        return
    log_dir = common.OUT / "fanout-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in args.streams:
        runs.append(run_count(args, n, log_dir))
    sums = [summarise(r) for r in runs]
    print(table(args, sums))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
