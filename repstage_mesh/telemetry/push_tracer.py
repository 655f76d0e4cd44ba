"""The push tracer: follows one change (one Raft index) to every one of this node's proxies' ACK.

Every node (followers too) adds a "push" span for its own proxies to the failover's trace, because
the trace context travels inside the replicated command (`SetPrimary.trace`, W3C traceparent).

Span "push" (one per node and version): attributes repstage.control_plane, repstage.version (the
Raft index), repstage.push.proxies (count expected), and at its end repstage.push.followed (count),
repstage.push.not_followed / .lagging / .nacked / .disconnected (proxy node ids),
repstage.push.timed_out; status ERROR when a proxy did not follow. Events, one per proxy:
"ack" (repstage.proxy.node_id, .proxy.stream_id, repstage.version: the version_info ACKed,
repstage.latency_s: from the push's start, repstage.xds.send_ack_s: that response's send -> ACK,
repstage.xds.types: e.g. ["eds"]), "unchanged" (its config did not change at this version),
"nack" (with repstage.error), "disconnect".

    push_tracer = tracing.push_tracer()
    push_tracer.attach(tracker)                         # a TrackerObserver

    # every node, once the command at `index` is applied AND published to the xDS cache:
    push_tracer.begin(index, command.trace, timeout=ack_deadline)

    # leader, failover engine: how this node's proxies followed
    result = await push_tracer.wait(ft.context(), timeout=ack_deadline + 1)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from repstage_mesh.telemetry._otel import _PROPAGATOR, _attrs
from repstage_mesh.xds import resources as res
from repstage_mesh.xds import standing
from repstage_mesh.xds.protocol import Acked, Nacked, Send
from repstage_mesh.xds.sync_state import type_sync_state
from repstage_mesh.xds.tracker import ProxyRecord, ProxyTracker

log = logging.getLogger(__name__)

__all__ = ["PushResult", "PushTracer", "version_index"]

_KEEP_RESULTS = 64


@dataclass(frozen=True)
class PushResult:
    """How this node's proxies followed one version."""

    control_plane: str
    version_index: int
    traceparent: str
    expected: tuple[str, ...]
    followed: tuple[tuple[str, float], ...]  # (proxy node id, seconds from begin to its last ACK)
    nacked: tuple[str, ...]
    disconnected: tuple[str, ...]
    lagging: tuple[str, ...]  # still not there at the deadline
    timed_out: bool
    duration: float

    @property
    def not_followed(self) -> tuple[str, ...]:
        return self.lagging + self.nacked + self.disconnected


@dataclass
class _Waiting:
    record: ProxyRecord
    acked_types: set[str] = field(default_factory=set)


@dataclass
class _Push:
    span: Span
    key: str
    version_index: int
    started: float
    deadline: float
    expected: tuple[str, ...]
    waiting: dict[int, _Waiting]
    followed: list[tuple[str, float]] = field(default_factory=list)
    nacked: list[str] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


def version_index(version: str) -> int:
    """Index of an xDS version we sent: the part before '-' (SotW) or the whole (Delta)."""
    head = version.partition("-")[0]
    return int(head) if head.isdigit() else -1


def _progress(record: ProxyRecord, index: int) -> str:
    """'followed', 'nacked' (refused what it would get at >= index) or 'waiting'."""
    stream = record.stream
    snap = stream.snapshot
    if snap is None or snap.index < index:
        return "waiting"
    types = record.type_flags()
    if any(pending for _, _, pending in types):
        return "waiting"
    nacked = False
    for type_url, _, _ in types:
        sync = type_sync_state(stream, type_url)
        if sync == "nacked":
            nacked = True
        elif sync not in ("synced", "idle"):
            return "waiting"
    return "nacked" if nacked else "followed"


class PushTracer:
    """A TrackerObserver that turns this node's push of one version into a "push" span.

    `begin()` opens a span, child of the carried trace context, waiting for the proxies
    connected now. Each proxy that reaches the version (every type it asked for ACKed at that
    snapshot or later) adds an "ack" event; a proxy that already had it adds "unchanged"; a NACK
    or a disconnect adds an event and counts as not followed. The span ends at the last proxy or
    at the deadline, with the proxies that did not follow in `repstage.push.not_followed`.

    The deadline fires by itself on the running asyncio loop (if `begin` runs on one); without
    a loop, call `poll()`. Hooks are called on the thread that drives the tracker.
    """

    def __init__(self, tracer: Tracer | None, control_plane: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._tracer = tracer
        self.control_plane = control_plane
        self.clock = clock
        self.tracker: ProxyTracker | None = None
        self._open: list[_Push] = []
        self._results: dict[str, PushResult] = {}
        self._waiters: dict[str, list[asyncio.Future[PushResult]]] = {}

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def attach(self, tracker: ProxyTracker) -> None:
        """Observe `tracker`; `begin()` then defaults to the proxies it has connected."""
        self.tracker = tracker
        if self not in tracker.observers:
            tracker.observers.append(self)

    def begin(
        self,
        index: int,
        trace_context: Mapping[str, str] | None,
        expected: Iterable[ProxyRecord] | None = None,
        timeout: float = 5.0,
    ) -> bool:
        """Open the push span for version `index` (the Raft index of the applied command).
        Call it after the snapshot for `index` went to the xDS cache. Returns False (and does
        nothing) when tracing is off or `trace_context` holds no valid traceparent."""
        if self._tracer is None or not trace_context:
            return False
        parent = _PROPAGATOR.extract(carrier=dict(trace_context))
        if not trace.get_current_span(parent).get_span_context().is_valid:
            log.debug("push %d: no valid traceparent in %r", index, trace_context)
            return False
        if expected is None:
            expected = self.tracker.connected() if self.tracker is not None else ()
        # A proxy that never ACKed anything or claims a version from the future is not waited
        # for by a failover (xds/standing.py), nor by its trace.
        records = [
            r for r in expected
            if r.connected and not standing.not_awaited(r)
        ]
        names = tuple(r.node.id for r in records)
        span = self._tracer.start_span(
            "push",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=_attrs({"control_plane": self.control_plane, "version": index, "push.proxies": len(names)}),
        )
        now = self.clock()
        push = _Push(
            span=span,
            key=trace_context.get("traceparent", ""),
            version_index=index,
            started=now,
            deadline=now + timeout,
            expected=names,
            waiting={id(r): _Waiting(r) for r in records},
        )
        self._open.append(push)
        for waiting in list(push.waiting.values()):
            self._check(push, waiting, None)
        if push.waiting:
            with contextlib.suppress(RuntimeError):  # no running loop: the caller polls
                push.timer = asyncio.get_running_loop().call_later(timeout, self._close, push, True)
        else:
            self._close(push, False)
        return True

    def poll(self, now: float | None = None) -> int:
        """Re-check waiting proxies (one whose config did not change at this version follows
        without an ACK) and close pushes past their deadline. Returns how many closed."""
        if not self._open:
            return 0
        now = self.clock() if now is None else now
        closed = 0
        for push in list(self._open):
            for waiting in list(push.waiting.values()):
                self._check(push, waiting, None)
            if push in self._open and push.deadline <= now:
                self._close(push, True)
            if push not in self._open:
                closed += 1
        return closed

    def open_pushes(self) -> int:
        return len(self._open)

    def result(self, trace_context: Mapping[str, str] | None) -> PushResult | None:
        """The result of this node's push for that trace context, once closed."""
        return self._results.get(trace_context.get("traceparent", "")) if trace_context else None

    async def wait(self, trace_context: Mapping[str, str] | None, timeout: float) -> PushResult | None:
        """Wait until this node's push for that trace context closes; None when tracing is off,
        or nothing closed within `timeout` (e.g. begin() was never called)."""
        if not trace_context or self._tracer is None:
            return None
        key = trace_context.get("traceparent", "")
        done = self._results.get(key)
        if done is not None:
            return done
        future: asyncio.Future[PushResult] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(future)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can drop a cancellation in 3.11
                return await future
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(key, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(key, None)

    # --- TrackerObserver ----------------------------------------------------------------------

    def on_connect(self, record: ProxyRecord) -> None:
        pass

    def on_send(self, record: ProxyRecord, send: Send) -> None:
        pass

    def on_disconnect(self, record: ProxyRecord) -> None:
        if not self._open:
            return
        for push in list(self._open):
            waiting = push.waiting.pop(id(record), None)
            if waiting is not None:
                push.disconnected.append(record.node.id)
                push.span.add_event("disconnect", _attrs({"proxy.node_id": record.node.id, "proxy.stream_id": record.stream_id}))
                if not push.waiting:
                    self._close(push, False)

    def on_ack(self, record: ProxyRecord, ack: Acked, latency: float | None) -> None:
        if not self._open:
            return
        key = id(record)
        for push in list(self._open):
            waiting = push.waiting.get(key)
            if waiting is not None:
                if version_index(ack.version) >= push.version_index:
                    waiting.acked_types.add(ack.type_url)
                self._check(push, waiting, ack, latency)

    def on_nack(self, record: ProxyRecord, nack: Nacked) -> None:
        if not self._open:
            return
        key = id(record)
        for push in list(self._open):
            if key in push.waiting and version_index(nack.version) >= push.version_index:
                del push.waiting[key]
                push.nacked.append(record.node.id)
                push.span.add_event(
                    "nack",
                    _attrs({
                        "proxy.node_id": record.node.id, "proxy.stream_id": record.stream_id,
                        "version": nack.version, "xds.type": res.short_name(nack.type_url), "error": nack.error[:512],
                        "latency_s": self.clock() - push.started,
                    }),
                )
                if not push.waiting:
                    self._close(push, False)

    # --- internals ----------------------------------------------------------------------------

    def _check(self, push: _Push, waiting: _Waiting, ack: Acked | None, latency: float | None = None) -> None:
        record = waiting.record
        state = _progress(record, push.version_index)
        if state == "waiting":
            return
        del push.waiting[id(record)]
        elapsed = self.clock() - push.started
        if state == "nacked":
            push.nacked.append(record.node.id)
            push.span.add_event("nack", _attrs({"proxy.node_id": record.node.id, "proxy.stream_id": record.stream_id}))
        else:
            push.followed.append((record.node.id, elapsed))
            acked = bool(waiting.acked_types)
            push.span.add_event(
                "ack" if acked else "unchanged",
                _attrs({
                    "proxy.node_id": record.node.id,
                    "proxy.stream_id": record.stream_id,
                    "version": ack.version if ack is not None and acked else str(push.version_index),
                    "latency_s": elapsed,
                    "xds.send_ack_s": latency if acked else None,
                    "xds.types": sorted(res.short_name(t) for t in waiting.acked_types),
                }),
            )
        if not push.waiting:
            self._close(push, False)

    def _close(self, push: _Push, timed_out: bool) -> None:
        if push not in self._open:
            return
        self._open.remove(push)
        if push.timer is not None:
            push.timer.cancel()
        lagging = tuple(w.record.node.id for w in push.waiting.values())
        result = PushResult(
            control_plane=self.control_plane,
            version_index=push.version_index,
            traceparent=push.key,
            expected=push.expected,
            followed=tuple(push.followed),
            nacked=tuple(push.nacked),
            disconnected=tuple(push.disconnected),
            lagging=lagging,
            timed_out=timed_out and bool(lagging),
            duration=self.clock() - push.started,
        )
        span = push.span
        span.set_attributes(
            _attrs({
                "push.followed": len(result.followed),
                "push.not_followed": result.not_followed,
                "push.lagging": result.lagging,
                "push.nacked": result.nacked,
                "push.disconnected": result.disconnected,
                "push.timed_out": result.timed_out,
            })
        )
        if result.not_followed:
            span.set_status(Status(StatusCode.ERROR, f"{len(result.not_followed)} of {len(push.expected)} proxies did not follow"))
        span.end()
        self._results[push.key] = result
        while len(self._results) > _KEEP_RESULTS:
            del self._results[next(iter(self._results))]
        for future in self._waiters.pop(push.key, []):
            if not future.done():
                future.set_result(result)

