"""The Raft journal and port under abuse, with every node in its own OS process
(integration/raft_node_proc.py, durable journal on as by default):

- kill -9 of all three nodes under writes: after a restart, every acknowledged write is there
  (kill -9 keeps the page cache, so this shows the journal is complete and re-read correctly; that
  the journal is on disk before an acknowledgement is shown by tests/test_raft_durability.py);
- 1 GiB sent to the leader's Raft port without the password: the connection is dropped at the
  frame limit, the leader's RSS stays flat, there is no leader change, the refusal is counted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from integration.test_replication import NodeProcess, free_port, process_leader, put

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

GIB = 1 << 30
CHUNK = 1 << 20


@pytest.fixture
async def three(tmp_path: Path) -> AsyncIterator[list[NodeProcess]]:
    """Three node processes (restartable in place: `nodes[i] = await restart(...)`)."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes: list[NodeProcess] = []
    try:
        for i, address in enumerate(addresses):
            peers = [a for a in addresses if a != address]
            nodes.append(await NodeProcess.start(f"p{i}", address, tmp_path / f"p{i}", peers))
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def writer(
    node: NodeProcess, w: int, acked: list[str], outcomes: list[dict[str, object]], stop: asyncio.Event
) -> None:
    """Writes one new service after another through `node`; records each acknowledged one."""
    i = 0
    name_prefix = f"w{w}"
    while not stop.is_set():
        name = f"{name_prefix}-{i}"
        try:
            answer = await node.submit(put(name, 10000 + w * 5000 + i), timeout=2)
        except (AssertionError, BrokenPipeError, ConnectionResetError, TimeoutError):
            return  # the process was killed mid-request: that write is not acknowledged
        if answer.get("ok"):
            outcomes.append(answer["outcome"])
            acked.append(name)
        i += 1


async def test_kill_9_of_every_node_under_writes_loses_no_acknowledged_write(
    three: list[NodeProcess], tmp_path: Path
) -> None:
    await process_leader(three)
    acked: list[str] = []
    outcomes: list[dict[str, object]] = []
    stop = asyncio.Event()
    writers = [asyncio.create_task(writer(n, i, acked, outcomes, stop)) for i, n in enumerate(three)]
    try:
        deadline = time.monotonic() + 30
        while len(acked) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # pacing the kill, not synchronisation: writes keep going
        assert len(acked) >= 60, f"only {len(acked)} writes acknowledged in 30 s"
        for node in three:  # all at once, mid-write
            node.signal(signal.SIGKILL)
    finally:
        stop.set()
        await asyncio.gather(*writers, return_exceptions=True)
    for node in three:
        await node.proc.wait()
    assert all(o["ok"] for o in outcomes), [o for o in outcomes if not o["ok"]][:3]  # applied, not refused
    acknowledged = set(acked)

    addresses = [n.address for n in three]
    for i, address in enumerate(addresses):
        peers = [a for a in addresses if a != address]
        three[i] = await NodeProcess.start(f"p{i}", address, tmp_path / f"p{i}", peers)
    leader = await process_leader(three, timeout=15)
    barrier = await leader.submit(put("after-restart", 9999), timeout=5)
    assert barrier["ok"], barrier
    state = json.loads((await leader.call({"op": "state"}))["state"])
    missing = acknowledged - set(state["services"])
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged writes lost: {sorted(missing)[:5]}"


def flood(address: str, declared: int, total: int) -> int:
    """Send a frame header declaring `declared` bytes, then up to `total` bytes of it, without
    knowing the password. Returns how many bytes the node took before it dropped us."""
    host, port = address.rsplit(":", 1)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        payload = b"\0" * CHUNK
        try:
            sock.sendall(struct.pack("i", declared))
            while sent < total:
                sock.sendall(payload)
                sent += len(payload)
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:  # the node stopped reading and did not close: the limit failed
            return total
    return sent


async def test_one_gib_without_the_password_is_dropped_at_the_frame_limit(
    three: list[NodeProcess],
) -> None:
    leader = await process_leader(three)
    before = await leader.status()
    rss_before = rss_bytes(leader.proc.pid)

    sent = await asyncio.to_thread(flood, leader.address, GIB, GIB)
    rss_after = rss_bytes(leader.proc.pid)
    after = await leader.status()
    views = [await n.status() for n in three]
    print(f"1 GiB flood: node took {sent / 2**20:.0f} MiB before dropping; RSS "
          f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")

    assert sent < 64 * CHUNK, f"{sent} bytes taken: the frame was buffered, not dropped"
    assert rss_after - rss_before < 16 * CHUNK, (rss_before, rss_after)
    assert after["frames_refused"] >= 1
    assert after["is_leader"] and after["term"] == before["term"], (before, after)
    assert {v["leader"] for v in views} == {leader.address}
    answer = await three[1].submit(put("still-writable", 9998), timeout=3)
    assert answer["ok"], answer

