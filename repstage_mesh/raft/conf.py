"""How RepStage Mesh configures pysyncobj: timings tuned for a LAN/loopback cluster.

Kept apart from `replication.py` so the numbers, and why each one was chosen, are in one place.
See /work/shared/FACTS.md for the measurements behind them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pysyncobj import SyncObjConf

from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.raft.durable import DIR_MODE, FILE_MODE

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.bin"
DUMP_FILE = "dump.bin"
LOCK_FILE = "lock"


@dataclass(frozen=True)
class RaftTimings:
    """Raft timings in seconds. The defaults elect a leader within about 1 s on loopback."""

    # Leader heartbeat (append_entries) period. pysyncobj requires election_timeout_min > 3x this.
    append_entries_period: float = 0.05
    # A follower that hears nothing for a random time in [min, max] starts an election.
    election_timeout_min: float = 0.3
    election_timeout_max: float = 0.7
    # A connection we sent to but did not read from for this long is dropped (>= election max).
    connection_timeout: float = 1.5
    # Reconnect attempts to a peer that is down (pysyncobj default 5 s heals too slowly).
    connection_retry: float = 0.5
    # A leader that has not heard from a majority for this long steps down (default 30 s;
    # FACTS: with 30 s an isolated leader overlapped the new one by ~4.7 s).
    leader_fallback_timeout: float = 1.5
    # Compaction: write a full dump after this many log entries, or this long after the last one.
    log_compaction_min_entries: int = 2000
    log_compaction_min_time: float = 300.0
    # Binding the Raft port: try this many times, this far apart, then fail loudly.
    bind_retries: int = 3
    bind_retry_time: float = 0.3

    def __post_init__(self) -> None:
        if self.election_timeout_min <= 3 * self.append_entries_period:
            raise ValueError("election_timeout_min: must exceed 3 x append_entries_period")
        if self.election_timeout_max <= self.election_timeout_min:
            raise ValueError("election_timeout_max: must exceed election_timeout_min")
        if self.connection_timeout < self.election_timeout_max:
            raise ValueError("connection_timeout: must be at least election_timeout_max")
        if self.leader_fallback_timeout <= self.append_entries_period:
            raise ValueError("leader_fallback_timeout: must exceed append_entries_period")
        if self.log_compaction_min_entries < 2:
            raise ValueError("log_compaction_min_entries: must be at least 2")
        if self.bind_retries < 1:
            raise ValueError("bind_retries: must be at least 1 (0 would retry forever)")


def prepare_data_dir(data_dir: Path) -> None:
    """Create `data_dir` (and its parents) if missing, make it 0700 (only this user) and the
    files already in it 0600 (journals, dumps written by an older version or another umask)."""
    data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if data_dir.stat().st_mode & 0o777 != DIR_MODE:
        try:
            os.chmod(data_dir, DIR_MODE)
        except PermissionError:  # not ours (a mounted volume's root): say so, run on
            log.warning("data_dir %s is mode %o and not ours to change: other users may read the "
                        "journal", data_dir, data_dir.stat().st_mode & 0o777)
    for path in data_dir.iterdir():
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o077:
            try:
                os.chmod(path, FILE_MODE)
            except PermissionError:
                log.warning("%s is mode %o and not ours to change", path, path.stat().st_mode & 0o777)


def build_conf(
    data_dir: Path,
    password: str | None,
    timings: RaftTimings,
    on_state_changed: Callable[[int, int], None] | None = None,
    bind_address: str | None = None,
) -> SyncObjConf:
    """The SyncObjConf for one node whose journal and dump live in `data_dir` (created if missing,
    mode 0700 either way: the journal holds pickles).

    `bind_address` (HOST:PORT) is where the Raft port listens. pysyncobj knows a node by its
    self address (the string the peers list, our `raft.advertise`) and, without
    `bindAddress`, listens on that address's port on every interface (0.0.0.0, or :: for an
    IPv6 host), whatever its host; with `bindAddress` it listens there instead (a host name
    is resolved). So a node may bind 0.0.0.0 and be known as its pod IP or DNS name."""
    prepare_data_dir(data_dir)
    if bind_address is not None:  # pysyncobj splits at the last ':' and wants no brackets
        host, port = parse_host_port(bind_address)
        bind_address = f"{host}:{port}"
    return SyncObjConf(
        password=password,
        autoTick=True,
        # One entry per append_entries as soon as it is proposed: 0.25 ms vs 101 ms commit (FACTS).
        appendEntriesUseBatch=False,
        appendEntriesPeriod=timings.append_entries_period,
        raftMinTimeout=timings.election_timeout_min,
        raftMaxTimeout=timings.election_timeout_max,
        connectionTimeout=timings.connection_timeout,
        connectionRetryTime=timings.connection_retry,
        leaderFallbackTimeout=timings.leader_fallback_timeout,
        # Without a leader a command fails at once (MISSING_LEADER) instead of waiting in a
        # queue and committing at some unknown later time: callers retry within their deadline,
        # so "no quorum" means "not applied".
        commandsWaitLeader=False,
        dynamicMembershipChange=False,
        journalFile=os.fspath(data_dir / JOURNAL_FILE),
        fullDumpFile=os.fspath(data_dir / DUMP_FILE),
        logCompactionMinEntries=timings.log_compaction_min_entries,
        logCompactionMinTime=timings.log_compaction_min_time,
        # The state is small; forking a multi-threaded (asyncio + grpc) process is not safe.
        useFork=False,
        maxBindRetries=timings.bind_retries,
        bindRetryTime=timings.bind_retry_time,
        bindAddress=bind_address,
        onStateChanged=on_state_changed,
    )
