"""One xDS worker process: `python -m repstage_mesh.xds.worker_main FD NODE_PID` (workers.py).

FD is this end of the socketpair to the node. The worker reads its `relay.WorkerInit`, serves
ADS with an `AdsServer` bound to the node's xDS port with `grpc.so_reuseport` (the kernel
spreads new connections over the workers), takes every snapshot the node sends (already
encoded), renews leases when told, and sends back once per event-loop pass what its streams
did (`relay.FactBatcher`). It exits when the node says stop or the pipe closes (the node died).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import time

from . import relay
from .cache import Snapshot, SnapshotCache
from .server import AdsServer

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


class Worker:
    def __init__(self, init: relay.WorkerInit, writer: asyncio.StreamWriter) -> None:
        self.init = init
        self.writer = writer
        self.grace = 0.0  # what the streams get when the server stops (the node's stop says)
        self.seq = -1  # which of the node's snapshots this worker holds (relay: "snapshot", "delta")
        self.cache = SnapshotCache()
        self.gc_policy = relay.GcPolicy()
        self._profiles = 0  # -1 while profiling (_profile)
        self._passes = 0  # the batcher's passes at the last tick
        gc.set_threshold(*relay.GC_THRESHOLDS)
        loop = asyncio.get_running_loop()
        self.batcher = relay.FactBatcher(lambda: loop.call_soon(self.flush))
        self.tracker = relay.ReportingTracker(
            self.batcher, control_plane=init.control_plane_id, never_acked_grace=init.never_acked_grace
        )
        self.server = AdsServer(
            self.cache, self.tracker, init.control_plane_id, limits=init.limits, security=init.security,
            guard=self.batcher, first_stream_id=init.first_stream_id,
            grpc_options=(*init.grpc_options, ("grpc.so_reuseport", 1)), transport=init.transport,
        )

    def keep_gc(self) -> None:
        """Keep the streams' long-lived objects out of the collector's walks (GcPolicy)."""
        now = time.monotonic()
        if self.batcher.churn:
            self.gc_policy.changed(now, self.batcher.churn)
            self.batcher.churn = 0
        if self.batcher.passes != self._passes:
            self._passes = self.batcher.passes
            self.gc_policy.active(self.batcher.last_pass)
        relay.collect(self.gc_policy.due(now, len(self.server.streams)))

    def _profile(self) -> None:
        """Debugging the fan-out's CPU (bench/RESULTS.md, issue 17): with
        REPSTAGE_XDS_WORKER_PROFILE=PREFIX in the node's environment, cProfile the 3 s after each snapshot and write
        the top functions to PREFIX.PID.N.txt."""
        prefix = os.environ.get("REPSTAGE_XDS_WORKER_PROFILE")
        if not prefix or self._profiles < 0:
            return
        import cProfile
        import pstats

        profiler, self._profiles = cProfile.Profile(), -1
        profiler.enable()

        def done(n: int = len(os.listdir(os.path.dirname(prefix) or "."))) -> None:
            profiler.disable()
            with open(f"{prefix}.{os.getpid()}.{n}.txt", "w") as out:
                pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(45)
            self._profiles = 0

        asyncio.get_running_loop().call_later(3.0, done)

    def send(self, message: tuple[object, ...]) -> None:
        if not self.writer.is_closing():
            self.writer.write(relay.encode(message))

    def flush(self) -> None:
        facts, guards = self.batcher.drain(self.tracker)
        self.send(("facts", facts, guards, self.batcher.holds))

    def _took(self, group: str, snapshot: Snapshot) -> None:
        self.cache.set_snapshot(group, snapshot)
        self.batcher.took(snapshot.index)

    def handle(self, message: tuple[object, ...]) -> bool:
        """One message from the node; False when told to stop."""
        kind = message[0]
        if kind == "snapshot":
            self._profile()
            group, wire, seq = message[1], message[2], message[3]
            assert isinstance(group, str) and isinstance(seq, int)
            self.seq = seq
            self._took(group, relay.snapshot_from_wire(wire))  # type: ignore[arg-type]
        elif kind == "delta":
            self._profile()
            group, delta, base_seq, seq = message[1], message[2], message[3], message[4]
            assert isinstance(group, str) and isinstance(seq, int)
            base = self.cache.get(group)
            if base is None or base_seq != self.seq:
                # Never seen: frames arrive in order and each is applied. Leaving is the way
                # back: the node starts this worker again and sends it the whole snapshot.
                log.error("xDS worker: a change to snapshot %s, but this worker holds %s", base_seq, self.seq)
                return False
            self.seq = seq
            self._took(group, relay.snapshot_from_delta(base, delta))  # type: ignore[arg-type]
        elif kind == "renew":
            self.server.renew()
        elif kind == "stop":
            self.grace = float(message[1]) if len(message) > 1 else 0.2  # type: ignore[arg-type]
            return False
        elif kind == "tick":
            self.keep_gc()
            self.send(("alive",))  # the node's watch on its workers (relay.peer_is_gone)
        else:
            log.warning("xDS worker: unknown message %r from the node", kind)
        return True


async def _serve(fd: int, node_pid: int) -> int:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    decoder = relay.FrameDecoder()
    pending: list[tuple[object, ...]] = []
    while not pending:
        data = await reader.read(1 << 20)
        if not data:
            return 0
        pending = decoder.feed(data)
    init = pending.pop(0)[1]
    assert isinstance(init, relay.WorkerInit)
    logging.basicConfig(level=init.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {init.name} %(name)s: %(message)s")
    worker = Worker(init, writer)
    try:
        port = await worker.server.start(init.host, init.port, serving=not init.hold)
    except OSError as exc:
        worker.send(("failed", str(exc)))
        await writer.drain()
        return 2
    worker.send(("ready", port))
    heard = time.monotonic()
    try:
        while True:
            for message in pending:
                if message[0] == "listen":
                    await worker.server.serve_now()
                    worker.send(("listening",))
                elif not worker.handle(message):
                    return 0
            try:
                data = await asyncio.wait_for(reader.read(1 << 20), init.node_silence)
            except TimeoutError:
                silent = time.monotonic() - heard
                if relay.peer_is_gone(silent, init.node_silence, relay.process_state(node_pid)):
                    log.warning("xDS worker: the node said nothing for %.1f s (frozen?): exiting", silent)
                    return 3
                log.warning("xDS worker: the node said nothing for %.1f s but it runs (busy): staying", silent)
                continue
            heard = time.monotonic()
            if not data:
                return 0  # the node is gone
            pending = decoder.feed(data)
    finally:
        # Streams cancelled by the stop are not errors (grpc logs each with a traceback).
        logging.getLogger("grpc._cython.cygrpc").setLevel(logging.CRITICAL)
        await worker.server.stop(worker.grace)
        with contextlib.suppress(Exception):
            writer.close()


def _die_with(parent: int) -> None:
    """The kernel kills this worker when the node process dies (Linux PR_SET_PDEATHSIG), so a
    node restarted at once finds its port free; elsewhere the closed pipe ends the worker."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the node died before the prctl
        os._exit(0)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which stops us
    node_pid = int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
    if len(sys.argv) > 2:
        _die_with(node_pid)
    sys.exit(asyncio.run(_serve(int(sys.argv[1]), node_pid)))


if __name__ == "__main__":
    main()
