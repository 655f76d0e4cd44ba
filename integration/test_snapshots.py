"""Issue 16 end to end: real Redis (a primary, two replicas), two real Envoys, one control-plane
node run in this process (so that the test can hand it a Redis BGSAVE action that it holds open
while it looks; the actions proper are branch snapact's), snapshots through the REST API.

- the drained replica is absent from every Envoy's read cluster (admin /clusters) and gets 0
  reads through the mesh while the action runs; it is back afterwards;
- a failover (the snapshotted replica promoted) aborts the snapshot: nothing completes from the
  demoted/promoted member and it is back in the read pool;
- a failing pre-hook takes nothing and returns the member; so does a hanging one, killed (with
  its process) at its 1 s timeout.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from repstage_mesh.config import load_config
from repstage_mesh.core.models import HookSpec
from repstage_mesh.node import Node
from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotTarget

from .databases import RedisGroup, redis_group
from .harness import Envoy, free_low_port, workdir


class HeldRedisBgsave:
    """A test-only Redis action: waits for `release`, then BGSAVE, waits for the save to end
    (INFO persistence rdb_saves moves), copies the RDB and records replid/offset."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.taken: list[SnapshotTarget] = []

    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult:
        self.started.set()
        await self.release.wait()
        client = aioredis.Redis(host=target.host, port=target.port, decode_responses=True)
        try:
            before = int((await client.info("persistence"))["rdb_saves"])
            await client.bgsave()
            async with asyncio.timeout(timeout):
                while int((info := await client.info("persistence"))["rdb_saves"]) == before or info["rdb_bgsave_in_progress"]:
                    await asyncio.sleep(0.02)  # Redis has no completion event for BGSAVE
            config = await client.config_get("dir")
            name = (await client.config_get("dbfilename"))["dbfilename"]
            replication = await client.info("replication")
        finally:
            await client.aclose()
        dest = self.out / f"{target.snapshot_id}.rdb"
        shutil.copyfile(Path(config["dir"]) / name, dest)
        offset = replication.get("slave_repl_offset", replication.get("master_repl_offset"))
        self.taken.append(target)
        return ActionResult(artifact=dest.as_uri(), point={"master_replid": str(replication["master_replid"]),
                                                           "offset": str(offset)}, size_bytes=dest.stat().st_size)


@dataclass
class Mesh:
    group: RedisGroup
    node: Node
    envoys: list[Envoy]
    read_port: int
    action: HeldRedisBgsave
    api: str = ""
    reads: dict[int, int] = field(default_factory=dict)

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.request(method, self.api + path, json=body) as r:
            return r.status, await r.json()

    async def snapshot(self, snapshot_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/services/cache/snapshots/{snapshot_id}")
        assert status == 200, body
        return dict(body)

    async def until(self, predicate: Any, what: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}")
            await asyncio.sleep(0.02)

    def read_hosts(self) -> list[set[int]]:
        """The ports in each Envoy's read cluster (admin /clusters)."""
        out = []
        for envoy in self.envoys:
            text = envoy.admin("/clusters") or ""
            out.append({int(line.split("::")[1].rsplit(":", 1)[1]) for line in text.splitlines()
                        if line.startswith("cache-read::") and "::cx_active::" in line})
        return out


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    with workdir() as wd, redis_group(replicas=2) as group:
        xds = f"127.0.0.1:{free_low_port()}"
        envoys = [Envoy(wd, f"edge-{i}", [xds]) for i in (1, 2)]
        listen, read = free_low_port(), free_low_port()
        members = [{"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in group.names]
        config = {
            "node": {"id": "cp-1", "data_dir": str(tmp_path / "data")}, "xds": {"listen": xds},
            "api": {"listen": f"127.0.0.1:{free_low_port()}"},
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
            "snapshots": {"envoy_admins": [f"127.0.0.1:{e.admin_port}" for e in envoys], "drain_timeout": 10,
                          "pre_hook": "pre", "post_hook": "post"},
            "hooks": {"pre": {"command": ["sh", "-c", "exit 0"]}, "post": {"command": ["sh", "-c", "exit 0"]}},
            "services": [{"name": "cache", "protocol": "redis", "listen_port": listen, "read_port": read,
                          "members": members, "primary": "r0",
                          "leadership": {"source": "probe", "mode": "follow"}}],
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        node = Node(load_config(path, env={}))
        action = HeldRedisBgsave(tmp_path)
        node.snapshots.deps.actions = lambda kind: action  # the test's held BGSAVE (see above)
        try:
            await node.start()
            for envoy in envoys:
                await asyncio.to_thread(envoy.start)  # Envoy is ready once this node's xDS answered
            m = Mesh(group, node, envoys, read, action, api=f"http://127.0.0.1:{node.api_port}")
            await m.until(lambda: _ready(m), "the node leads, the probes see replicas, every Envoy has the read pool")
            yield m
        finally:
            action.release.set()
            await node.stop()
            for envoy in envoys:
                envoy.stop()


async def _ready(m: Mesh) -> bool:
    views = m.node.decider.member_views("cache")
    ports = {m.group.port(n) for n in m.group.names}
    return (m.node.engine.active and sum(v.offset is not None for v in views.values()) == 3
            and all(h == ports for h in await asyncio.to_thread(m.read_hosts)))


class Reader(threading.Thread):
    """Reads through the mesh's read port, a new connection each time; counts the member port
    that answered (INFO server tcp_port)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stop_at = port, threading.Event()
        self.by_port: dict[int, int] = {}
        self.errors = 0

    def run(self) -> None:
        while not self.stop_at.is_set():
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
            try:
                served = int(client.info("server")["tcp_port"])
                self.by_port[served] = self.by_port.get(served, 0) + 1
            except redis.RedisError:
                self.errors += 1
            finally:
                client.close()

    def __enter__(self) -> Reader:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_at.set()
        self.join(5)


async def test_the_drained_replica_is_absent_from_every_envoy_and_gets_no_reads(mesh: Mesh) -> None:
    m = mesh
    m.group.command("r0", "SET", "k", "v")
    status, started = await m.call("POST", "/v1/services/cache/snapshots", {})
    assert status == 202 and started["role"] == "replica" and started["member"] in ("r1", "r2"), started
    port = m.group.port(started["member"])
    await asyncio.wait_for(m.action.started.wait(), 15)
    held = await m.snapshot(started["id"])
    assert held["pool"] == "out" and [s["name"] for s in held["steps"]][:4] == [
        "intent", "proxies_acked_draining", "connections_closed", "proxies_acked_removed"]
    assert "cx_active" in held["steps"][2]["detail"]  # Envoy's own counters, every admin
    hosts = await asyncio.to_thread(m.read_hosts)
    assert all(port not in h and len(h) == 2 for h in hosts), hosts
    with Reader(m.read_port) as reader:
        await m.until(lambda: _count(reader, 200), "reads through the mesh during the snapshot")
    assert reader.by_port.get(port, 0) == 0 and reader.errors == 0, reader.by_port
    m.action.release.set()
    done = await m.until(lambda: _ended(m, started["id"]), "the snapshot ends")
    assert done["status"] == "completed" and done["pool"] == "in" and done["point"]["master_replid"], done
    assert Path(done["artifact"].removeprefix("file://")).stat().st_size == done["size_bytes"] > 0
    await m.until(lambda: _all_back(m), "the member is back in every Envoy's read cluster")
    print(f"reads during the snapshot by member port: {reader.by_port}; steps: "
          f"{[(s['name'], round(s['at'] - done['steps'][0]['at'], 3)) for s in done['steps']]}")


async def test_a_failover_during_a_snapshot_aborts_it_and_returns_the_member(mesh: Mesh) -> None:
    m = mesh
    status, started = await m.call("POST", "/v1/services/cache/snapshots", {})
    assert status == 202, started
    member = started["member"]
    await asyncio.wait_for(m.action.started.wait(), 15)
    # The snapshotted replica is promoted behind the mesh; the probes follow it.
    m.group.command(member, "REPLICAOF", "NO", "ONE")
    for other in m.group.names:
        if other != member:
            m.group.command(other, "REPLICAOF", "127.0.0.1", str(m.group.port(member)))
    aborted = await m.until(lambda: _ended(m, started["id"]), "the failover aborts the snapshot")
    m.action.release.set()
    assert aborted["status"] == "aborted" and aborted["pool"] == "in" and "aborted at Raft index" in aborted["error"]
    # The failover's first commit (fail closed, a new epoch) is the one that aborted it.
    svc = await m.until(lambda: _primary_is(m, member), "the failover routes to the promoted member")
    assert svc["epoch"] > started["epoch"]
    await m.until(lambda: _all_back(m), "the member is back in every Envoy's read cluster")
    await m.until(lambda: _no_undo(m, started["id"]), "the undo finished")
    _, listed = await m.call("GET", "/v1/services/cache/snapshots")
    assert [s["status"] for s in listed["snapshots"]] == ["aborted"]  # 0 completed


async def test_a_failing_pre_hook_takes_nothing_and_returns_the_member(mesh: Mesh) -> None:
    m = mesh
    m.node.snapshots.deps.hooks = {"pre": HookSpec(command=("sh", "-c", "echo quiesce failed; exit 3")),
                                   "post": HookSpec(command=("sh", "-c", "exit 0"))}.get
    status, started = await m.call("POST", "/v1/services/cache/snapshots", {"member": "r1"})
    assert status == 202
    done = await m.until(lambda: _ended(m, started["id"]), "the snapshot fails")
    assert done["status"] == "failed" and "pre_hook failed" in done["error"] and "exited 3" in done["error"]
    assert not m.action.started.is_set() and done["pool"] == "in"
    assert [s["name"] for s in done["steps"]][-2:] == ["pre_hook", "post_hook"]
    await m.until(lambda: _all_back(m), "the member is back in every Envoy's read cluster")

    # A pre-hook that hangs is killed at its timeout (1 s), with its process; same undo.
    pidfile = m.node.settings.node.data_dir / "hung.pid"
    m.node.snapshots.deps.hooks = {"pre": HookSpec(command=("sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"), timeout=1.0),
                                   "post": HookSpec(command=("sh", "-c", "exit 0"))}.get
    status, started = await m.call("POST", "/v1/services/cache/snapshots", {"member": "r1"})
    assert status == 202, started
    done = await m.until(lambda: _ended(m, started["id"]), "the hung pre-hook is killed and the snapshot fails")
    assert done["status"] == "failed" and "pre_hook failed" in done["error"] and "killed after 1 s" in done["error"], done
    assert not m.action.started.is_set() and done["pool"] == "in"
    assert [s["name"] for s in done["steps"]][-2:] == ["pre_hook", "post_hook"]
    hung = int(pidfile.read_text())
    await m.until(lambda: _gone(hung), f"the hook's sleep (pid {hung}) is gone")
    await m.until(lambda: _all_back(m), "the member is back in every Envoy's read cluster")


async def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"  # a zombie is dead


async def test_an_open_connection_holds_the_drain_until_envoy_counts_it_closed(mesh: Mesh) -> None:
    m = mesh
    port = m.group.port("r1")
    held: list[redis.Redis] = []

    def connect_to_r1() -> redis.Redis:
        while True:  # round robin over three members: a few connections reach r1
            client = redis.Redis(host="127.0.0.1", port=m.read_port, single_connection_client=True, socket_timeout=2)
            if int(client.info("server")["tcp_port"]) == port:
                return client
            held.append(client)

    r1 = await asyncio.to_thread(connect_to_r1)
    for other in held:
        other.close()
    status, started = await m.call("POST", "/v1/services/cache/snapshots", {"member": "r1"})
    assert status == 202, started
    await m.until(lambda: _pool_is(m, started["id"], "draining"), "r1 draining")

    async def envoy_draining_with_one() -> bool:
        texts = await asyncio.to_thread(lambda: [e.admin("/clusters") or "" for e in m.envoys])
        prefix = f"cache-read::127.0.0.1:{port}::"
        return (all(f"{prefix}health_flags::/eds_status_draining" in t for t in texts)
                and sum(f"{prefix}cx_active::1" in t for t in texts) == 1)

    await m.until(envoy_draining_with_one, "r1 DRAINING in every Envoy, one connection counted")
    assert (await m.snapshot(started["id"]))["pool"] == "draining"  # the counter holds the drain
    assert r1.ping() and not m.action.started.is_set()
    await asyncio.to_thread(r1.close)
    out = await m.until(lambda: _pool_is(m, started["id"], "out"), "Envoy counts the connection closed")
    assert out["steps"][2]["name"] == "connections_closed" and out["steps"][2]["ok"]
    m.action.release.set()
    done = await m.until(lambda: _ended(m, started["id"]), "the snapshot ends")
    assert done["status"] == "completed"


async def _pool_is(m: Mesh, snapshot_id: str, pool: str) -> dict[str, Any] | None:
    entry = await m.snapshot(snapshot_id)
    return entry if entry["pool"] == pool else None


async def _primary_is(m: Mesh, member: str) -> dict[str, Any] | None:
    _, svc = await m.call("GET", "/v1/services/cache")
    return dict(svc) if svc.get("primary") == member else None


async def _count(reader: Reader, n: int) -> bool:
    return sum(reader.by_port.values()) >= n


async def _ended(m: Mesh, snapshot_id: str) -> dict[str, Any] | None:
    entry = await m.snapshot(snapshot_id)
    return entry if entry["status"] != "running" and entry["pool"] == "in" else None


async def _no_undo(m: Mesh, snapshot_id: str) -> bool:
    return not (await m.snapshot(snapshot_id))["undo"] and not m.node.snapshots.running()


async def _all_back(m: Mesh) -> bool:
    ports = {m.group.port(n) for n in m.group.names}
    return all(h == ports for h in await asyncio.to_thread(m.read_hosts))


@pytest.mark.parametrize("phase", ["drain", "pre_hook", "post_hook"])
async def test_a_failover_at_each_phase_completes_nothing_and_returns_the_member(mesh: Mesh, phase: str) -> None:
    """The failover (r1, the snapshotted replica, promoted behind the mesh) lands while the
    snapshot waits on its drain (a connection held to r1), runs its pre-hook, or its post-hook
    (the take itself: the test above)."""
    m = mesh
    sleepy = HookSpec(command=("sh", "-c", "sleep 1"), timeout=5.0)
    quick = HookSpec(command=("sh", "-c", "exit 0"))
    m.node.snapshots.deps.hooks = {"pre": sleepy if phase == "pre_hook" else quick,
                                   "post": sleepy if phase == "post_hook" else quick}.get
    held = None
    if phase == "drain":
        port = m.group.port("r1")
        others = []
        while held is None:
            client = redis.Redis(host="127.0.0.1", port=m.read_port, single_connection_client=True, socket_timeout=2)
            if int(await asyncio.to_thread(lambda c=client: c.info("server")["tcp_port"])) == port:
                held = client
            else:
                others.append(client)
        for other in others:
            other.close()
    if phase != "drain":
        m.action.release.set()  # the take itself does not wait
    _, started = await m.call("POST", "/v1/services/cache/snapshots", {"member": "r1"})
    reached = {
        "drain": lambda: _pool_is(m, started["id"], "draining"),
        "pre_hook": lambda: _undo_owed(m, started["id"], taken=False),
        "post_hook": lambda: _undo_owed(m, started["id"], taken=True),
    }[phase]
    await m.until(reached, f"the snapshot in its {phase}")
    m.group.command("r1", "REPLICAOF", "NO", "ONE")
    for other in ("r0", "r2"):
        m.group.command(other, "REPLICAOF", "127.0.0.1", str(m.group.port("r1")))
    try:
        done = await m.until(lambda: _ended(m, started["id"]), "the failover aborts the snapshot")
        assert done["status"] == "aborted", done
        await m.until(lambda: _no_undo(m, started["id"]), "the undo finished")
        await m.until(lambda: _all_back(m), "r1 back in every Envoy's read cluster")
        _, listed = await m.call("GET", "/v1/services/cache/snapshots")
        assert [s["status"] for s in listed["snapshots"]] == ["aborted"]
    finally:
        if held is not None:
            held.close()


async def _undo_owed(m: Mesh, snapshot_id: str, taken: bool) -> bool:
    entry = await m.snapshot(snapshot_id)
    return entry["undo"] == ["post_hook"] and bool(entry["artifact"]) == taken
