"""The replicated store: MeshState kept identical on 1, 3 or 5 nodes through pysyncobj's Raft log.

Every change is a `CommandEnvelope`, encoded to bytes and appended to the log; every node applies
committed entries in order with the pure `state.apply(state, command, index)`, where `index` is
the Raft log index of the entry (the same on every replica, so it can serve as epoch and version).

Threads: pysyncobj runs its own tick thread. Entries are applied, and `on_apply` is called, on that
thread, unless the store was given an event loop: then what the tick produced (applied states,
role changes, the results `submit` waits for) is handed to the loop in order, in one loop
callback at the end of each tick (`_Mailbox`): one wake-up of the loop per tick, not one per
entry.
`on_role_change` follows the same rule (see `ReplicatedStore`). `submit` and `confirm_leadership` are coroutines; `status`, `state` and
`is_leader` are cheap and safe from any thread.

Errors (see errors.py): `NoQuorum` (no leader / no majority: not applied),
`CommitTimeout` (the write may or may not be applied), `NoQuorumOutcomeUnknown` (both: there is no
majority *and* the write was handed to a leader that may still commit it), `RaftBindError`.

Durability: the journal is a `durable.DurableJournal` (msync before any read or send, term and
vote fsync'd), unless `durable=False` (then a power loss can lose acknowledged writes; logged
as a warning). The peer protocol is pickle over TCP, so multi-node mode requires a password (it
encrypts and authenticates peers); frames from a peer that has not authenticated are limited to
`unauthenticated_frame_limit` bytes (`guard.py`). There is no PreVote. The store must be constructed on a thread that outlives
it (pysyncobj stops ticking when the constructing thread exits; we pin that to the main thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConsumer, replicated
from pysyncobj.node import Node
from pysyncobj.syncobj import _RAFT_STATE
from pysyncobj.transport import Transport

from repstage_mesh.core.errors import (
    CommitTimeout,
    DataDirInUse,
    NoQuorum,
    NoQuorumOutcomeUnknown,
    RaftBindError,
    ReplicationError,
)
from repstage_mesh.core.models import Command, CommandEnvelope, MeshState, Noop, Outcome, Rejection
from repstage_mesh.raft import durable
from repstage_mesh.raft.conf import DUMP_FILE, LOCK_FILE, RaftTimings, build_conf
from repstage_mesh.raft.guard import DEFAULT_UNAUTHENTICATED_FRAME_LIMIT, guarded_transport

if TYPE_CHECKING:
    from pysyncobj import SyncObjConf

log = logging.getLogger(__name__)

__all__ = [
    "NoQuorumOutcomeUnknown",
    "OnApply",
    "OnRoleChange",
    "RaftBindError",
    "ReplicatedStore",
    "StateMachine",
]

OnApply = Callable[[MeshState, Outcome | None], None]
OnRoleChange = Callable[[bool], None]

# pysyncobj's fail reasons, split by what they say about the command.
_NOT_APPLIED = {
    FAIL_REASON.QUEUE_FULL: "the command queue is full",
    FAIL_REASON.MISSING_LEADER: "there is no leader",
    FAIL_REASON.NOT_LEADER: "the node we forwarded to is no longer leader",
    FAIL_REASON.DISCARDED: "a new leader replaced the entry",
}
_UNKNOWN = {
    FAIL_REASON.LEADER_CHANGED: "the leader changed before it answered",
    FAIL_REASON.UNKNOWN_OUTCOME: "the entry was applied through a snapshot before its answer came",
}
_RETRY_INTERVAL = 0.02

durable.install()


class StateMachine(Protocol):
    """The pure replicated state machine (the `repstage_mesh.core.state` module satisfies it)."""

    def apply(self, state: MeshState, command: Command, index: int) -> tuple[MeshState, Outcome]: ...

    def encode_command(self, envelope: CommandEnvelope) -> bytes: ...

    def decode_command(self, data: bytes) -> CommandEnvelope: ...

    def encode_state(self, state: MeshState) -> bytes: ...

    def decode_state(self, data: bytes) -> MeshState: ...


def _default_machine() -> StateMachine:
    from repstage_mesh.core import state

    return state


class _LocalTransport(Transport):
    """A single node needs no network: no listening socket, nobody to send to."""

    def send(self, node: Any, message: Any) -> bool:
        return False


class _Applier(SyncObjConsumer):
    """Holds the state; its replicated method is the only code that changes it.

    Runs on pysyncobj's thread and must never raise: an exception would leave pysyncobj's applied
    index behind and the entry would be applied again on the next tick.
    """

    def __init__(self, machine: StateMachine, notify: OnApply) -> None:
        super().__init__()
        self.machine = machine
        self.notify = notify
        self.state = MeshState()

    @replicated
    def apply_entry(self, data: bytes) -> Outcome:
        # pysyncobj applies entry i while raftLastApplied == i - 1 and increments it afterwards
        # (SyncObj.__applyLogEntries), on every replica, for replay and for live entries alike.
        index: int = self._syncObj.raftLastApplied + 1
        try:
            envelope = self.machine.decode_command(data)
            new_state, outcome = self.machine.apply(self.state, envelope.command, index)
        except Exception as exc:  # deterministic on every replica: refuse, keep state
            log.exception("log entry %d could not be applied; it changes nothing", index)
            new_state = self.state.model_copy(update={"index": max(index, self.state.index)})
            outcome = Outcome(
                ok=False,
                rejection=Rejection(code="invalid", message=f"entry {index} could not be applied: {exc}"),
            )
        self.state = new_state
        self.notify(new_state, outcome)
        return outcome

    # Full dumps (log compaction, snapshots sent to lagging followers) hold the encoded state only.
    def _serialize(self) -> dict[str, bytes]:
        return {"state": self.machine.encode_state(self.state)}

    def _deserialize(self, data: dict[str, bytes]) -> None:
        self.state = self.machine.decode_state(data["state"])
        self.notify(self.state, None)


@dataclass(frozen=True)
class _Snapshot:
    """What the tick thread last saw of sets that are unsafe to read from other threads."""

    has_quorum: bool
    connected: frozenset[str]


class _Mailbox:
    """What pysyncobj's thread hands to the event loop: callables run on the loop in the order
    they were posted (log order: an entry's `on_apply`, then its submitter's result), in one
    loop callback per `flush` (the store flushes at the end of every tick).

    Batching per tick matters for latency twice over: one wake-up per tick instead of one per
    entry, and no hand-over of the GIL in the middle of a tick (each `call_soon_threadsafe` is a
    write to the loop's self-pipe, which lets the loop thread take the GIL and start rendering
    while pysyncobj's thread still holds the result of the entry it just applied, measured as
    ~1.2 ms per REST write). The order within a batch is kept on purpose: the render that
    `on_apply` schedules runs before the submitters resume, so the push to the proxies is
    queued before whatever a submitter does next (the failover runner's bookkeeping and its
    history commit); a REST write's answer waits for the render and encode, not for the push
    (measured both ways in bench/RESULTS.md, "REST change and announced switch")."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._scheduled = False
        self.closed = False

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        self._items.append((fn, args))

    def flush(self) -> None:
        """Wake the loop for what was posted (pysyncobj's thread, end of a tick)."""
        if not self._items or self._scheduled or self.closed:
            return
        self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed: nobody listens any more
            self._items.clear()

    def _drain(self) -> None:
        self._scheduled = False
        while self._items and not self.closed:
            fn, args = self._items.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("raft: a callback on the event loop failed")


def _node_id(node: Any) -> str | None:
    return None if node is None else str(node.id)


def leadership_change(old_state: int, new_state: int) -> bool | None:
    """What pysyncobj's `onStateChanged(old_state, new_state)` says about "am I leader":
    True (became leader), False (stopped being leader), None (no change: follower <-> candidate,
    or old == new, which pysyncobj never reports)."""
    was_leader = old_state == _RAFT_STATE.LEADER
    is_leader = new_state == _RAFT_STATE.LEADER
    return is_leader if was_leader != is_leader else None


class ReplicatedStore:
    """MeshState replicated by Raft. One instance per control-plane node.

    `peers` are the other nodes' Raft addresses ("host:port"); none means a single node, which
    needs no network but still keeps its journal and dumps in `data_dir`.

    `on_role_change(is_leader)` is called with True when pysyncobj makes this node Raft leader
    and with False when it stops being leader (stepping down for a higher term, or for hearing
    from no majority within `leader_fallback_timeout`). Only changes of "am I leader" are
    reported, so calls alternate True, False, True...; follower <-> candidate changes are not,
    and nothing is reported for the initial state, which is never leader (the first call, if
    any, is True). A single node elects itself through the same change (follower, candidate,
    leader) shortly after start, so it too gets one True. It is called where `on_apply` is: on
    `loop` at the end of the tick (`_Mailbox`; in the order of the changes, and in order with
    `on_apply`: a new leader's True comes before its first entry is applied) when the store has a loop,
    otherwise on pysyncobj's thread in the middle of its state change (then it must be quick
    and must not block). It may come before the constructor returns (the election runs on
    pysyncobj's thread), is never called once `close()` has begun (a change already scheduled
    on the loop is dropped: a closed store is not leader, and nothing says so), and its
    exceptions are logged, never propagated into pysyncobj.

    The callback only says "pysyncobj now believes this node is (or is no longer) leader": a
    deposed leader that has not yet heard of the new term still believes it (see
    `confirm_leadership`). Use it to wake up, not to decide: deciding still requires
    `confirm_leadership`.
    """

    def __init__(
        self,
        node_id: str,
        self_address: str | None,
        peers: Sequence[str],
        data_dir: Path | str,
        *,
        password: str | None = None,
        on_apply: OnApply | None = None,
        on_role_change: OnRoleChange | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        machine: StateMachine | None = None,
        timings: RaftTimings | None = None,
        bind_address: str | None = None,
        durable_journal: bool = True,
        unauthenticated_frame_limit: int = DEFAULT_UNAUTHENTICATED_FRAME_LIMIT,
        on_frame_refused: Callable[[int], None] | None = None,
    ) -> None:
        peers = _checked_peers(node_id, self_address, peers, password)
        if not durable_journal:
            log.warning(
                "raft: the durable journal is off (raft.durable_journal: false): a power loss of a "
                "majority can lose acknowledged writes and issue an epoch twice"
            )
        self._journal_options = durable.JournalOptions(
            durable=durable_journal, dump_file=str(Path(data_dir) / DUMP_FILE)
        )
        self._transport = guarded_transport(unauthenticated_frame_limit, self._frame_refused)
        self._on_frame_refused = on_frame_refused
        self.frames_refused = 0
        self.node_id = node_id
        self.self_address = self_address
        self.peers = tuple(peers)
        self.data_dir = Path(data_dir)
        self._on_apply = on_apply
        self._on_role_change = on_role_change
        self._loop = loop
        self._mailbox = _Mailbox(loop) if loop is not None else None
        self._machine = machine if machine is not None else _default_machine()
        self._timings = timings or RaftTimings()
        self._snapshot = _Snapshot(has_quorum=not peers, connected=frozenset())
        self._closed = False
        # pysyncobj's nodes hash and compare by id, so a plain Node finds the TCPNode of a peer.
        self._peer_keys = tuple(Node(p) for p in self.peers)
        self._applier = _Applier(self._machine, self._notify)
        conf: SyncObjConf = build_conf(
            self.data_dir, password if peers else None, self._timings, self._on_state_changed,
            bind_address=bind_address if peers else None,
        )
        self.bind_address = bind_address or self_address
        self._lock_file = _lock_data_dir(self.data_dir)
        self._sync = self._start(conf)
        self._sync.addOnTickCallback(self._on_tick)

    def _start(self, conf: SyncObjConf) -> SyncObj:
        """Build pysyncobj's node and wait until it listens. On failure, release the data dir."""
        try:
            with durable.journal_options(self._journal_options):
                if self.peers:
                    assert self.self_address is not None
                    sync = durable.DurableSyncObj(
                        self.self_address, list(self.peers), conf=conf, consumers=[self._applier],
                        transportClass=self._transport,
                    )
                else:
                    sync = SyncObj(
                        Node(self.self_address or f"local:{self.node_id}"), [], conf=conf,
                        consumers=[self._applier], nodeClass=Node, transportClass=_LocalTransport,
                    )
        except BaseException:
            self._lock_file.close()
            raise
        # pysyncobj's tick thread stops when the thread that built it exits; tie it to the
        # process's main thread instead so a store may be built from a worker thread.
        sync._SyncObj__mainThread = threading.main_thread()
        try:
            sync.waitBinded()
        except Exception as exc:
            self._closed = True
            sync.destroy_synchronous()
            self._lock_file.close()
            raise RaftBindError(
                f"cannot listen on {self.bind_address} after {self._timings.bind_retries} attempts "
                "(the port is in use or the address is not this host's); choose another raft.bind "
                "or stop what uses it"
            ) from exc
        return sync

    # --- called on pysyncobj's thread -------------------------------------------------------------

    def _notify(self, state: MeshState, outcome: Outcome | None) -> None:
        callback = self._on_apply
        if callback is None:
            return
        if self._mailbox is not None:
            self._mailbox.post(callback, state, outcome)
            return
        try:
            callback(state, outcome)
        except Exception:
            log.exception("on_apply callback failed at index %d", state.index)

    def _on_state_changed(self, old_state: int, new_state: int) -> None:
        """pysyncobj's onStateChanged, called inside SyncObj.__setState; must never raise (that
        would abort pysyncobj's state change half-way)."""
        is_leader = leadership_change(old_state, new_state)
        callback = self._on_role_change
        if is_leader is None or self._closed:
            return
        log.info("raft: this node is %s leader (pysyncobj's view)", "now" if is_leader else "no longer")
        if callback is None:
            return
        if self._mailbox is not None:
            self._mailbox.post(self._report_role, callback, is_leader)
            return
        try:
            self._report_role(callback, is_leader)
        except Exception:
            log.exception("on_role_change callback failed (is_leader=%s)", is_leader)

    def _report_role(self, callback: OnRoleChange, is_leader: bool) -> None:
        if not self._closed:  # checked where the callback runs: a change queued on the loop
            callback(is_leader)  # before close() is dropped after it

    def _frame_refused(self, size: int) -> None:
        self.frames_refused += 1
        callback = self._on_frame_refused
        if callback is not None:
            try:
                callback(size)
            except Exception:
                log.exception("on_frame_refused callback failed")

    def _on_tick(self) -> None:
        sync = self._sync
        durable.sync_journal_of(sync)  # what this tick appended is on disk before the next one
        if not self.peers:
            self._wake_if_uncommitted()
        connected = frozenset(key.id for key in self._peer_keys if sync.isNodeConnected(key))
        self._snapshot = _Snapshot(has_quorum=sync.hasQuorum, connected=connected)
        if self._mailbox is not None:
            self._mailbox.flush()  # what this tick applied, in one loop callback

    def _wake_if_uncommitted(self) -> None:
        # A single node commits an entry on the tick after it appends it, but nothing (no peer
        # reply) wakes pysyncobj's poller in between, so every commit would wait a whole
        # autoTickPeriod (measured: 50 ms p50). Wake it when the log is ahead of the commit index.
        sync = self._sync
        journal = sync._SyncObj__raftLog
        if len(journal) and journal[-1][1] > sync.raftCommitIndex:
            notifier = getattr(sync, "_SyncObj__pipeNotifier", None)
            if notifier is not None:
                with contextlib.suppress(OSError):  # pipe full: a wake-up is pending anyway
                    notifier.notify()

    # --- reads ------------------------------------------------------------------------------------

    @property
    def state(self) -> MeshState:
        """This node's applied state (frozen; replaced, never mutated)."""
        return self._applier.state

    def is_leader(self) -> bool:
        """pysyncobj's own view; may be stale (see DESIGN). For display only: decide with
        `confirm_leadership`."""
        return bool(self._sync._isLeader())

    def leader(self) -> str | None:
        """The leader's Raft address as this node last saw it, if that leader is reachable."""
        leader = _node_id(self._sync._getLeader())
        if leader is None:
            return None
        if leader == _node_id(self._sync.selfNode):
            # A leader that stepped down (lost its majority) still names itself until an
            # election: not a leader anybody can reach (seen in integration/test_replication.py).
            return leader if self._sync._isLeader() else None
        if leader in self._snapshot.connected:
            return leader
        return None

    def status(self) -> dict[str, Any]:
        """This node's Raft view, JSON-serialisable (GET /v1/cluster)."""
        snap = self._snapshot
        is_leader = self.is_leader()
        return {
            "node": self.node_id,
            "address": self.self_address,
            "leader": self.leader(),
            "is_leader": is_leader,
            "term": int(self._sync.raftCurrentTerm),
            "commit_index": int(self._sync.raftCommitIndex),
            # pysyncobj counts an entry as applied only after our apply returns; the state may
            # already hold it (and pysyncobj's own no-ops never reach the state)
            "applied_index": max(int(self._sync.raftLastApplied), self.state.index),
            "state_index": self.state.index,
            "peers": [{"address": p, "connected": p in snap.connected} for p in self.peers],
            "has_quorum": snap.has_quorum,
            "frames_refused": self.frames_refused,
        }

    # --- writes -----------------------------------------------------------------------------------

    async def submit(self, envelope: CommandEnvelope, timeout: float) -> Outcome:
        """Commit `envelope` through the log from any node; return its Outcome once it is
        committed and applied on this node. Raises within `timeout` seconds (plus a tick):
        NoQuorum (not applied), CommitTimeout (unknown), NoQuorumOutcomeUnknown (both)."""
        if timeout <= 0:
            raise ValueError("timeout: must be positive")
        if self._closed:
            raise ReplicationError("the replicated store is closed")
        data = self._machine.encode_command(envelope)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        why_not = "no leader yet"
        while True:
            if self.leader() is None or not self._snapshot.has_quorum:
                why_not = self._why_no_quorum()
            else:
                fut: asyncio.Future[tuple[Any, int]] = loop.create_future()
                self._applier.apply_entry(data, callback=self._resolver(loop, fut))
                try:  # the future itself, not asyncio.wait: the caller resumes one loop pass sooner
                    async with asyncio.timeout_at(deadline):
                        result, err = await fut
                except TimeoutError:
                    raise self._timeout(timeout) from None
                if err == FAIL_REASON.SUCCESS:
                    assert isinstance(result, Outcome)
                    return result
                if err in _UNKNOWN:
                    raise CommitTimeout(f"write outcome unknown: {_UNKNOWN[err]}")
                if err not in _NOT_APPLIED:
                    raise ReplicationError(f"write refused by raft (fail reason {err})")
                why_not = _NOT_APPLIED[err]
            if loop.time() + _RETRY_INTERVAL >= deadline:
                raise NoQuorum(f"write not committed within {timeout:g} s: {why_not}; nothing was applied")
            await asyncio.sleep(_RETRY_INTERVAL)  # back-off between attempts, not synchronisation

    def _resolver(
        self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[tuple[Any, int]]
    ) -> Callable[[Any, int], None]:
        """A pysyncobj callback (called on its thread, or on the loop's for a refusal at once)
        that resolves `fut` on `loop` with the tick's other results; never raises."""
        mailbox = self._mailbox
        loop_thread = threading.get_ident()  # submit runs on the loop

        def callback(result: Any, err: int) -> None:
            if mailbox is not None and threading.get_ident() != loop_thread:
                mailbox.post(_set_result, fut, result, err)
                return
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(_set_result, fut, result, err)

        return callback

    def _why_no_quorum(self) -> str:
        if not self._snapshot.has_quorum:
            reachable = len(self._snapshot.connected) + 1
            return f"this node reaches {reachable} of {len(self.peers) + 1} nodes, no majority"
        return "there is no leader (election in progress)"

    def _timeout(self, timeout: float) -> CommitTimeout:
        if self.leader() is None or not self._snapshot.has_quorum:
            return NoQuorumOutcomeUnknown(
                f"write not committed within {timeout:g} s: {self._why_no_quorum()}; it reached a "
                "leader and may still be applied"
            )
        return CommitTimeout(f"write not confirmed within {timeout:g} s; it may or may not be applied")

    async def read_barrier(self, timeout: float) -> MeshState:
        """A linearizable read: commit a Noop through the log, then return this node's state,
        which then includes every write committed before the call. Plain `state` on a follower
        may lag (FACTS: follower-local reads are not linearizable). Raises like `submit`."""
        await self.submit(CommandEnvelope(command=Noop(node=self.node_id)), timeout)
        return self.state

    async def confirm_leadership(self, timeout: float) -> bool:
        """True only if this node is leader, commits a Noop in its current term, and is still
        leader in that same term afterwards. Never raises for lack of quorum: answers False."""
        term = int(self._sync.raftCurrentTerm)
        if not self.is_leader():
            return False
        try:
            await self.submit(CommandEnvelope(command=Noop(term=term, node=self.node_id)), timeout)
        except ReplicationError:
            return False
        return self.is_leader() and int(self._sync.raftCurrentTerm) == term

    # --- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop pysyncobj and free its port and files. Idempotent; blocks for up to one tick."""
        if self._closed:
            return
        self._closed = True
        if self._mailbox is not None:
            self._mailbox.closed = True
        self._sync.removeOnTickCallback(self._on_tick)
        self._sync.destroy_synchronous()
        self._lock_file.close()

    def __enter__(self) -> ReplicatedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked_peers(
    node_id: str, self_address: str | None, peers: Sequence[str], password: str | None
) -> list[str]:
    """The peers other than this node; raises ValueError for a configuration that cannot work."""
    if not node_id:
        raise ValueError("node_id: must not be empty")
    others = [p for p in peers if p != self_address]
    if len(set(others)) != len(others):
        raise ValueError(f"peers: duplicate addresses in {others}")
    if others and not self_address:
        raise ValueError("self_address: required when peers are given (the Raft bind address)")
    if others and not password:
        raise ValueError(
            "password: required when peers are given; pysyncobj's peer protocol is pickle over "
            "TCP and without a password anyone who reaches the Raft port can run code"
        )
    if (len(others) + 1) % 2 == 0:
        log.warning("%d control-plane nodes: an even count tolerates no more failures than %d",
                    len(others) + 1, len(others))
    return others


def _lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold an exclusive lock on data_dir while the store runs: two nodes sharing one journal
    would corrupt it. Released by closing the returned file (or by the process exiting)."""
    handle = open(data_dir / LOCK_FILE, "ab")  # noqa: SIM115 (held open until close())
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataDirInUse(
            f"{data_dir} is in use by another running node (it holds {data_dir / LOCK_FILE}); "
            "give each node its own node.data_dir, or stop the other node"
        ) from None
    return handle


def _set_result(fut: asyncio.Future[tuple[Any, int]], result: Any, err: int) -> None:
    if not fut.done():  # a submitter that timed out cancelled it
        fut.set_result((result, err))

