"""What the node process knows of a stream that an xDS worker process serves.

With `xds.workers` above 0 (workers.py) the streams live in worker processes; the node's
`ProxyTracker` holds, for each of them, a `StreamMirror` in place of the stream: the facts the
tracker, its waiters (progress.py), standing.py, the metrics and the push tracer read of a
stream (its snapshot's version, per type: asked for, a response in flight, the client's claimed
floor and ACKed version, and the type's sync state as `protocol.type_sync_state` worked it out
in the worker) plus the `synced_index` the worker's own tracker computed. Plain values, no I/O:
`mirror_wire` takes them from a live stream, `StreamMirror.from_wire` rebuilds them from the
tuple the worker sends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """The version of the snapshot a mirrored stream holds (what the tracker reads of it)."""

    version: str

    @property
    def index(self) -> int:
        return int(self.version)


@dataclass(slots=True)
class TypeMirror:
    requested: bool = False
    pending: bool = False  # a response is in flight
    floor: int = -1  # SotW: index of the version the client came back with
    acked_version: str = ""
    sync: str = "idle"  # protocol.type_sync_state, worked out in the worker


class StreamMirror:
    """Takes the worker's tuple as it comes (`update` is O(1): it runs on every ACK of every
    stream); `types` is built from it when something reads it (scrapes, /v1/proxies)."""

    __slots__ = ("_types", "_wire", "kind", "snapshot", "synced_index")

    def __init__(
        self, kind: str, snapshot: SnapshotRef | None = None, types: dict[str, TypeMirror] | None = None,
        synced_index: int = -1,
    ) -> None:
        self.kind = kind
        self.snapshot = snapshot
        self.synced_index = synced_index  # the worker tracker's ProxyRecord.synced_index
        self._types: dict[str, TypeMirror] | None = types if types is not None else {}
        self._wire: tuple[Any, ...] = ()

    @property
    def types(self) -> dict[str, TypeMirror]:
        if self._types is None:
            self._types = {t: TypeMirror(req, pending, floor, acked, sync) for t, req, pending, floor, acked, sync in self._wire}
        return self._types

    def sync_state(self, type_url: str) -> str:
        if self._types is None:
            for entry in self._wire:
                if entry[0] == type_url:
                    return str(entry[5])
            return "idle"
        mirrored = self._types.get(type_url)
        return "idle" if mirrored is None else mirrored.sync

    def to_wire(self) -> tuple[Any, ...]:
        version = self.snapshot.version if self.snapshot is not None else None
        types = tuple((t, m.requested, m.pending, m.floor, m.acked_version, m.sync) for t, m in self.types.items())
        return (version, self.synced_index, types)

    def update(self, wire: tuple[Any, ...]) -> None:
        """Take the state `to_wire` sent (the whole of it: it replaces what was mirrored)."""
        version, self.synced_index, self._wire = wire
        self._types = None
        if self.snapshot is None or self.snapshot.version != version:
            self.snapshot = None if version is None else SnapshotRef(version)

    @classmethod
    def from_wire(cls, kind: str, wire: tuple[Any, ...]) -> StreamMirror:
        mirror = cls(kind)
        mirror.update(wire)
        return mirror


def mirror_wire(stream: Any, synced_index: int, sync_state: Callable[[Any, str], str]) -> tuple[Any, ...]:
    """`StreamMirror.to_wire` of a live `SotwStream`/`DeltaStream` (`sync_state`:
    protocol.type_sync_state), built directly: the worker runs it for every stream that moved.

    A SotW type's sync state is worked out again only when something it depends on moved
    (`_sotw_sync`); a push then costs one type's work per stream, not every type's."""
    snap = stream.snapshot
    sotw = stream.kind == "sotw"
    types = tuple(
        (type_url, state.requested, bool(state.pending), state.floor, state.acked_version,
         _sotw_sync(stream, type_url, state, sync_state) if sotw else sync_state(stream, type_url))
        for type_url, state in stream.types.items()
    )
    return (snap.version if snap is not None else None, synced_index, types)


_IN_FLIGHT = object()  # `_TypeState.sync_memo` taken while a response was in flight


def _sotw_sync(stream: Any, type_url: str, state: Any, sync_state: Callable[[Any, str], str]) -> str:
    """`sync_state(stream, type_url)`, memoised on the type's state (`_TypeState.sync_memo`).

    What it reads of the stream: of the snapshot, this type's selection for the client and all
    of this type (their digests: a push that leaves a type alone leaves its answer alone) and
    whether the snapshot is older than what the client came back with; this type's own answers
    (its last nonce, whether a response is in flight, its ACKed version, how many contents it
    NACKed, that floor); and, through what other types hold or gate, the stream's
    `generation`, which every change that can move another type's wanted content bumps
    (protocol.py: a response of clusters or of resources that refer to something, any request
    but a plain ACK). Three shortcuts, each what `sync_state` would answer: a type with a response
    in flight is 'pending'; while the stream holds the very snapshot of the last answer, the
    type's own answers and `generation` decide it without the selections (a push's ACK: the
    types it left alone); and the type a push's plain ACK answered is 'synced' (below). `tests/test_xds_relay.py` compares the mirror with the worker's own
    view after random pushes, ACKs and NACKs."""
    snapshot = stream.snapshot
    if snapshot is None or not state.requested:
        return sync_state(stream, type_url)
    memo = state.sync_memo
    generation, nonce = stream.generation, state.last_nonce
    if state.pending and (state.wildcard or state.names):
        if memo is None or memo[0] is not _IN_FLIGHT or memo[2] is not snapshot or memo[3] != (generation, nonce):
            state.sync_memo = (_IN_FLIGHT, "pending", snapshot, (generation, nonce))
        return "pending"
    own = (generation, nonce, bool(state.pending), state.acked_version, len(state.nacked), state.floor)
    if memo is not None and memo[2] is snapshot:
        if memo[3] == own:
            return str(memo[1])
        if memo[0] is _IN_FLIGHT and memo[3] == (generation, nonce) and not state.nacked:
            # What was in flight when the memo was taken was answered with nothing else moving
            # (the same snapshot, no newer response, no request but a plain ACK: any other bumps
            # `generation`): a plain ACK, after which the protocol has nothing to send
            # (`_plain_ack`); with no content ever refused, that is 'synced'.
            state.sync_memo = (None, "synced", snapshot, own)
            return "synced"
    key = (own, state.floor > snapshot.index, stream._selection(type_url, state).digest,
           snapshot.selection(type_url, None).digest)
    sync = str(memo[1]) if memo is not None and memo[0] == key else sync_state(stream, type_url)
    state.sync_memo = (key, sync, snapshot, own)
    return sync
