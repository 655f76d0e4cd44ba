"""xDS worker processes on one port (xds/workers.py, issue 17 item 1) with a raw ADS client:
grpcio honours `grpc.so_reuseport` (two servers, one port), the node's port check, and a pool
of two real worker processes whose streams the node's tracker sees, whose lease renewals reach
every stream, and whose dead worker's streams are disconnected and the worker restarted.
The same with real Envoys: integration/test_xds_workers.py."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes import eventually
from grpc import aio

from repstage_mesh.xds import relay
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot, SnapshotCache
from repstage_mesh.xds.limits import XdsLimits
from repstage_mesh.xds.server import AdsServer
from repstage_mesh.xds.tls import XdsSecurity
from repstage_mesh.xds.tracker import ProxyTracker
from repstage_mesh.xds.worker_main import Worker
from repstage_mesh.xds.workers import STREAM_ID_STRIDE, WorkerPool, hold_port
from tests.xds_client import CLUSTERS, AdsClient, sotw_request


def snapshot(index: int, ttl: float | None = None) -> Snapshot:
    cluster = EncodedResource.from_bytes(res.CLUSTER, "db", f"cluster-{index}".encode(), (), ttl)
    return Snapshot(str(index), {res.CLUSTER: {"db": cluster}})


async def test_two_servers_bind_one_port_with_so_reuseport_and_a_plain_bind_is_refused() -> None:
    held = hold_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    servers = [AdsServer(SnapshotCache(), ProxyTracker(), grpc_options=[("grpc.so_reuseport", 1)]) for _ in range(2)]
    try:
        assert [await s.start("127.0.0.1", port) for s in servers] == [port, port]
        with pytest.raises(OSError):  # the node's check: somebody listens there
            hold_port("127.0.0.1", port)
        with pytest.raises(OSError):  # a server without SO_REUSEPORT (workers: 0) cannot share it
            await AdsServer(SnapshotCache(), ProxyTracker()).start("127.0.0.1", port)
    finally:
        for s in servers:
            await s.stop(0)
        held.close()


def test_a_port_another_program_listens_on_is_refused() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            hold_port("127.0.0.1", other.getsockname()[1])


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    cache = SnapshotCache()
    cache.set_snapshot("", snapshot(3, ttl=5.0))
    workers = WorkerPool(2, cache, ProxyTracker(control_plane="cp"), "cp", limits=XdsLimits(max_resource_names=2),
                         restart_delay=0.2)
    await workers.start("127.0.0.1", 0)
    try:
        yield workers
    finally:
        await workers.stop(0)


async def test_a_pool_s_streams_are_the_node_s_and_a_dead_worker_s_come_back(pool: WorkerPool) -> None:
    tracker = pool.tracker
    channels = [aio.insecure_channel(f"127.0.0.1:{pool.port}") for _ in range(6)]  # 6 connections
    clients = [AdsClient(ch) for ch in channels]
    try:
        for n, client in enumerate(clients):
            client.send(sotw_request(CLUSTERS, node_id=f"envoy-{n}"))
            first = await client.receive()
            assert first.version_info.startswith("3-")
            client.send(sotw_request(CLUSTERS, version=first.version_info, nonce=first.nonce))
        await eventually(lambda: len(tracker.connected()) == 6 and all(r.synced(3) for r in tracker.connected()),
                         "the node sees every stream synced")
        assert {r.stream_id // STREAM_ID_STRIDE for r in tracker.connected()} <= {1, 2}

        pool.renew()  # the lease renewal reaches every stream through its worker
        for client in clients:
            again = await client.receive()
            assert again.version_info == first.version_info
            client.send(sotw_request(CLUSTERS, version=again.version_info, nonce=again.nonce))

        pool.cache.set_snapshot("", snapshot(4))  # a change: every stream gets it, the node sees the ACKs
        for client in clients:
            pushed = await client.receive()
            assert pushed.version_info.startswith("4-")
            client.send(sotw_request(CLUSTERS, version=pushed.version_info, nonce=pushed.nonce))
        waiter = tracker.wait_for(4)
        await eventually(lambda: waiter.done, "the node's waiter woken by the workers' ACKs")
        assert sorted(tracker.gates) == ["xds-worker-0", "xds-worker-1"]  # each worker holds 4
        assert all(g.synced_index == 4 for g in tracker.gates.values())

        victim = pool.pids()[0]  # worker slot 0, its first start: stream ids from 1 * STRIDE
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: pool.restarts == 1 and len(pool.pids()) == 2 and victim not in pool.pids(),
                         "the worker restarted")
        for record in tracker.records.values():  # the dead worker's streams only are gone
            assert record.connected == (record.stream_id // STREAM_ID_STRIDE == 2), record.key

        # The new worker was sent the whole snapshot, then takes the next change as a delta:
        # new connections (one each, as Envoys) until one reaches it once it listens.
        pool.cache.set_snapshot("", snapshot(5))
        own = [("grpc.use_local_subchannel_pool", 1)]
        for n in range(200):
            channels.append(aio.insecure_channel(f"127.0.0.1:{pool.port}", options=own))
            clients.append(client := AdsClient(channels[-1]))
            client.send(sotw_request(CLUSTERS, node_id=f"late-{n}"))
            assert (await client.receive()).version_info.startswith("5-")
            await eventually(lambda n=n: any(r.node.id == f"late-{n}" for r in tracker.connected()), "the node sees it")
            if any(r.node.id == f"late-{n}" and r.stream_id // STREAM_ID_STRIDE == 3 for r in tracker.connected()):
                break
        else:
            raise AssertionError("no new connection reached the restarted worker")
    finally:
        for client in clients:
            client.close()
        for ch in channels:
            await ch.close()


async def test_a_frozen_worker_is_killed_and_started_again_and_its_streams_are_not_waited_for(
    pool: WorkerPool,
) -> None:
    """SIGSTOP (a frozen cgroup, a debugger): the worker reads nothing and says nothing, so no
    pipe closes. The node notices its silence (it answers every tick), kills it and starts
    another; until then a failover would wait for its streams to the deadline."""
    tracker = pool.tracker
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [aio.insecure_channel(f"127.0.0.1:{pool.port}", options=own) for _ in range(8)]
    clients = [AdsClient(ch) for ch in channels]
    frozen: int | None = None
    try:
        for n, client in enumerate(clients):
            client.send(sotw_request(CLUSTERS, node_id=f"envoy-{n}"))
            first = await client.receive()
            client.send(sotw_request(CLUSTERS, version=first.version_info, nonce=first.nonce))
        await eventually(lambda: len(tracker.connected()) == 8 and all(r.synced(3) for r in tracker.connected()),
                         "every stream synced")
        spawns = {r.stream_id // STREAM_ID_STRIDE for r in tracker.connected()}
        victim_spawn = 1 if 1 in spawns else 2
        frozen = next(w.process.pid for w in pool._workers if w.spawn == victim_spawn and w.process is not None)
        os.kill(frozen, signal.SIGSTOP)
        await eventually(lambda: pool.restarts == 1 and len(pool.pids()) == 2 and frozen not in pool.pids(),
                         "the frozen worker killed and another started", timeout=15.0)
        for record in tracker.records.values():  # the frozen worker's streams only are gone
            assert record.connected == (record.stream_id // STREAM_ID_STRIDE != victim_spawn), record.key

        pool.cache.set_snapshot("", snapshot(4))  # the live streams' ACKs are all a wait needs
        for n, client in enumerate(clients):
            if any(r.node.id == f"envoy-{n}" for r in tracker.connected()):
                pushed = await client.receive()
                client.send(sotw_request(CLUSTERS, version=pushed.version_info, nonce=pushed.nonce))
        waiter = tracker.wait_for(4)
        await eventually(lambda: waiter.done, "the wait satisfied by the live streams")
    finally:
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
        for client in clients:
            client.close()
        for ch in channels:
            await ch.close()


async def test_a_worker_that_misses_a_change_leaves_to_be_sent_the_whole_snapshot() -> None:
    thresholds = gc.get_threshold()
    init = relay.WorkerInit("127.0.0.1", 0, "cp", XdsLimits(), XdsSecurity(), STREAM_ID_STRIDE, 5.0)
    try:
        worker = Worker(init, None)  # type: ignore[arg-type]  # nothing is sent in this test
        first, second, third = snapshot(3), snapshot(4), snapshot(5)
        assert worker.handle(("snapshot", "", relay.snapshot_wire(first), 1))
        assert worker.handle(("delta", "", relay.snapshot_delta(first, second), 1, 2))
        held = worker.cache.get("")
        assert held is not None and held.version == "4" and worker.seq == 2
        assert worker.batcher.holds == 4  # told to the node after this pass's facts (relay.WorkerGate)
        assert held.resources[res.CLUSTER]["db"].any_bytes == second.resources[res.CLUSTER]["db"].any_bytes
        # A delta against a snapshot it does not hold: it stops (the node restarts it).
        assert not worker.handle(("delta", "", relay.snapshot_delta(first, third), 7, 8))
        assert worker.cache.get("") is held
    finally:
        gc.set_threshold(*thresholds)


async def test_a_limit_hit_in_a_worker_is_counted_by_the_node(pool: WorkerPool) -> None:
    hits: list[str] = []

    class Guard:
        def on_limit(self, limit: str) -> None:
            hits.append(limit)

        def on_refusal(self, reason: str) -> None:
            hits.append(reason)

    pool.guard = Guard()
    async with aio.insecure_channel(f"127.0.0.1:{pool.port}") as channel:
        client = AdsClient(channel)
        client.send(sotw_request(CLUSTERS, names=("a", "b", "c"), node_id="greedy"))
        code, _ = await client.status()
        assert code.name == "RESOURCE_EXHAUSTED"
    await eventually(lambda: hits == ["resource_names"], "the worker's limit hit reaches the node")


async def test_workers_run_the_node_s_code_whatever_directory_the_node_started_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m` puts the working directory first on sys.path: a `repstage_mesh` there (another
    checkout) must not be what the workers import."""
    bogus = tmp_path / "repstage_mesh"
    bogus.mkdir()
    (bogus / "__init__.py").write_text("raise ImportError('the wrong repstage_mesh')\n")
    monkeypatch.chdir(tmp_path)
    cache = SnapshotCache()
    cache.set_snapshot("", snapshot(3))
    workers = WorkerPool(1, cache, ProxyTracker(control_plane="cp"), "cp", restart_delay=0.2)
    await workers.start("127.0.0.1", 0)
    channel = aio.insecure_channel(f"127.0.0.1:{workers.port}")
    try:
        client = AdsClient(channel)
        client.send(sotw_request(CLUSTERS, node_id="envoy-cwd"))
        assert (await client.receive()).version_info.startswith("3-")
        assert workers.restarts == 0
        client.close()
    finally:
        await channel.close()
        await workers.stop(0)
