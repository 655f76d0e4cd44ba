"""xDS served by several worker processes on one port (`xds.workers`), driven by the node.

`WorkerPool` has the `AdsServer` face the node uses (`start`, `stop`, `renew`). It holds the
port (a socket bound with SO_REUSEPORT and never listening, so the port stays this node's
while a worker restarts, and port 0 picks one port for all), starts `count` processes
(`python -m repstage_mesh.xds.worker_main`, spawned: never a fork of this asyncio/grpc
process), each an `AdsServer` bound to that port with `grpc.so_reuseport` (the kernel spreads
new connections over them). Each snapshot set in the node's cache is pickled once, with its
resources' encoded bytes, and that one frame is written to every worker (relay.py); after the
first, a frame holds only what changed (a failover in a mesh of thousands of services sends
that service's resources, not the mesh). What the
workers' streams do comes back once per event-loop pass and is replayed into the node's
`ProxyTracker` (relay.FactReplay), so `/v1/proxies`, the proxy waits, metrics and the push
tracer see every proxy. A worker that exits is restarted at once (after `restart_delay` if it
lived less than that: no crash loop); its streams are marked disconnected, and its Envoys
reconnect to the other workers or the new one and are sent nothing they already hold.

Limits: each worker applies every per-stream limit and `max_streams_per_peer` (all the
streams of one connection reach one worker); the per-node ones are shared:
`max_streams`, `admission_rate` and `admission_burst` are divided by `count` (rounded up).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable

from . import relay
from .cache import Snapshot, SnapshotCache
from .limits import XdsLimits
from .server import DEFAULT_TRANSPORT, GuardObserver
from .tls import XdsSecurity
from .tracker import ProxyTracker

log = logging.getLogger(__name__)

STREAM_ID_STRIDE = 1 << 40  # worker spawn n numbers its streams from n * STRIDE
MAX_UNREAD = 256 << 20  # bytes written to a worker and not read by it: it is wedged
WORKER_SILENCE = relay.WorkerInit.node_silence  # a stopped worker silent this long is killed (`_watch`)


def worker_limits(limits: XdsLimits, count: int) -> XdsLimits:
    """One worker's share of the per-node limits (see the module doc)."""
    return dataclasses.replace(
        limits,
        max_streams=math.ceil(limits.max_streams / count),
        admission_rate=limits.admission_rate / count,
        admission_burst=math.ceil(limits.admission_burst / count),
    )


def hold_port(host: str, port: int) -> socket.socket:
    """Check that nobody holds host:port (a bind without SO_REUSEPORT), then hold it with
    SO_REUSEPORT so the workers can bind it too. Raises OSError when it is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR, as grpc sets it: connections of an earlier run in TIME_WAIT do not
        # hold the port; a listener (or a bound socket) still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        port = probe.getsockname()[1]
    held = socket.socket(family, kind, proto)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((*address[:1], port, *address[2:]))
    except OSError:
        held.close()
        raise
    return held



def worker_command() -> list[str]:
    """`python -P -m <this package>.worker_main`: `-P` keeps the working directory off the
    worker's `sys.path` (with `-m` Python puts it first), so a `repstage_mesh` directory where
    `serve` was started (another checkout, another version) is not what the workers run."""
    return [sys.executable, "-P", "-m", f"{__package__}.worker_main"]


def worker_environment() -> dict[str, str]:
    """The node's environment with the directory its own top-level package came from first on
    `PYTHONPATH`: the workers import the very code the node runs."""
    top = sys.modules[(__package__ or __name__).split(".")[0]]
    root = os.path.dirname(os.path.dirname(os.path.abspath(top.__file__ or "")))
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}

class _Worker:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.spawn = 0
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.replay: relay.FactReplay | None = None
        self.started_at = 0.0
        self.task: asyncio.Task[None] | None = None
        self.decoder = relay.FrameDecoder()
        self.heard = 0.0  # when it last said anything (it answers every tick: `_watch`)
        self.gate: relay.WorkerGate | None = None  # what the node's waits see of it


class WorkerPool:
    def __init__(
        self,
        count: int,
        cache: SnapshotCache,
        tracker: ProxyTracker,
        control_plane_id: str = "",
        *,
        limits: XdsLimits | None = None,
        security: XdsSecurity | None = None,
        guard: GuardObserver | None = None,
        group: str = "",
        restart_delay: float = 1.0,
        on_restart: Callable[[], None] | None = None,
        transport: str = DEFAULT_TRANSPORT,
    ) -> None:
        if count < 1:
            raise ValueError("count: at least one worker")
        self.count = count
        self.transport = transport
        self.cache = cache
        self.tracker = tracker
        self.control_plane_id = control_plane_id
        self.limits = limits or XdsLimits()
        self.security = security or XdsSecurity()
        self.guard: GuardObserver | None = guard
        self.group = group
        self.restart_delay = restart_delay
        self.on_restart = on_restart
        self.port: int | None = None
        self.restarts = 0
        self._host = ""
        self._held: socket.socket | None = None
        self._workers = [_Worker(slot) for slot in range(count)]
        self._spawns = 0
        self._sent: Snapshot | None = None  # the snapshot the workers hold (after the frames written)
        self._seq = 0  # numbers the snapshots sent: a delta names the one it applies to
        self._cancel_watch: Callable[[], None] | None = None
        self._stopping = False
        self._ticker: asyncio.Task[None] | None = None
        # The node's own collector, as each worker's (relay.GcPolicy): its tracker holds a
        # record of every stream the workers serve, and the replay of each push leaves new ones.
        # Its periodic full collection walks the whole node (Raft, API): once an hour, not
        # every 5 minutes as in a worker (a pause of the node's loop delays a failover).
        self.gc_policy = relay.GcPolicy(full_every=3600.0)
        self._last_facts = 0.0

    # --- the AdsServer face -------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        try:
            self._held = hold_port(host, port)
        except OSError as exc:
            raise OSError(exc.errno, f"xDS: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        self._host, self.port = host, self._held.getsockname()[1]
        snapshot = self.cache.get(self.group)
        if snapshot is not None:
            self._snapshot(self.group, snapshot)
        self._cancel_watch = self.cache.watch(self.group, self._snapshot)
        self._ticker = asyncio.create_task(self._tick(), name="xds-worker-ticks")  # watches the starts too
        try:
            # Every worker binds first; then all start accepting together (relay.WorkerInit.hold).
            await asyncio.gather(*(self._spawn(worker, hold=True) for worker in self._workers))
            await asyncio.gather(*(self._listen(worker) for worker in self._workers))
        except BaseException:
            await self.stop(0)
            raise
        for worker in self._workers:
            worker.task = asyncio.create_task(self._supervise(worker), name=f"xds-worker-{worker.slot}")
        log.info("xDS served by %d worker processes on %s:%d", self.count, host, self.port)
        return self.port

    async def stop(self, grace: float | None = 1.0) -> None:
        self._stopping = True
        if self._ticker is not None:
            self._ticker.cancel()
        if self._cancel_watch is not None:
            self._cancel_watch()
            self._cancel_watch = None
        for worker in self._workers:
            if worker.task is not None:
                worker.task.cancel()
        for worker in self._workers:
            if worker.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker.task
        await asyncio.gather(*(self._end(worker, grace or 0.0) for worker in self._workers))
        if self._held is not None:
            self._held.close()
            self._held = None

    def renew(self) -> int:
        """Every worker renews its streams' leases; returns the streams connected."""
        frame = relay.encode(("renew",))
        for worker in self._workers:
            self._write(worker, frame)
        return len(self.tracker.connected())

    async def _tick(self) -> None:
        """The node is alive (relay.WorkerInit.node_silence), each worker too (`_watch`); and
        the node's collector."""
        frame = relay.encode(("tick",))
        while True:
            await asyncio.sleep(relay.WorkerInit.heartbeat)
            for worker in self._workers:
                self._write(worker, frame)
                self._watch(worker)
            self._keep_gc()

    def _watch(self, worker: _Worker) -> None:
        """Kill a worker that has said nothing for WORKER_SILENCE while stopped (SIGSTOP, its
        cgroup frozen), or for 10x that while it runs (a wedged loop): until then it holds its
        streams (a failover would wait for them to its deadline and count them missed) and the
        kernel keeps handing it new connections. Its supervisor then sees the pipe close, marks
        its streams disconnected and starts another (as for a worker that died)."""
        process = worker.process
        if process is None or process.returncode is not None or worker.writer is None:
            return
        silent = time.monotonic() - worker.heard
        if silent < WORKER_SILENCE:
            return
        state = relay.process_state(process.pid)
        if not relay.peer_is_gone(silent, WORKER_SILENCE, state):
            return
        log.warning("xDS worker %d (pid %d, state %s) said nothing for %.1f s: killing it, its streams are "
                    "disconnected and another starts", worker.slot, process.pid, state or "?", silent)
        worker.heard = time.monotonic()  # once: the kill closes its pipe
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    def _keep_gc(self) -> None:
        now = time.monotonic()
        churn = 0
        for worker in self._workers:
            if worker.replay is not None:
                churn, worker.replay.churn = churn + worker.replay.churn, 0
        if churn:
            self.gc_policy.changed(now, churn)
        if self._last_facts > self.gc_policy.last_busy:
            self.gc_policy.active(self._last_facts)
        relay.collect(self.gc_policy.due(now, len(self.tracker.records)))

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None and w.process.returncode is None]

    # --- workers ------------------------------------------------------------------------------

    def _snapshot(self, group: str, snapshot: Snapshot) -> None:
        """One frame per new snapshot, written to every worker: what changed since the one
        they hold (a worker that starts later is sent the whole of it: `_whole`)."""
        base, self._sent = self._sent, snapshot
        self._seq += 1
        if base is None:
            frame = self._whole()
        else:
            frame = relay.encode(("delta", group, relay.snapshot_delta(base, snapshot), self._seq - 1, self._seq))
        for worker in self._workers:
            self._write(worker, frame)

    def _whole(self) -> bytes:
        assert self._sent is not None
        return relay.encode(("snapshot", self.group, relay.snapshot_wire(self._sent), self._seq))

    def _write(self, worker: _Worker, frame: bytes) -> None:
        writer = worker.writer
        if writer is None or writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > MAX_UNREAD:
            # A worker that reads nothing (stopped, wedged) is not waited for: it is killed and
            # restarted (its supervisor sees the pipe close), and gets the current snapshot.
            log.warning("xDS worker %d has not read %d bytes: restarting it", worker.slot, MAX_UNREAD)
            writer.close()
            if worker.process is not None and worker.process.returncode is None:
                worker.process.kill()
            return
        writer.write(frame)

    async def _spawn(self, worker: _Worker, hold: bool = False) -> None:
        self._spawns += 1
        worker.spawn = self._spawns
        ours, theirs = socket.socketpair()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *worker_command(), str(theirs.fileno()), str(os.getpid()),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL, env=worker_environment(),
            )
        finally:
            theirs.close()
        worker.started_at = worker.heard = time.monotonic()
        worker.reader, worker.writer = await asyncio.open_unix_connection(sock=ours)
        worker.replay = relay.FactReplay(self.tracker)
        self._ungate(worker)
        worker.gate = relay.WorkerGate(f"xds-worker-{worker.slot}")
        self.tracker.gate_changed(worker.gate)  # waits wait for it until it holds their index
        init = relay.WorkerInit(
            self._host, self.port or 0, self.control_plane_id, worker_limits(self.limits, self.count),
            self.security, worker.spawn * STREAM_ID_STRIDE, self.tracker.never_acked_grace,
            name=f"xds-worker-{worker.slot}", log_level=logging.getLogger().getEffectiveLevel(),
            transport=self.transport, hold=hold,
        )
        self._write(worker, relay.encode(("init", init)))
        if self._sent is not None:
            self._write(worker, self._whole())
        decoder = worker.decoder = relay.FrameDecoder()
        while True:
            data = await worker.reader.read(1 << 16)
            if not data:
                raise OSError(f"xDS worker {worker.slot} exited before it was ready")
            worker.heard = time.monotonic()
            messages = decoder.feed(data)
            if messages:
                break
        first, rest = messages[0], messages[1:]
        if first[0] != "ready":
            raise OSError(str(first[1]) if len(first) > 1 else "xDS worker failed")
        self._handle(worker, rest)

    async def _listen(self, worker: _Worker) -> None:
        """Tell a worker started with `hold` to take connections; until it says it does."""
        if worker.writer is None or worker.reader is None:
            raise OSError(f"xDS worker {worker.slot} exited before it listened")
        self._write(worker, relay.encode(("listen",)))
        while True:
            data = await worker.reader.read(1 << 16)
            if not data:
                raise OSError(f"xDS worker {worker.slot} exited before it listened")
            worker.heard = time.monotonic()
            messages = worker.decoder.feed(data)
            for k, message in enumerate(messages):
                if message[0] == "listening":
                    self._handle(worker, messages[:k] + messages[k + 1:])
                    return
            self._handle(worker, messages)

    def _handle(self, worker: _Worker, messages: list[tuple[object, ...]]) -> None:
        for message in messages:
            if message[0] != "facts" or worker.replay is None:
                continue
            facts, guards, holds = message[1], message[2], message[3]
            worker.replay.apply(facts)  # type: ignore[arg-type]
            self._last_facts = time.monotonic()
            gate = worker.gate
            if gate is not None and holds != gate.synced_index:  # after its facts: WorkerGate
                gate.synced_index = holds  # type: ignore[assignment]
                self.tracker.gate_changed(gate)
            guard = self.guard
            if guard is None:
                continue
            for kind, name in guards:  # type: ignore[attr-defined]
                (guard.on_limit if kind == "limit" else guard.on_refusal)(name)

    async def _supervise(self, worker: _Worker) -> None:
        """Replay the worker's facts; when it exits, mark its streams gone and start another."""
        while not self._stopping:
            await self._follow(worker)
            if self._stopping:
                return
            lost = worker.replay.lost() if worker.replay is not None else 0
            self._ungate(worker)
            code = await self._end(worker, 1.0)
            self.restarts += 1
            if self.on_restart is not None:
                self.on_restart()
            log.warning("xDS worker %d exited (%s); its %d streams are disconnected; starting another",
                        worker.slot, code, lost)
            while not self._stopping:
                lived = time.monotonic() - worker.started_at
                if lived < self.restart_delay:  # no crash loop
                    await asyncio.sleep(self.restart_delay - lived)
                try:
                    await self._spawn(worker)
                    break
                except Exception as exc:
                    log.error("xDS worker %d could not start again: %s", worker.slot, exc)
                    await self._end(worker, 1.0)
                    worker.started_at = time.monotonic()

    async def _follow(self, worker: _Worker) -> None:
        reader, decoder = worker.reader, worker.decoder
        if reader is None:
            return
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    return
                worker.heard = time.monotonic()
                self._handle(worker, decoder.feed(data))
        except (OSError, relay.FrameError) as exc:
            log.warning("xDS worker %d: %s", worker.slot, exc)

    def _ungate(self, worker: _Worker) -> None:
        """The worker is gone: the waits stop waiting for it (its streams are marked gone too)."""
        gate, worker.gate = worker.gate, None
        if gate is not None:
            gate.connected = False
            self.tracker.gate_changed(gate)

    async def _end(self, worker: _Worker, grace: float) -> int | None:
        """Ask the worker to stop (its streams get `grace` seconds), then kill it if it has not
        exited 2 s later; returns its exit code."""
        process, writer = worker.process, worker.writer
        worker.writer = worker.reader = None
        self._ungate(worker)
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.write(relay.encode(("stop", grace)))
                writer.close()
        if process is None:
            return None
        try:
            await asyncio.wait_for(process.wait(), grace + 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        return process.returncode


def default_count() -> int:
    """One worker per core this process may run on (its CPU affinity, else `os.cpu_count()`)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1
