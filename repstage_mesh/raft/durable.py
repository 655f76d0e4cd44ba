"""A durable Raft journal: nothing this node acknowledges can be lost by a power cut.

pysyncobj 0.3.17's `FileJournal` writes log entries into an mmap it never msyncs
(`Journal.flush()` exists, nothing calls it) and its term and vote (the `.meta` file) through a
rename without fsync. After a power loss of a majority, an entry (and so an epoch, which is a
Raft index) could be issued twice.

`DurableJournal` subclasses `FileJournal` and keeps one invariant:

    every journal mutation is on disk (msync of the mmap) before the journal is next read,
    before any message leaves this node, and by the end of the tick; term and vote are fsync'd
    (file and directory) before `setCurrentTerm` returns; the full dump (log compaction, an
    installed snapshot) is fsync'd (file and directory) before the journal is cleared for it.

That covers the three points where Raft acknowledges: a follower answers AppendEntries success
(a message: the transport calls `sync()` first, see `guard.GuardedTCPTransport`), the leader
counts its own entry towards the commit index (the count reads the entry back from the journal:
synced by then), a vote is granted (pysyncobj stores the vote through `setCurrentTerm` before it
sends `response_vote`). Follower appends of many entries in one message cost one msync, not
one per entry. The leader's own flush overlaps replication, as Raft allows (its section
10.2.1): `DurableSyncObj` sends AppendEntries (and the `apply_command_response` that precedes
them for a command a follower forwarded) before the leader's msync and msyncs right after the
send returns, before this tick goes on: the leader counts its own entry towards the commit
index in a later tick, by then on disk. So a commit costs about one flush (the leader's and a
follower's at the same time), not two in a row. A leader that loses power before its msync
lost entries that only followers hold: not yet committed (a majority holds them or not), as when
a leader dies before it sends.

pysyncobj builds its journal with the module-level `pysyncobj.syncobj.createJournal(path)`;
`install()` replaces that function (once per process) with one that builds a `DurableJournal`,
with the options `journal_options(...)` set on the calling thread while `SyncObj` is built
(default: durable). Pinned in tests/test_pinned_internals.py.

With `durable=False` (config `raft.durable_journal: false`) the journal behaves as pysyncobj's
own: faster commits, and a power loss may lose acknowledged writes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pysyncobj.syncobj
from pysyncobj.journal import FileJournal, Journal, MemoryJournal
from pysyncobj.pickle import dumps

FILE_MODE = 0o600
DIR_MODE = 0o700


@dataclass(frozen=True)
class JournalOptions:
    durable: bool = True
    #: pysyncobj's full dump (log compaction, installed snapshots), written by its Serializer
    #: through a rename without fsync: made durable before the journal drops what it replaces
    dump_file: str | None = None


_options = threading.local()


@contextlib.contextmanager
def journal_options(options: JournalOptions) -> Iterator[None]:
    """Journals built on this thread inside the block use `options`."""
    previous = getattr(_options, "value", None)
    _options.value = options
    try:
        yield
    finally:
        _options.value = previous


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableMetaStorer:
    """pysyncobj's MetaStorer (term, vote, commit index) with fsync of the file and its directory,
    and mode 0600. Records what is known to be on disk (`durable_meta`) for the tests."""

    def __init__(self, path: str, durable: bool) -> None:
        self._path = path
        self._durable = durable
        self.durable_meta: dict[str, Any] = {}
        self.fsyncs = 0

    def getMeta(self) -> dict[str, Any]:
        from pysyncobj.pickle import loads

        try:
            with open(self._path, "rb") as handle:
                meta = loads(handle.read())
        except Exception:  # missing, torn or foreign: pysyncobj also starts afresh
            return {}
        self.durable_meta = dict(meta)
        return dict(meta)

    def storeMeta(self, meta: dict[str, Any]) -> None:
        tmp = self._path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.write(fd, dumps(meta))
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        if self._durable:
            fsync_dir(os.path.dirname(os.path.abspath(self._path)))
            self.fsyncs += 1
            self.durable_meta = dict(meta)

    def getPath(self) -> str:
        return self._path


class DurableJournal(FileJournal):
    """FileJournal that msyncs before it is read or a message is sent (see the module doc)."""

    def __init__(self, journal_file: str, options: JournalOptions) -> None:
        existed = os.path.exists(journal_file)
        self._durable = options.durable
        self._dump_file = options.dump_file
        self._dirty = False
        self._sending = False
        self.syncs = 0
        storer = DurableMetaStorer(journal_file + ".meta", options.durable)
        super().__init__(journal_file)
        # FileJournal built its own MetaStorer and read the meta with it; ours reads the same file.
        self._FileJournal__metaStorer = storer
        self._FileJournal__meta = storer.getMeta()
        os.chmod(journal_file, FILE_MODE)
        if not existed and self._durable:
            self._FileJournal__journalFile.flush()
            fsync_dir(os.path.dirname(os.path.abspath(journal_file)))
        entries = self._FileJournal__journal
        #: the last log index known to be on disk (for tests; 0: none)
        self.durable_index = int(entries[-1][1]) if entries else 0

    @property
    def durable(self) -> bool:
        return self._durable

    @property
    def meta_storer(self) -> DurableMetaStorer:
        storer: DurableMetaStorer = self._FileJournal__metaStorer
        return storer

    @contextlib.contextmanager
    def leader_sending(self) -> Iterator[None]:
        """The leader's AppendEntries go out before its own msync, which follows at once."""
        self._sending = True
        try:
            yield
        finally:
            self._sending = False
            self.sync()

    def sync(self) -> None:
        """Put every mutation since the last sync on disk (msync, MS_SYNC). Cheap when clean.
        Deferred while the leader sends its entries (`leader_sending`)."""
        if not self._dirty or self._sending:
            return
        self._dirty = False
        if not self._durable:
            return
        self._FileJournal__journalFile.flush()
        self.syncs += 1
        entries = self._FileJournal__journal
        self.durable_index = int(entries[-1][1]) if entries else 0

    # --- mutations: remembered, synced before the next read or send ------------------------------

    def add(self, command: Any, idx: int, term: int) -> None:
        super().add(command, idx, term)
        self._dirty = True

    def clear(self) -> None:
        # pysyncobj clears the journal right after a full dump replaced it: after compaction
        # (deleteEntriesTo calls clear) and after installing a leader's snapshot. The dump
        # must be on disk before the shorter journal can be.
        self.sync_dump()
        super().clear()
        self._dirty = True

    def sync_dump(self) -> None:
        dump = self._dump_file
        if not self._durable or dump is None or not os.path.exists(dump):
            return
        fd = os.open(dump, os.O_RDONLY)
        try:
            os.fchmod(fd, FILE_MODE)  # pysyncobj wrote it with the umask's mode
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(os.path.abspath(dump)))

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        super().deleteEntriesFrom(entryFrom)
        self._dirty = True

    def deleteEntriesTo(self, entryTo: int) -> None:
        super().deleteEntriesTo(entryTo)
        self._dirty = True

    # --- reads: sync first ------------------------------------------------------------------------

    def __getitem__(self, item: Any) -> Any:
        self.sync()
        return super().__getitem__(item)

    def __len__(self) -> int:
        self.sync()
        return int(super().__len__())

    def _destroy(self) -> None:
        self.sync()
        super()._destroy()


def _create_journal(journal_file: str | None = None) -> Journal:
    if journal_file is None:
        return MemoryJournal()
    options: JournalOptions = getattr(_options, "value", None) or JournalOptions()
    return DurableJournal(journal_file, options)


def install() -> None:
    """Make pysyncobj build `DurableJournal`s (idempotent)."""
    pysyncobj.syncobj.createJournal = _create_journal


class DurableSyncObj(pysyncobj.syncobj.SyncObj):
    """pysyncobj's node, its leader's flush overlapping replication (see the module doc)."""

    def _SyncObj__sendAppendEntries(self) -> None:
        journal = self._SyncObj__raftLog
        if not isinstance(journal, DurableJournal):
            super()._SyncObj__sendAppendEntries()
            return
        with journal.leader_sending():
            super()._SyncObj__sendAppendEntries()


def sync_journal_of(sync_obj: Any, message: Any = None) -> None:
    """Sync the journal of a SyncObj if it is ours (called before every message it sends).
    Not for the index a leader gives a forwarded command (`apply_command_response`): no
    acknowledgement, and the AppendEntries that follow it sync right after they are sent."""
    if isinstance(message, dict) and message.get("type") == "apply_command_response":
        return
    journal = getattr(sync_obj, "_SyncObj__raftLog", None)
    if isinstance(journal, DurableJournal):
        journal.sync()
