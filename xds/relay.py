"""What the node process and its xDS worker processes tell each other (workers.py), sans-IO.

Over one socketpair per worker, in both directions, length-prefixed frames (`encode`,
`FrameDecoder`): a 4-byte big-endian length, then a pickled message (both ends are this
code, started by the node: the pipe is private to them). Node → worker: `("init", WorkerInit)`,
`("snapshot", group, SnapshotWire, seq)` (one frame encoded once per version and written to every
worker: the resources' encoded bytes, digests and refs, never re-encoded; a worker's first),
then `("delta", group, SnapshotDelta, base_seq, seq)` for each next one (only what changed:
`snapshot_delta`; `seq` numbers the snapshots sent, and a worker whose copy is not `base_seq`
leaves, to be started again with the whole snapshot), `("renew",)`,
`("stop",)`, `("tick",)` (nothing to say: the node is alive). Worker → node: `("ready", port)` or `("failed", message)`, then `("facts",
facts, guards, holds)` once per event-loop pass in which anything happened (`FactBatcher`;
`holds` is the index of the snapshot the worker holds, told in the pass after it took it, so
the node has had every stream the worker opened before: `WorkerGate`), and `("alive",)` for
each tick.

A fact is one stream's news of that pass: `(stream_id, connect, events, mirror, gone)`;
`connect` is `(NodeInfo, kind)` on the pass it connected, `events` what the tracker recorded
(sent, ACKed, NACKed, stale: small tuples), `mirror` the stream's state after them
(mirror.StreamMirror.to_wire), `gone` True when it disconnected. `FactReplay` feeds them to
the node's `ProxyTracker`, so its observers and waiters see every proxy as if it were local.
"""

from __future__ import annotations

import gc
import pickle
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .cache import EncodedResource, Snapshot
from .limits import XdsLimits
from .messages import Acked, Action, Nacked, NodeInfo, Send, Stale
from .mirror import StreamMirror, mirror_wire
from .protocol import DeltaStream, SotwStream
from .sync_state import type_sync_state
from .tls import XdsSecurity
from .tracker import ProxyTracker

_HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30  # a snapshot of every resource of a large mesh fits many times over


class FrameError(Exception):
    """The peer sent something that is not a frame of ours: the pipe is closed."""


def encode(message: tuple[Any, ...]) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_FRAME:
        raise FrameError(f"a frame of {len(payload)} bytes is over {MAX_FRAME}")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Bytes in (any chunking), whole messages out."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        self._buffer += data
        out: list[tuple[Any, ...]] = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise FrameError(f"a frame of {size} bytes announced; the limit is {MAX_FRAME}")
            end = _HEADER.size + size
            if len(self._buffer) < end:
                break
            message = pickle.loads(bytes(self._buffer[_HEADER.size:end]))
            del self._buffer[:end]
            if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
                raise FrameError(f"not a message: {type(message).__name__}")
            out.append(message)
        return out

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# --- snapshots --------------------------------------------------------------------------------

SnapshotWire = tuple[str, tuple[str, ...], Mapping[str, Mapping[str, EncodedResource]]]


def snapshot_wire(snapshot: Snapshot) -> SnapshotWire:
    return (snapshot.version, snapshot.order, snapshot.resources)


def snapshot_from_wire(wire: SnapshotWire) -> Snapshot:
    """The worker's copy: the same encoded resources, nothing encoded again."""
    version, order, resources = wire
    return Snapshot(version, resources, order)


# (version, order, {type: {name: resource}} of what is new or changed, {type: (removed names,)});
# the new snapshot's types are exactly the keys of the first map.
SnapshotDelta = tuple[
    str, tuple[str, ...], Mapping[str, Mapping[str, EncodedResource]], Mapping[str, tuple[str, ...]]
]


def snapshot_delta(base: Snapshot, snapshot: Snapshot) -> SnapshotDelta:
    """What `snapshot` changes of `base`: the resources that are new or whose content differs
    (the encoder hands back the very same object for what did not change; an equal digest is
    the same content too), and the names gone. A change to one service of a mesh of thousands
    costs a frame of that service's resources, not of the whole mesh."""
    changed: dict[str, dict[str, EncodedResource]] = {}
    removed: dict[str, tuple[str, ...]] = {}
    for type_url, by_name in snapshot.resources.items():
        before = base.resources.get(type_url, {})
        changed[type_url] = {
            name: item for name, item in by_name.items()
            if (old := before.get(name)) is None or (old is not item and old.digest != item.digest)
        }  # fmt: skip
        gone = tuple(name for name in before if name not in by_name)
        if gone:
            removed[type_url] = gone
    return (snapshot.version, snapshot.order, changed, removed)


def snapshot_from_delta(base: Snapshot, delta: SnapshotDelta) -> Snapshot:
    """`base` with `delta` applied: the snapshot the node holds (the worker's copy of it)."""
    version, order, changed, removed = delta
    resources: dict[str, dict[str, EncodedResource]] = {}
    for type_url, news in changed.items():
        merged = dict(base.resources.get(type_url, {}))
        for name in removed.get(type_url, ()):
            merged.pop(name, None)
        merged.update(news)
        resources[type_url] = merged
    return Snapshot(version, resources, order)


@dataclass(frozen=True)
class WorkerInit:
    """What a worker is started with (every setting of the node's own AdsServer)."""

    host: str
    port: int
    control_plane_id: str
    limits: XdsLimits
    security: XdsSecurity
    first_stream_id: int
    never_acked_grace: float
    name: str = "xds-worker"
    log_level: int = 20
    grpc_options: tuple[tuple[str, Any], ...] = ()
    transport: str = "h2"  # server.TRANSPORTS
    # Bound but not accepting until the node says ("listen",): the first workers of a node
    # start taking connections together (workers.py), not the quickest one all of a storm.
    hold: bool = False
    # The node writes at least every `heartbeat` seconds; a worker that hears nothing for
    # `node_silence` exits (its listener closes): a frozen node's Envoys go to another node
    # instead of being served a config the node no longer renews. The worker answers each tick,
    # and the node applies the same rule to it (workers.py: a frozen worker is killed and
    # started again, not left holding its streams and its share of new connections).
    heartbeat: float = 0.5
    node_silence: float = 3.0


BUSY_NODE_FACTOR = 10  # a peer that runs but says nothing is waited for this many node_silence


def peer_is_gone(silent: float, silence: float, state: str) -> bool:
    """Should a process that has heard nothing from its peer for `silent` seconds give it up?
    A worker asks it of its node (and exits), the node of each worker (and kills it: the worker
    answers every tick). Yes when the peer is stopped (SIGSTOP, a paused container: state T/t),
    dead or unknown; a peer that runs or sleeps is busy (e.g. taking in a reconnect storm of
    tens of thousands of streams: leaving it would disconnect them all again) and is waited for
    up to BUSY_NODE_FACTOR x `silence` (a wedged loop)."""
    if silent < silence:
        return False
    if state in ("R", "S", "D"):
        return silent >= silence * BUSY_NODE_FACTOR
    return True


def process_state(pid: int) -> str:
    """The state letter of a process (Linux /proc: R running, S sleeping, D disk, T stopped, ...);
    "" when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


# --- worker side: facts, batched per event-loop pass ------------------------------------------

Event = tuple[Any, ...]


def event_of(action: Action) -> Event:
    if isinstance(action, Send):
        return ("s", action.type_url, action.version, action.nonce)
    if isinstance(action, Acked):
        return ("a", action.type_url, action.version, action.nonce)
    if isinstance(action, Nacked):
        return ("n", action.type_url, action.version, action.nonce, action.error)
    return ("x", action.type_url, action.nonce)


_NOTHING = Snapshot("0", {})  # what a replayed Send carries: the bytes stay in the worker


def action_of(event: Event) -> Action:
    tag = event[0]
    if tag == "s":
        return Send(event[1], event[2], event[3], (), (), _NOTHING)
    if tag == "a":
        return Acked(event[1], event[2], event[3])
    if tag == "n":
        return Nacked(event[1], event[2], event[3], event[4])
    if tag == "x":
        return Stale(event[1], event[2])
    raise FrameError(f"unknown event {tag!r}")


@dataclass
class _News:
    connect: tuple[NodeInfo, str] | None = None
    events: list[Event] = field(default_factory=list)
    gone: bool = False


class FactBatcher:
    """Collects what the worker's tracker recorded (and the limits hit, refusals made) until
    `drain`, called once per event-loop pass; `schedule` is called on the first news of a pass
    (the worker makes it `loop.call_soon(flush)`). Also the worker server's `GuardObserver`."""

    def __init__(self, schedule: Callable[[], object] = lambda: None) -> None:
        self.schedule = schedule
        self._news: dict[int, _News] = {}
        self._guards: list[tuple[str, str]] = []
        self._due = False
        self.churn = 0  # streams opened or closed (GcPolicy reads and resets it)
        self.passes = 0  # drains with something to tell
        self.last_pass = 0.0  # time.monotonic() of the last of them (GcPolicy.active)
        self.holds = -1  # the index of the snapshot the worker holds (sent with each drain)

    def took(self, index: int) -> None:
        """The worker took the snapshot at `index`: the node is told with this pass's facts,
        after the connects of every stream that may have been sent the snapshot before."""
        self.holds = index
        if not self._due:
            self._due = True
            self.schedule()

    def _entry(self, stream_id: int) -> _News:
        if not self._due:
            self._due = True
            self.schedule()
        news = self._news.get(stream_id)
        if news is None:
            news = self._news[stream_id] = _News()
        return news

    def connected(self, stream_id: int, node: NodeInfo, kind: str) -> None:
        self._entry(stream_id).connect = (node, kind)
        self.churn += 1

    def recorded(self, stream_id: int, actions: list[Action]) -> None:
        self._entry(stream_id).events.extend(event_of(a) for a in actions)

    def disconnected(self, stream_id: int) -> None:
        self._entry(stream_id).gone = True
        self.churn += 1

    def on_limit(self, limit: str) -> None:
        self._entry_guard(("limit", limit))

    def on_refusal(self, reason: str) -> None:
        self._entry_guard(("refusal", reason))

    def _entry_guard(self, guard: tuple[str, str]) -> None:
        if not self._due:
            self._due = True
            self.schedule()
        self._guards.append(guard)

    def drain(self, tracker: ProxyTracker) -> tuple[list[tuple[Any, ...]], list[tuple[str, str]]]:
        """The facts of this pass, each with its stream's state now (read from `tracker`)."""
        news, self._news, self._due = self._news, {}, False
        self.passes += 1
        self.last_pass = time.monotonic()
        guards, self._guards = self._guards, []
        facts: list[tuple[Any, ...]] = []
        # Streams of one push say the same things (the same events, the same state after them):
        # one object each, so the frame pickles each once and the node builds each once.
        same: dict[Any, Any] = {}
        for stream_id, item in news.items():
            record = tracker.records.get(stream_id)
            mirror = None
            if record is not None and isinstance(record.stream, (SotwStream, DeltaStream)):
                mirror = mirror_wire(record.stream, record.synced_index, type_sync_state)
                mirror = same.setdefault(mirror, mirror)
            events = tuple(same.setdefault(e, e) for e in item.events)
            facts.append((stream_id, item.connect, same.setdefault(events, events), mirror, item.gone))
        return facts, guards


class ReportingTracker(ProxyTracker):
    """The worker's tracker: keeps its streams' records (the protocol's sync state needs them)
    and tells a `FactBatcher` everything; the node's tracker keeps the history."""

    def __init__(self, batcher: FactBatcher, **kwargs: Any) -> None:
        super().__init__(keep_disconnected=0.0, max_disconnected=0, **kwargs)
        self.batcher = batcher

    def connect(self, stream_id: int, node: NodeInfo, stream: Any) -> Any:
        record = super().connect(stream_id, node, stream)
        self.batcher.connected(stream_id, node, stream.kind)
        return record

    def record(self, stream_id: int, actions: list[Action]) -> None:
        """Only what the worker itself reads of a record (`refresh` works out `synced_index`
        from the stream and which types were last NACKed); the sends, ACKs and NACKs with their
        times are the node's to keep (`FactReplay` records them there)."""
        record = self.records.get(stream_id)
        if record is None:
            return
        for action in actions:
            if isinstance(action, Nacked):
                record.status(action.type_url).refused = True
            elif isinstance(action, Acked):
                status = record.types.get(action.type_url)
                if status is not None:
                    status.refused = False
        self._changed(record)
        self.batcher.recorded(stream_id, actions)

    def disconnect(self, stream_id: int) -> None:
        super().disconnect(stream_id)
        self.batcher.disconnected(stream_id)


# --- worker side: the collector kept off the long-lived streams ----------------------------


# A worker's collector thresholds: young collections every 10,000 allocations (most of a push's
# temporary objects are gone by then, never walked) and the automatic full collection rare
# (GcPolicy does it when it is cheap). Measured in bench/RESULTS.md (issue 17, "collector").
GC_THRESHOLDS = (10_000, 10, 1_000)


def collect(move: str | None) -> None:
    """Do what `GcPolicy.due` said: 'full' (unfreeze, collect all, freeze what survives),
    'young' (collect the young generations, freeze what survives) or nothing."""
    if move == "full":
        gc.unfreeze()
        gc.collect()
        gc.freeze()
    elif move == "young":
        gc.collect(1)
        gc.freeze()


class GcPolicy:
    """When a worker moves what it holds out of the cyclic collector's sight: Python's
    collections walk every tracked object, and at thousands of streams the collections a push
    triggers cost as much CPU as a sixth of the push (bench/RESULTS.md). Two moves, sans-IO
    (`due(now, streams)` says which; the worker does it):

    - "full": once the stream count has settled (`quiet` seconds with no stream opened or
      closed) after moving by `churn` (a share of the streams, or `floor` streams), or every
      `full_every` seconds after any activity: unfreeze, collect everything, freeze what
      survives (closed streams' garbage is freed here);
    - "young": after a burst of activity (a push and its ACKs), once `settle` seconds passed
      with none: collect the young generations and freeze what survives, so the objects each
      push leaves (the streams' new state) are not walked by the next push's collections. A
      cycle that became garbage after reaching the oldest generation stays until the next
      "full" (at most `full_every` seconds)."""

    def __init__(
        self, churn: float = 0.1, floor: int = 100, quiet: float = 1.0, full_every: float = 300.0, settle: float = 0.4
    ) -> None:
        self.churn, self.floor, self.quiet, self.full_every, self.settle = churn, floor, quiet, full_every, settle
        self.frozen_at_count = 0  # streams held at the last full freeze
        self.changes = 0  # streams opened or closed since
        self.last_change = 0.0
        self.last_full = 0.0
        self.busy = False  # activity since the last freeze
        self.last_busy = 0.0

    def changed(self, now: float, count: int = 1) -> None:
        self.changes += count
        self.last_change = now

    def active(self, now: float) -> None:
        """The streams did something (a pass with facts to tell)."""
        self.busy, self.last_busy = True, now

    def due(self, now: float, streams: int) -> str | None:
        """'full', 'young' or None (see the class doc)."""
        if now - self.last_change >= self.quiet and self.changes >= max(
            self.floor, self.churn * max(streams, self.frozen_at_count)
        ):
            return self._full(now, streams)
        if not self.busy or now - self.last_busy < self.settle:
            return None
        if now - self.last_full >= self.full_every:
            return self._full(now, streams)
        self.busy = False
        return "young"

    def _full(self, now: float, streams: int) -> str:
        self.frozen_at_count, self.changes, self.last_full, self.busy = streams, 0, now, False
        return "full"


# --- node side: the facts replayed into the node's tracker ------------------------------------


class WorkerGate:
    """One worker as the node's waiters see it (progress.Progressing, `ProxyTracker.gates`):
    behind until the worker says it holds the index waited for. A worker gives a stream that
    connects the snapshot it holds, and the node learns of the stream from its next facts;
    without the gate a wait for index N could end on the ACKs of the streams the node knows
    while a stream just opened on a worker that had not yet read N was sent N-1 (the routes
    before a fence). The worker's `holds` comes after the facts of every stream it opened before
    it took N, so once every gate holds N, every such stream is one the wait follows."""

    gate = True  # not a proxy (progress.Progressing)

    def __init__(self, key: str) -> None:
        self.key = key
        self.connected = True  # False once the worker is gone: not waited for
        self.synced_index = -1

    def lag(self) -> tuple[str, str]:
        return "pending", "this node's xDS worker has not taken the snapshot yet"

    def excused(self, min_index: int) -> bool:
        return False


class FactReplay:
    """Feeds one worker's facts to the node's `tracker`; remembers which of its streams are
    connected, so that when the worker dies they are all marked disconnected (`lost`)."""

    def __init__(self, tracker: ProxyTracker) -> None:
        self.tracker = tracker
        self.live: set[int] = set()
        self.churn = 0  # streams connected or gone (the node's GcPolicy reads and resets it)

    def apply(self, facts: list[tuple[Any, ...]]) -> None:
        tracker = self.tracker
        actions: dict[Any, list[Action]] = {}  # the same events (one object: drain) once
        for stream_id, connect, events, mirror, gone in facts:
            if connect is not None:
                node, kind = connect
                view = StreamMirror(kind) if mirror is None else StreamMirror.from_wire(kind, mirror)
                tracker.connect(stream_id, node, view)
                self.live.add(stream_id)
                self.churn += 1
            record = tracker.records.get(stream_id)
            if record is None or stream_id not in self.live:
                continue
            if mirror is not None and isinstance(record.stream, StreamMirror) and connect is None:
                record.stream.update(mirror)
            if events or connect is None:
                replayed = actions.get(id(events))
                if replayed is None:
                    replayed = actions[id(events)] = [action_of(e) for e in events]
                tracker.record(stream_id, replayed)
            if gone:
                self.churn += 1
                self.live.discard(stream_id)
                tracker.disconnect(stream_id)

    def lost(self) -> int:
        """The worker is gone: every stream it served is disconnected. Returns how many."""
        live, self.live = self.live, set()
        for stream_id in sorted(live):
            self.tracker.disconnect(stream_id)
        return len(live)
