"""ReplicatedStore on real pysyncobj: in-process nodes on loopback, and separate OS processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from repstage_mesh.core.errors import CommitTimeout, NoQuorum, ReplicationError
from repstage_mesh.core.models import (
    CommandEnvelope,
    Member,
    MeshState,
    Outcome,
    PutService,
    ServiceSpec,
    SetPrimary,
)
from repstage_mesh.core.state import encode_state
from repstage_mesh.raft.conf import RaftTimings
from repstage_mesh.raft.store import RaftBindError, ReplicatedStore

PASSWORD = "test-raft-password"
ELECTION_DEADLINE = 5.0  # generous for a loaded 2-core machine; measured values are printed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `predicate()`; return the seconds it took, fail the test at the deadline."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def spec(name: str = "db", port: int = 6379) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        listen_port=port,
        members=(
            Member(name="a", address="127.0.0.1", port=7001),
            Member(name="b", address="127.0.0.1", port=7002),
        ),
    )


def put(name: str = "db", port: int = 6379, request_id: str = "") -> CommandEnvelope:
    return CommandEnvelope(command=PutService(spec=spec(name, port)), request_id=request_id)


def set_primary(member: str, service: str = "db", request_id: str = "") -> CommandEnvelope:
    return CommandEnvelope(
        command=SetPrimary(service=service, member=member), request_id=request_id
    )


class Cluster:
    """N in-process stores on loopback; every store is closed by `close()`."""

    def __init__(self, root: Path, n: int, timings: RaftTimings | None = None) -> None:
        self.timings = timings
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        self.dirs = [root / f"n{i}" for i in range(n)]
        self.stores: list[ReplicatedStore | None] = [None] * n
        self.applied: list[list[tuple[int, Outcome | None]]] = [[] for _ in range(n)]

    def start(self, i: int) -> ReplicatedStore:
        assert self.stores[i] is None
        log = self.applied[i]

        def on_apply(state: MeshState, outcome: Outcome | None) -> None:
            log.append((state.index, outcome))

        peers = [a for a in self.addresses if a != self.addresses[i]]
        store = ReplicatedStore(
            f"n{i}",
            self.addresses[i],
            peers,
            self.dirs[i],
            password=PASSWORD,
            on_apply=on_apply,
            timings=self.timings,
        )
        self.stores[i] = store
        return store

    def stop(self, i: int) -> None:
        store, self.stores[i] = self.stores[i], None
        if store is not None:
            store.close()

    def live(self) -> list[ReplicatedStore]:
        return [s for s in self.stores if s is not None]

    def leader(self) -> ReplicatedStore | None:
        leaders = [s for s in self.live() if s.is_leader()]
        return leaders[0] if len(leaders) == 1 else None

    def followers(self) -> list[ReplicatedStore]:
        return [s for s in self.live() if not s.is_leader()]

    def close(self) -> None:
        for i in range(len(self.stores)):
            self.stop(i)


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, 3)
    try:
        for i in range(3):
            cluster.start(i)
        yield cluster
    finally:
        cluster.close()


async def wait_leader(cluster: Cluster, timeout: float = ELECTION_DEADLINE) -> ReplicatedStore:
    await eventually(lambda: cluster.leader() is not None, timeout, "a single leader")
    leader = cluster.leader()
    assert leader is not None
    # every live node knows it (so writes on followers are forwarded at once)
    await eventually(
        lambda: all(s.status()["leader"] == leader.self_address for s in cluster.live()),
        timeout,
        "every node knows the leader",
    )
    return leader


def log_index_of(store: ReplicatedStore, request_id: str) -> int:
    """The Raft index of the entry carrying `request_id`, read from pysyncobj's own journal."""
    journal = store._sync._SyncObj__raftLog
    found = [journal[i][1] for i in range(len(journal)) if request_id.encode() in journal[i][0]]
    assert len(found) == 1, f"{request_id} found {len(found)} times in the journal"
    return int(found[0])


# --- single node --------------------------------------------------------------------------------


async def test_single_node_keeps_state_and_index_across_restart(tmp_path: Path) -> None:
    store = ReplicatedStore("solo", None, [], tmp_path / "solo")
    try:
        await eventually(store.is_leader, ELECTION_DEADLINE, "the single node leads")
        await store.submit(put(), timeout=2)
        outcome = await store.submit(set_primary("a"), timeout=2)
        assert outcome.ok and outcome.result["primary"] == "a"
        before = store.state
        assert before.services["db"].epoch == before.index > 0
    finally:
        store.close()
    assert (tmp_path / "solo" / "journal.bin").exists()

    again = ReplicatedStore("solo", None, [], tmp_path / "solo")
    try:
        # the journal is replayed without any network or election
        await eventually(lambda: again.state.index == before.index, 5, "journal replayed")
        assert encode_state(again.state) == encode_state(before)
        await eventually(again.is_leader, ELECTION_DEADLINE, "the single node leads again")
        outcome = await again.submit(set_primary("b"), timeout=2)
        assert outcome.ok
        assert again.state.services["db"].epoch > before.index
        # a lone node commits at once, without waiting for pysyncobj's 50 ms tick
        samples = []
        for i in range(21):
            start = time.perf_counter()
            await again.submit(set_primary("ab"[i % 2]), timeout=2)
            samples.append(time.perf_counter() - start)
        assert sorted(samples)[10] < 0.01, sorted(samples)
    finally:
        again.close()


async def test_on_apply_runs_on_the_event_loop_when_given_one(tmp_path: Path) -> None:
    import threading

    seen: list[tuple[int, bool, bool]] = []

    def on_apply(state: MeshState, outcome: Outcome | None) -> None:
        seen.append(
            (
                state.index,
                outcome is not None and outcome.ok,
                threading.current_thread() is threading.main_thread(),
            )
        )

    loop = asyncio.get_running_loop()
    store = ReplicatedStore("solo", None, [], tmp_path / "solo", on_apply=on_apply, loop=loop)
    try:
        await eventually(store.is_leader, ELECTION_DEADLINE, "the single node leads")
        await store.submit(put(), timeout=2)
        outcome = await store.submit(set_primary("a"), timeout=2)
        await eventually(lambda: len(seen) == 2, 1, "both applications reported")
        assert outcome.ok
        assert [index for index, _, _ in seen] == sorted(index for index, _, _ in seen)
        assert all(ok and on_loop_thread for _, ok, on_loop_thread in seen)
        assert seen[-1][0] == store.state.index == store.status()["applied_index"]
    finally:
        store.close()


def test_a_data_dir_in_use_is_refused(tmp_path: Path) -> None:
    store = ReplicatedStore("solo", None, [], tmp_path / "solo")
    try:
        with pytest.raises(ReplicationError, match="in use"):
            ReplicatedStore("other", None, [], tmp_path / "solo")
    finally:
        store.close()
    ReplicatedStore("solo", None, [], tmp_path / "solo").close()  # free again once closed


def test_peers_without_password_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="password"):
        ReplicatedStore("n1", "127.0.0.1:1", ["127.0.0.1:2"], tmp_path / "n1")
    assert not (tmp_path / "n1").exists()


def test_a_port_that_cannot_be_bound_fails_loudly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RaftBindError, match=address):
            ReplicatedStore("n1", address, ["127.0.0.1:9"], tmp_path / "n1", password=PASSWORD)
        assert time.monotonic() - start < 3


# --- three nodes in one process -----------------------------------------------------------------


async def test_write_on_a_follower_is_applied_everywhere_at_its_raft_index(
    cluster3: Cluster,
) -> None:
    leader = await wait_leader(cluster3)
    follower = cluster3.followers()[0]
    outcome = await follower.submit(put(request_id="req-put-1"), timeout=2)
    assert outcome.ok and outcome.result["created"] is True
    # answered only once applied on the node that took the write
    assert "db" in follower.state.services
    index = follower.state.services["db"].changed_at

    await eventually(lambda: all(s.state.index >= index for s in cluster3.live()), 2, "replicated")
    # the same entry got the same index on every replica, and that index is the Raft log's
    for store in cluster3.live():
        assert store.state.services["db"].changed_at == index
        assert log_index_of(store, "req-put-1") == index
    assert len({encode_state(s.state) for s in cluster3.live()}) == 1
    # on_apply saw the same sequence of indexes everywhere
    sequences = [[i for i, o in applied if o is not None] for applied in cluster3.applied]
    assert sequences[0] == sequences[1] == sequences[2]
    assert index in sequences[0]
    assert leader.status()["commit_index"] >= index


async def _barrier(store: ReplicatedStore, attempts: int = 3) -> Any:
    """A read barrier that succeeds: one interrupted by an election (a loaded CI machine can
    starve the heartbeats) says nothing either way, so it is asked again; the claim tested is
    about the barriers that answer."""
    for attempt in range(attempts):
        try:
            return await store.read_barrier(timeout=2)
        except (CommitTimeout, NoQuorum):
            if attempt == attempts - 1:
                raise
            await eventually(lambda: store.leader() is not None, ELECTION_DEADLINE, "a leader again")
    raise AssertionError("unreachable")


async def test_read_barrier_on_a_follower_sees_every_write_committed_before_it(
    cluster3: Cluster,
) -> None:
    leader = await wait_leader(cluster3)
    follower = cluster3.followers()[0]
    for i in range(20):
        outcome = await leader.submit(put(f"svc-{i}", 7000 + i), timeout=2)
        assert outcome.ok
        written_at = leader.state.services[f"svc-{i}"].changed_at
        state = await _barrier(follower)
        assert state.services[f"svc-{i}"].changed_at == written_at
        assert state.index > written_at


async def test_commit_latency_on_leader_and_follower(cluster3: Cluster) -> None:
    leader = await wait_leader(cluster3)
    follower = cluster3.followers()[0]
    await leader.submit(put(), timeout=2)
    figures = {}
    for name, store in (("leader", leader), ("follower", follower)):
        samples = []
        for i in range(100):
            start = time.perf_counter()
            outcome = await store.submit(set_primary("ab"[i % 2]), timeout=2)
            samples.append(time.perf_counter() - start)
            assert outcome.ok
        samples.sort()
        figures[name] = (samples[50] * 1000, samples[98] * 1000)
    print("commit latency p50/p99 ms (3 in-process nodes, encrypted):", figures)
    # batching off: a commit is a round trip, not a 100 ms batch period (FACTS)
    assert figures["leader"][0] < 50


async def test_leader_loss_elects_a_new_leader_and_writes_continue(cluster3: Cluster) -> None:
    old = await wait_leader(cluster3)
    await old.submit(put(), timeout=2)
    old_index = cluster3.stores.index(old)
    cluster3.stop(old_index)
    start = time.monotonic()
    new = await wait_leader(cluster3)
    elected = time.monotonic() - start
    outcome = await new.submit(set_primary("a"), timeout=3)
    committed = time.monotonic() - start
    print(f"leader stopped -> new leader {elected:.2f} s, next commit {committed:.2f} s")
    assert outcome.ok and new is not old
    assert new.status()["term"] > 1
    await eventually(
        lambda: all(s.state.services["db"].primary == "a" for s in cluster3.live()), 2, "replicated"
    )

    # the old node comes back and catches up
    back = cluster3.start(old_index)
    await eventually(lambda: back.state.index == new.state.index, 5, "the restarted node caught up")
    assert encode_state(back.state) == encode_state(new.state)


async def test_without_a_majority_submit_fails_with_no_quorum_in_bounded_time(
    cluster3: Cluster,
) -> None:
    await wait_leader(cluster3)
    survivor = cluster3.stores[0]
    assert survivor is not None
    await survivor.submit(put(), timeout=2)
    cluster3.stop(1)
    cluster3.stop(2)

    start = time.monotonic()
    # Refused (NoQuorum); or, if the survivor had forwarded the write to a leader that was just
    # stopped, "outcome unknown" (CommitTimeout). Either way, within the timeout.
    with pytest.raises((NoQuorum, CommitTimeout)) as raised:
        await survivor.submit(set_primary("a"), timeout=1.0)
    elapsed = time.monotonic() - start
    print(f"refused after {elapsed:.2f} s: {raised.value}")
    assert elapsed < 3.0  # bounded by the timeout (1 s), whatever the load
    assert "majority" in str(raised.value) or "leader" in str(raised.value)

    await eventually(lambda: not survivor.is_leader(), 3, "an isolated leader steps down")
    status = survivor.status()
    assert status["has_quorum"] is False and status["leader"] is None
    assert [p["connected"] for p in status["peers"]] == [False, False]
    # now the write is refused before it reaches any log: definitely not applied
    index = survivor.state.index
    with pytest.raises(NoQuorum) as raised:
        await survivor.submit(set_primary("a"), timeout=0.3)
    assert not isinstance(raised.value, CommitTimeout)
    assert survivor.state.index == index and survivor.state.services["db"].primary is None

    # the cluster heals when the others return
    cluster3.start(1)
    cluster3.start(2)
    await wait_leader(cluster3)
    outcome = await survivor.submit(set_primary("b"), timeout=3)
    assert outcome.ok and survivor.state.services["db"].primary == "b"


async def test_restarting_every_node_keeps_the_state(cluster3: Cluster) -> None:
    leader = await wait_leader(cluster3)
    await leader.submit(put(), timeout=2)
    for i, member in enumerate("abab"):
        await cluster3.live()[i % 3].submit(set_primary(member), timeout=2)
    await eventually(lambda: len({s.state.index for s in cluster3.live()}) == 1, 2, "all applied")
    before = encode_state(leader.state)
    before_index = leader.state.index

    cluster3.close()
    for i in range(3):
        cluster3.start(i)
    await eventually(
        lambda: all(s.state.index == before_index for s in cluster3.live()), 5, "journals replayed"
    )
    assert {encode_state(s.state) for s in cluster3.live()} == {before}
    new = await wait_leader(cluster3)
    await new.submit(set_primary("a"), timeout=2)
    assert new.state.index > before_index


async def test_confirm_leadership_only_on_a_leader_with_a_majority(cluster3: Cluster) -> None:
    leader = await wait_leader(cluster3)
    assert await leader.confirm_leadership(timeout=1.0) is True
    assert await cluster3.followers()[0].confirm_leadership(timeout=1.0) is False

    # cut the leader off: pysyncobj still says leader, the confirmation does not
    for i, store in enumerate(cluster3.stores):
        if store is not leader:
            cluster3.stop(i)
    assert leader.is_leader() is True  # stale: it steps down only after leaderFallbackTimeout
    start = time.monotonic()
    assert await leader.confirm_leadership(timeout=1.0) is False
    assert time.monotonic() - start < 3.0  # bounded by the timeout


async def _submit_retrying(cluster: Cluster, pick: Callable[[], ReplicatedStore], envelope: CommandEnvelope) -> Outcome:
    """Elections may still churn on a loaded 2-core machine: an unknown outcome is retried
    (these commands are idempotent: the same service, the same primary)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return await pick().submit(envelope, timeout=3)
        except CommitTimeout:
            if time.monotonic() > deadline:
                raise
            await wait_leader(cluster)


async def test_five_nodes_survive_two_losses_but_not_three(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 5)
    try:
        for i in range(5):
            cluster.start(i)
        leader = await wait_leader(cluster)
        await _submit_retrying(cluster, lambda: cluster.followers()[0], put())
        leader = await wait_leader(cluster)
        cluster.stop(cluster.stores.index(leader))
        cluster.stop(cluster.stores.index(cluster.followers()[0]))
        await wait_leader(cluster)
        outcome = await _submit_retrying(cluster, lambda: cluster.followers()[-1], set_primary("a"))
        assert outcome.ok
        survivor = await wait_leader(cluster)
        await eventually(
            lambda: all(s.state.index == survivor.state.index for s in cluster.live()), 5, "applied"
        )
        cluster.stop(cluster.stores.index(survivor))
        start = time.monotonic()
        # No majority: refused (NoQuorum), or, when the node had already forwarded it to the
        # leader that just went away, "outcome unknown" (CommitTimeout) — never a hang.
        with pytest.raises((NoQuorum, CommitTimeout)):
            await cluster.live()[0].submit(set_primary("b"), timeout=1.0)
        assert time.monotonic() - start < 3.0  # bounded: the timeout plus a tick
    finally:
        cluster.close()


async def test_compacted_log_reaches_a_lagging_node_as_a_snapshot(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 3, RaftTimings(log_compaction_min_entries=10))
    try:
        for i in range(3):
            cluster.start(i)
        leader = await wait_leader(cluster)
        await leader.submit(put(), timeout=2)
        lagging = next(i for i, s in enumerate(cluster.stores) if s is not leader)
        cluster.stop(lagging)
        for i in range(40):
            await leader.submit(set_primary("ab"[i % 2]), timeout=2)
        await eventually(
            lambda: all(
                (d / "dump.bin").exists() for d in cluster.dirs if d != cluster.dirs[lagging]
            ),
            5,
            "the others compacted their logs",
        )
        cluster.applied[lagging].clear()
        back = cluster.start(lagging)
        await eventually(lambda: back.state.index == leader.state.index, 5, "caught up")
        assert encode_state(back.state) == encode_state(leader.state)
        # the state arrived whole (outcome None), not entry by entry
        applied = cluster.applied[lagging]
        assert any(o is None for _, o in applied), applied
        assert len(applied) < 40, "not replayed entry by entry"
        # and the next entry gets the next index on every node
        outcome = await back.submit(set_primary("a"), timeout=2)
        assert outcome.ok
        await eventually(lambda: len({s.state.index for s in cluster.live()}) == 1, 2, "applied")
        assert len({encode_state(s.state) for s in cluster.live()}) == 1

        # a full restart loads the dumps and replays the rest of the journals
        before = encode_state(leader.state)
        cluster.close()
        for i in range(3):
            cluster.start(i)
        await eventually(
            lambda: {encode_state(s.state) for s in cluster.live()} == {before}, 5, "restored"
        )
    finally:
        cluster.close()


async def test_a_node_with_the_wrong_password_never_joins(tmp_path: Path) -> None:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]

    def node(i: int, password: str) -> ReplicatedStore:
        peers = [a for a in addresses if a != addresses[i]]
        return ReplicatedStore(f"n{i}", addresses[i], peers, tmp_path / f"n{i}", password=password)

    stores: list[ReplicatedStore] = []
    try:
        for i, password in enumerate([PASSWORD, PASSWORD, "not-the-password"]):
            stores.append(node(i, password))
        await eventually(
            lambda: any(s.is_leader() for s in stores[:2]), ELECTION_DEADLINE, "leader"
        )
        leader = next(s for s in stores[:2] if s.is_leader())
        outcome = await leader.submit(put(), timeout=2)
        assert outcome.ok
        await eventually(
            lambda: "db" in stores[0].state.services and "db" in stores[1].state.services,
            2,
            "both good nodes applied",
        )
        intruder = stores[2].status()
        assert intruder["leader"] is None and intruder["has_quorum"] is False
        assert "db" not in stores[2].state.services
        assert [
            p["connected"] for p in leader.status()["peers"] if p["address"] == addresses[2]
        ] == [False]
    finally:
        for store in stores:
            store.close()


# --- separate OS processes ----------------------------------------------------------------------

WORKER = Path(__file__).with_name("raft_node_proc.py")


class NodeProcess:
    def __init__(self, proc: asyncio.subprocess.Process, address: str) -> None:
        self.proc = proc
        self.address = address

    @classmethod
    async def start(
        cls, node_id: str, address: str, data_dir: Path, peers: list[str]
    ) -> NodeProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            node_id,
            address,
            str(data_dir),
            PASSWORD,
            *peers,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # one answer is one line: a long run's list of writes passes 64 KiB
        )
        node = cls(proc, address)
        try:
            assert await node._read(15) == {"ready": True}
        except BaseException:
            node.kill()
            raise
        return node

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise AssertionError(f"node {self.address} exited ({self.proc.returncode})")
        result: dict[str, Any] = json.loads(line)
        return result

    async def call(self, request: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._read(timeout)

    async def status(self) -> dict[str, Any]:
        return (await self.call({"op": "status"}))["status"]

    async def submit(self, envelope: CommandEnvelope, timeout: float) -> dict[str, Any]:
        request = {"op": "submit", "envelope": envelope.model_dump(mode="json"), "timeout": timeout}
        return await self.call(request, timeout + 5)

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.returncode is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(self.proc.pid, sig)
                except ProcessLookupError:
                    break

    async def stop(self) -> None:
        try:
            if self.proc.returncode is None:
                self.signal(signal.SIGCONT)
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "quit"}\n')
                await self.proc.stdin.drain()
                await asyncio.wait_for(self.proc.wait(), 5)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.kill()
            await self.proc.wait()


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[list[NodeProcess]]:
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


async def process_leader(
    nodes: list[NodeProcess], timeout: float = ELECTION_DEADLINE
) -> NodeProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = [await n.status() for n in nodes]
        leaders = {v["leader"] for v in views}
        by_address = {n.address: n for n in nodes}
        if len(leaders) == 1 and (address := leaders.pop()) in by_address:
            return by_address[address]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no agreed leader within {timeout} s")


async def test_processes_sigstopped_leader_is_deposed_and_cannot_confirm(
    processes: list[NodeProcess],
) -> None:
    leader = await process_leader(processes)
    others = [n for n in processes if n is not leader]
    answer = await others[0].submit(put(), timeout=2)
    assert answer["ok"], answer

    for node in (leader, others[0]):
        bench = await node.call(
            {"op": "bench", "envelope": set_primary("b").model_dump(mode="json"), "n": 200},
            timeout=30,
        )
        role = "leader" if node is leader else "follower"
        print(
            f"3 processes, commit from the {role}: p50 {bench['p50_ms']:.2f} ms, "
            f"p99 {bench['p99_ms']:.2f} ms"
        )

    leader.signal(signal.SIGSTOP)
    start = time.monotonic()
    new = await process_leader(others)
    elected = time.monotonic() - start
    answer = await others[1].submit(set_primary("a"), timeout=3)
    print(f"SIGSTOP leader -> new leader {elected:.2f} s, commit {time.monotonic() - start:.2f} s")
    assert answer["ok"], answer

    leader.signal(signal.SIGCONT)
    # Whatever its stale view says, the old leader cannot confirm its old term.
    confirm = await leader.call({"op": "confirm", "timeout": 2.0})
    assert confirm["confirmed"] is False, confirm
    await process_leader(processes)
    states = [await n.call({"op": "state"}) for n in processes]
    deadline = time.monotonic() + 5
    while len({s["state"] for s in states}) != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        states = [await n.call({"op": "state"}) for n in processes]
    assert len({s["state"] for s in states}) == 1
    assert json.loads(states[0]["state"])["services"]["db"]["primary"] == "a"
    assert new.address != leader.address


async def test_processes_two_of_three_paused_answer_no_quorum_then_heal(
    processes: list[NodeProcess],
) -> None:
    leader = await process_leader(processes)
    answer = await leader.submit(put(), timeout=2)
    assert answer["ok"], answer
    survivor, *paused = processes
    for node in paused:
        node.signal(signal.SIGSTOP)
    start = time.monotonic()
    answer = await survivor.submit(set_primary("a"), timeout=2.0)
    elapsed = time.monotonic() - start
    print(f"two of three paused: {answer.get('error')} after {elapsed:.2f} s")
    assert answer["ok"] is False
    # NoQuorum, or CommitTimeout when the write had been forwarded to the leader before it paused
    assert {"NoQuorum", "CommitTimeout"} & set(answer["kinds"]), answer
    assert elapsed < 3.0

    for node in paused:
        node.signal(signal.SIGCONT)
    await process_leader(processes, timeout=10)
    answer = await survivor.submit(set_primary("b"), timeout=3)
    assert answer["ok"], answer
    assert answer["outcome"]["result"]["primary"] == "b"
