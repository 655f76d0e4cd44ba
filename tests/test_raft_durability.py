"""The durable journal (raft/durable.py): nothing is acknowledged before it is on disk.

A power cut cannot be simulated here, so the tests watch the moments Raft acknowledges, on a
real 3-node cluster on loopback: every AppendEntries success a follower sends, every vote it
grants and every commit index the leader computes is checked, at that moment, against what the
journal has put on disk (msync'd entries, fsync'd term and vote). The same check with the
durable journal off finds violations: the test can fail.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.transport import TCPTransport

from repstage_mesh.core.models import CommandEnvelope, Noop
from repstage_mesh.raft import durable
from repstage_mesh.raft.conf import JOURNAL_FILE
from repstage_mesh.raft.store import ReplicatedStore
from tests.fakes import eventually

PASSWORD = "durability-test-password"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class AckLog:
    acks: int = 0
    votes: int = 0
    commits: int = 0
    overlapped: int = 0  # leader's AppendEntries sent before its own msync of them (allowed)
    violations: list[str] = field(default_factory=list)


@pytest.fixture
def ack_log(monkeypatch: pytest.MonkeyPatch) -> AckLog:
    """Checks every acknowledgement as it leaves (TCPTransport.send) and every commit index the
    leader sets (DurableJournal.setRaftCommitIndex) against what is on disk at that moment."""
    log = AckLog()
    send = TCPTransport.send
    set_commit = durable.DurableJournal.setRaftCommitIndex

    def checked_send(self: Any, node: Any, message: Any) -> bool:
        journal = self._syncObj._SyncObj__raftLog
        if isinstance(message, dict) and message.get("type") == "next_node_idx" and message["success"]:
            log.acks += 1
            acked = message["next_node_idx"] - 1
            if journal.durable_index < acked:
                log.violations.append(f"ack of index {acked} with {journal.durable_index} on disk")
        entries = message.get("entries") if isinstance(message, dict) else None
        if isinstance(message, dict) and message.get("type") == "append_entries" and entries and entries[-1][1] > journal.durable_index:
            log.overlapped += 1
        if isinstance(message, dict) and message.get("type") == "response_vote":
            log.votes += 1
            meta = journal.meta_storer.durable_meta
            if (meta.get("currentTerm"), meta.get("votedForNodeId")) != (message["term"], node.id):
                log.violations.append(f"vote for {node.id} in term {message['term']} with {meta} on disk")
        return bool(send(self, node, message))

    def checked_commit(self: Any, index: int) -> None:
        log.commits += 1
        if index > self.durable_index:
            log.violations.append(f"commit index {index} with {self.durable_index} on disk")
        set_commit(self, index)

    monkeypatch.setattr(TCPTransport, "send", checked_send)
    monkeypatch.setattr(durable.DurableJournal, "setRaftCommitIndex", checked_commit)
    return log


def start_cluster(root: Path, durable_journal: bool) -> list[ReplicatedStore]:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    stores: list[ReplicatedStore] = []
    try:
        for i, address in enumerate(addresses):
            peers = [a for a in addresses if a != address]
            stores.append(ReplicatedStore(f"n{i}", address, peers, root / f"n{i}", password=PASSWORD,
                                          durable_journal=durable_journal))
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[list[list[ReplicatedStore]]]:
    started: list[list[ReplicatedStore]] = []
    try:
        yield started
    finally:
        for stores in started:
            for store in stores:
                store.close()


async def write_through_every_node(stores: list[ReplicatedStore], n: int) -> None:
    await eventually(lambda: any(s.is_leader() for s in stores) and all(s.leader() for s in stores),
                     "a leader every node knows", timeout=20)
    for i in range(n):
        store = stores[i % len(stores)]
        await store.submit(CommandEnvelope(command=Noop(node=store.node_id)), timeout=10)


@pytest.mark.parametrize("durable_journal", [True, False], ids=["durable", "not-durable"])
async def test_nothing_is_acknowledged_before_it_is_on_disk(
    tmp_path: Path, ack_log: AckLog, clusters: list[list[ReplicatedStore]], durable_journal: bool
) -> None:
    clusters.append(start_cluster(tmp_path, durable_journal))
    await write_through_every_node(clusters[0], 30)
    assert ack_log.acks >= 30 and ack_log.votes >= 1 and ack_log.commits >= 30, ack_log
    if durable_journal:
        assert ack_log.violations == []
        # The leader's flush overlaps replication (durable.DurableSyncObj), and still nothing
        # is counted towards a commit before it is on the leader's disk (checked_commit).
        assert ack_log.overlapped >= 1, ack_log
    else:  # the check sees what the durable journal prevents
        assert ack_log.violations, "without the durable journal the check found nothing: it cannot fail"


def test_a_journal_mutation_is_synced_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    journal = durable.DurableJournal(str(tmp_path / "j"), durable.JournalOptions())
    resizable = journal._FileJournal__journalFile
    flush = resizable.flush
    monkeypatch.setattr(resizable, "flush", lambda: (events.append("msync"), flush())[1])
    try:
        journal.add(b"a", 2, 1)
        journal.add(b"b", 3, 1)
        assert events == []  # batched: one msync for a follower's whole AppendEntries
        assert len(journal) == 2
        assert events == ["msync"] and journal.durable_index == 3
        assert journal[-1] == (b"b", 3, 1)
        assert events == ["msync"]  # clean: no second msync
        journal.deleteEntriesFrom(1)
        assert journal[-1][1] == 2 and events == ["msync", "msync"]
    finally:
        journal._destroy()


def test_term_and_vote_are_fsynced_before_set_current_term_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsynced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd))[1])
    journal = durable.DurableJournal(str(tmp_path / "j"), durable.JournalOptions())
    try:
        fsynced.clear()
        journal.setCurrentTerm(7, "127.0.0.1:7002")
        assert len(fsynced) == 2  # the meta file, then its directory (the rename)
        again = durable.DurableMetaStorer(str(tmp_path / "j.meta"), durable=True).getMeta()
        assert (again["currentTerm"], again["votedForNodeId"]) == (7, "127.0.0.1:7002")
        assert stat.S_IMODE((tmp_path / "j.meta").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "j").stat().st_mode) == 0o600
    finally:
        journal._destroy()


def test_not_durable_journal_neither_msyncs_nor_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsynced: list[int] = []
    monkeypatch.setattr(os, "fsync", fsynced.append)
    journal = durable.DurableJournal(str(tmp_path / "j"), durable.JournalOptions(durable=False))
    try:
        journal.add(b"a", 2, 1)
        journal.setCurrentTerm(1, None)
        assert len(journal) == 1 and journal.syncs == 0 and fsynced == []
    finally:
        journal._destroy()


async def test_data_dir_is_0700_journal_0600_and_switching_off_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "loose"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    (data_dir / "leftover.bin").write_bytes(b"")  # left by an older version, world-readable
    os.chmod(data_dir / "leftover.bin", 0o644)
    with caplog.at_level("WARNING"):
        store = ReplicatedStore("solo", None, [], data_dir, durable_journal=False)
    try:
        await store.submit(CommandEnvelope(command=Noop(node="solo")), timeout=5)
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((data_dir / JOURNAL_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "leftover.bin").stat().st_mode) == 0o600
        assert "durable journal is off" in caplog.text
    finally:
        store.close()
    fresh = tmp_path / "a" / "b"
    with ReplicatedStore("solo2", None, [], fresh):
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


async def test_a_single_node_commits_only_what_is_on_disk(tmp_path: Path, ack_log: AckLog) -> None:
    store = ReplicatedStore("solo", None, [], tmp_path / "solo")
    try:
        for _ in range(10):
            await store.submit(CommandEnvelope(command=Noop(node="solo")), timeout=5)
        assert ack_log.commits >= 10 and ack_log.violations == []
    finally:
        store.close()


def test_the_full_dump_is_fsynced_before_the_journal_is_cleared_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    dump = tmp_path / "dump.bin"
    dump.write_bytes(b"the state")
    journal = durable.DurableJournal(str(tmp_path / "j"), durable.JournalOptions(dump_file=str(dump)))
    clear = durable.FileJournal.clear
    monkeypatch.setattr(durable.FileJournal, "clear", lambda self: (events.append("clear"), clear(self))[1])
    try:
        for i in range(2, 6):
            journal.add(b"x", i, 1)
        events.clear()
        journal.deleteEntriesTo(2)  # compaction: the dump now holds what is dropped
        assert events[:3] == [str(dump), str(tmp_path), "clear"], events
        assert stat.S_IMODE(dump.stat().st_mode) == 0o600
        assert [e[1] for e in journal] == [4, 5]
    finally:
        journal._destroy()
