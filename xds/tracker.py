"""Who is connected, and what each proxy was sent, ACKed and NACKed, per type.

Fed by the server with the protocol's actions; read by the REST API (`/v1/proxies`), by
metrics, and by whoever needs to wait for proxies to follow (break-before-make, failover
traces) through observers and waiters (`wait_for`, progress.py): after each change to one
proxy its `synced_index` is brought up to date and the open waiters see that one proxy. No I/O
here; the clock is passed in.

"Synced" means every type the proxy asked for holds what this replica would send. A NACKed
type is NOT synced: Envoy keeps its older config (for a fence, it may still route to the old
primary), and the proxy's `lag()` carries Envoy's error text.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from . import resources as res
from . import standing
from .cache import split_version
from .mirror import StreamMirror
from .progress import Behind, IndexWaiter, Progressing, Waiters, behind_of
from .protocol import (
    Acked,
    Action,
    DeltaStream,
    Nacked,
    NodeInfo,
    Send,
    SotwStream,
    Stale,
)
from .sync_state import type_sync_state

Clock = Callable[[], float]


@dataclass(slots=True)
class TypeStatus:
    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float | None = None
    acked_version: str = ""
    acked_at: float | None = None
    nacked_version: str = ""
    nacked_at: float | None = None
    error: str = ""
    last_ack_latency: float | None = None
    stale_requests: int = 0
    refused: bool = False  # the last answer for this type was a NACK
    # nonce -> when, for the responses not answered yet; None when there is none (one record
    # per stream and type: at 10,000s of streams an empty dict each is megabytes)
    _sent_times: dict[str, float] | None = field(default=None, repr=False)

    def answered(self, nonce: str) -> float | None:
        """When the response `nonce` was sent (None if not known); it is answered now."""
        times = self._sent_times
        if times is None:
            return None
        sent = times.pop(nonce, None)
        if not times:
            self._sent_times = None
        return sent


@dataclass(slots=True)
class ProxyRecord:
    stream_id: int
    node: NodeInfo
    kind: str
    control_plane: str
    connected_at: float
    stream: SotwStream | DeltaStream | StreamMirror  # a mirror: the stream is a worker's (mirror.py)
    disconnected_at: float | None = None
    types: dict[str, TypeStatus] = field(default_factory=dict)
    synced_index: int = -1  # highest snapshot index at which the proxy was seen fully synced
    never_acked_grace: float = 10.0  # see standing.never_acked
    first_sent_at: float | None = None  # the first response on this stream
    clock: Clock = field(default=time.time, repr=False)
    gate: ClassVar[bool] = False  # a proxy (progress.Progressing)

    @property
    def connected(self) -> bool:
        return self.disconnected_at is None

    @property
    def key(self) -> str:
        return f"{self.node.id}#{self.stream_id}"

    def refresh(self) -> None:
        """Bring `synced_index` up to date (cheap while a response is in flight)."""
        if isinstance(self.stream, StreamMirror):  # the worker's tracker worked it out
            self.synced_index = max(self.synced_index, self.stream.synced_index)
            return
        snap = self.stream.snapshot
        if snap is None or snap.index <= self.synced_index:
            return
        types = self.stream.types
        requested = False
        for state in types.values():
            if state.pending:
                return  # a response in flight
            requested = requested or state.requested
        if not requested:
            return  # nothing asked for yet (a new stream)
        # With nothing in flight, a type is synced unless its last answer was a NACK: the
        # protocol sends every difference at once (gated listeners go out on the cluster ACK).
        # Only a refused type needs the full comparison (cheap path: no digest per ACK).
        for type_url in types:
            st = self.types.get(type_url)
            if st is not None and st.refused and type_sync_state(self.stream, type_url) not in standing.SETTLED:
                return
        self.synced_index = snap.index

    def type_flags(self) -> list[tuple[str, bool, bool]]:
        """(type_url, asked for, a response in flight) for each type of the stream (or mirror)."""
        stream = self.stream
        if isinstance(stream, StreamMirror):
            return [(t, m.requested, m.pending) for t, m in list(stream.types.items())]
        return [(t, st.requested, bool(st.pending)) for t, st in list(stream.types.items())]

    def lag(self) -> tuple[str, str]:
        """('synced' | 'pending' | 'behind' | 'nacked', Envoy's error text for a NACK)."""
        worst = "synced"
        for type_url in self.stream.types:
            sync = type_sync_state(self.stream, type_url)
            if sync == "nacked":
                st = self.types.get(type_url)
                return "nacked", f"{res.short_name(type_url)}: {st.error if st else ''}"
            if sync in ("pending", "behind"):
                worst = sync
        return worst, ""

    def status(self, type_url: str) -> TypeStatus:
        st = self.types.get(type_url)
        if st is None:
            st = self.types[type_url] = TypeStatus()
        return st

    def synced(self, min_index: int = 0) -> bool:
        """True when every type the proxy asked for holds what this replica would send, from a
        snapshot at index >= min_index. A NACKed type is not synced: Envoy keeps older config."""
        snap = self.stream.snapshot
        if snap is None or snap.index < min_index:
            return False
        if standing.never_acked(self, self.clock()):
            return True  # it would hold every wait back for its whole deadline, for nothing
        return all(type_sync_state(self.stream, t) in standing.SETTLED for t in self.stream.types)

    def excused(self, min_index: int) -> bool:
        """Neither waited for nor counted as an ACK at `min_index` (standing.py)."""
        return standing.excused(self, min_index)

    def to_dict(self) -> dict[str, Any]:
        snap = self.stream.snapshot
        types: dict[str, Any] = {}
        for type_url, st in sorted(self.types.items()):
            sync = type_sync_state(self.stream, type_url)
            types[res.short_name(type_url)] = {
                "type_url": type_url,
                "sent_version": st.sent_version or None,
                "sent_at": st.sent_at,
                "acked_version": st.acked_version or None,
                "acked_at": st.acked_at,
                "nacked_version": st.nacked_version or None,
                "nacked_at": st.nacked_at,
                "error": st.error or None,
                "last_ack_latency_seconds": st.last_ack_latency,
                "sync": sync,
                "behind": sync in ("behind", "pending"),
            }
        return {
            "node_id": self.node.id,
            "cluster": self.node.cluster,
            "metadata": dict(self.node.metadata),
            "user_agent": self.node.user_agent,
            "stream_id": self.stream_id,
            "stream_kind": self.kind,
            "control_plane": self.control_plane,
            "connected": self.connected,
            "connected_at": self.connected_at,
            "disconnected_at": self.disconnected_at,
            "snapshot_version": snap.version if snap else None,
            "synced": self.connected and self.synced(),  # a closed stream holds nothing
            "synced_index": self.synced_index,
            "types": types,
            **standing.flags(self, self.clock()),
        }


class TrackerObserver(Protocol):
    """Hooks for metrics and traces. Every method is optional in spirit: implement all."""

    def on_connect(self, record: ProxyRecord) -> None: ...
    def on_disconnect(self, record: ProxyRecord) -> None: ...
    def on_send(self, record: ProxyRecord, send: Send) -> None: ...
    def on_ack(self, record: ProxyRecord, ack: Acked, latency: float | None) -> None: ...
    def on_nack(self, record: ProxyRecord, nack: Nacked) -> None: ...


class ProxyTracker:
    def __init__(
        self, control_plane: str = "", clock: Clock = time.time, keep_disconnected: float = 600.0,
        never_acked_grace: float = 10.0, max_disconnected: int = 1000,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        self.control_plane = control_plane
        self.max_disconnected = max_disconnected  # disconnected records kept for /v1/proxies
        self.on_limit = on_limit  # told "disconnected_proxies" when old records are forgotten
        self.never_acked_grace = never_acked_grace
        self.clock = clock
        self.keep_disconnected = keep_disconnected
        self.records: dict[int, ProxyRecord] = {}
        self._gone: dict[int, float] = {}  # disconnected stream ids, in the order they left
        self.observers: list[TrackerObserver] = []
        self.waiters = Waiters()
        # What every wait also waits for besides the proxies (relay.WorkerGate: the node's
        # xDS workers, until each holds the index); not proxies: not listed, not counted.
        self.gates: dict[str, Progressing] = {}

    def gate_changed(self, gate: Progressing) -> None:
        """A gate is new, moved, or gone (`connected` False: then forgotten)."""
        if gate.connected:
            self.gates[gate.key] = gate
        elif self.gates.get(gate.key) is gate:
            del self.gates[gate.key]
        self.waiters.changed(gate)

    def connect(self, stream_id: int, node: NodeInfo, stream: SotwStream | DeltaStream | StreamMirror) -> ProxyRecord:
        self._prune()
        record = ProxyRecord(
            stream_id, node, stream.kind, self.control_plane, self.clock(), stream,
            never_acked_grace=self.never_acked_grace, clock=self.clock,
        )
        self.records[stream_id] = record
        for obs in self.observers:
            obs.on_connect(record)
        self._changed(record)
        return record

    def disconnect(self, stream_id: int) -> None:
        record = self.records.get(stream_id)
        if record is None or record.disconnected_at is not None:
            return
        record.disconnected_at = self.clock()
        self._gone[stream_id] = record.disconnected_at
        for obs in self.observers:
            obs.on_disconnect(record)
        self.waiters.changed(record)

    def record(self, stream_id: int, actions: list[Action]) -> None:
        record = self.records.get(stream_id)
        if record is None:
            return
        now = self.clock()
        for action in actions:
            st = record.status(action.type_url)
            if isinstance(action, Send):
                st.sent_version, st.sent_nonce, st.sent_at = action.version, action.nonce, now
                if record.first_sent_at is None:
                    record.first_sent_at = now
                times = st._sent_times
                if times is None:
                    times = st._sent_times = {}
                times[action.nonce] = now
                if len(times) > 16:
                    times.pop(next(iter(times)))
                for obs in self.observers:
                    obs.on_send(record, action)
            elif isinstance(action, Acked):
                st.acked_version, st.acked_at, st.refused = action.version, now, False
                sent = st.answered(action.nonce)
                st.last_ack_latency = None if sent is None else now - sent
                for obs in self.observers:
                    obs.on_ack(record, action, st.last_ack_latency)
            elif isinstance(action, Nacked):
                st.nacked_version, st.nacked_at, st.error, st.refused = action.version, now, action.error, True
                st.answered(action.nonce)
                for obs in self.observers:
                    obs.on_nack(record, action)
            elif isinstance(action, Stale):
                st.stale_requests += 1
        self._changed(record)

    def _changed(self, record: ProxyRecord) -> None:
        record.refresh()
        self.waiters.changed(record)

    def connected(self) -> list[ProxyRecord]:
        return [r for r in self.records.values() if r.connected]

    def unsynced(self, min_index: int) -> list[ProxyRecord]:
        return [r for r in self.connected() if not r.synced(min_index)]

    def wait_for(
        self, min_index: int, on_done: Callable[[], None] | None = None, clock: Clock | None = None
    ) -> IndexWaiter:
        """A waiter satisfied when every connected proxy holds a snapshot at or after
        `min_index` (and every gate: `gates`); `on_done` runs on the ACK that satisfies it (at once if nobody is behind).
        Cancel it with `cancel(waiter)` when giving up."""
        waiter = IndexWaiter(min_index, clock or self.clock, on_done)
        return self.waiters.add(waiter, [*self.connected(), *self.gates.values()])

    def cancel(self, waiter: IndexWaiter) -> None:
        self.waiters.cancel(waiter)

    def low_water(self) -> int | None:
        """The lowest `synced_index` of the connected proxies (None when none is connected)."""
        indexes = [r.synced_index for r in self.records.values() if r.connected]
        return min(indexes) if indexes else None

    def behind(self, min_index: int) -> list[Behind]:
        """The connected proxies that do not hold `min_index`, with why."""
        return [behind_of(r) for r in self.connected() if r.synced_index < min_index]

    def to_list(self) -> list[dict[str, Any]]:
        self._prune()
        return [r.to_dict() for r in sorted(self.records.values(), key=lambda r: (r.node.id, r.stream_id))]

    def _prune(self) -> None:
        """Forget disconnected records beyond `max_disconnected` (oldest first) and older than
        `keep_disconnected`. O(records forgotten): it runs at every connect, and a reconnect
        storm of 30,000 streams made a scan of every record at each one a multi-second stall."""
        gone = self._gone
        excess = len(gone) - self.max_disconnected
        if excess > 0:
            for sid in list(itertools.islice(gone, excess)):
                self._forget(sid)
            if self.on_limit is not None:
                self.on_limit("disconnected_proxies")
        horizon = self.clock() - self.keep_disconnected
        while gone:
            sid, at = next(iter(gone.items()))
            if at >= horizon:
                break
            self._forget(sid)

    def _forget(self, sid: int) -> None:
        del self._gone[sid]
        record = self.records.get(sid)
        if record is not None and record.disconnected_at is not None:
            del self.records[sid]


def version_index(version: str) -> int:
    return split_version(version)[0]
