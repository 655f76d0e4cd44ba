"""The trace of one primary change (failover or switchover), opened by the leader's failover engine.

`Tracing.start_failover` opens the root span "failover" (service, old/new primary, epoch, cause,
mode); the phases are its children: detection / decision / raft.commit / promotion. Its W3C
context (`context()`) goes into the replicated `SetPrimary.trace`, so every node's "push" span
(see push_tracer) joins the same trace. The root span ends with repstage.not_followed.

    # leader, failover engine:
    ft = tracing.start_failover("db", old="a", new="b", cause="primary_down", mode="follow",
                                started_at=first_failed_probe_wall_time)
    ft.record("detection", start=first_failed_probe_wall_time, end=time.time(), probes=3)
    with ft.child("decision"): ...
    with ft.child("raft.commit") as phase:
        outcome = await plane.submit(SetPrimary(..., trace=ft.context()))
        phase.set(index=..., epoch=...)
    ft.set(epoch=...)
    result = await push_tracer.wait(ft.context(), timeout=ack_deadline + 1)
    seconds = ft.end(not_followed=result.not_followed if result else ())
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from repstage_mesh.telemetry._otel import _PROPAGATOR, _attrs, _ns

__all__ = ["FailoverTrace", "Phase"]


class Phase:
    """A span in progress: detection, decision, raft.commit, promotion. No-op when tracing is off."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def set(self, **attrs: Any) -> None:
        if self.span is not None:
            self.span.set_attributes(_attrs(attrs))

    def event(self, name: str, **attrs: Any) -> None:
        if self.span is not None:
            self.span.add_event(name, _attrs(attrs))


_NOOP_PHASE = Phase(None)


class FailoverTrace:
    """One failover's trace. When tracing is off every method is a no-op, `context()` is None,
    and `end()` still returns the duration (for the failover histogram)."""

    DETECTION = "detection"
    DECISION = "decision"
    COMMIT = "raft.commit"
    PROMOTION = "promotion"

    def __init__(self, tracer: Tracer | None, span: Span | None, started_at: float) -> None:
        self._tracer = tracer
        self._span = span
        self._ctx = trace.set_span_in_context(span) if span is not None else None
        self.started_at = started_at
        self.ended_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self._span is not None

    @property
    def trace_id(self) -> str | None:
        return f"{self._span.get_span_context().trace_id:032x}" if self._span is not None else None

    @property
    def span_id(self) -> str | None:
        return f"{self._span.get_span_context().span_id:016x}" if self._span is not None else None

    def context(self) -> dict[str, str] | None:
        """W3C trace context ({"traceparent": ...}) to put in SetPrimary.trace; None when off."""
        if self._ctx is None:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=self._ctx)
        return carrier

    @contextlib.contextmanager
    def child(self, name: str, **attrs: Any) -> Iterator[Phase]:
        """A child span around a block; an exception escaping the block is recorded on it."""
        if self._tracer is None:
            yield _NOOP_PHASE
            return
        span = self._tracer.start_span(name, context=self._ctx, attributes=_attrs(attrs))
        with trace.use_span(span, end_on_exit=True):
            yield Phase(span)

    def record(self, name: str, start: float, end: float | None = None, **attrs: Any) -> None:
        """A child span for a phase already over (wall-clock seconds, time.time()); e.g.
        detection, which starts at the first failed probe, before anyone knew of a failover."""
        if self._tracer is None:
            return
        span = self._tracer.start_span(name, context=self._ctx, attributes=_attrs(attrs), start_time=_ns(start))
        span.end(end_time=_ns(end))

    def set(self, **attrs: Any) -> None:
        """Attributes of the root span (e.g. epoch=..., once the commit gave it)."""
        if self._span is not None:
            self._span.set_attributes(_attrs(attrs))

    def end(self, *, not_followed: Sequence[str] = (), error: str | None = None, end_time: float | None = None) -> float:
        """End the root span (once; later calls change nothing). Returns seconds since start."""
        if self.ended_at is None:
            self.ended_at = time.time() if end_time is None else end_time
            if self._span is not None:
                self._span.set_attribute("repstage.not_followed", [str(p) for p in not_followed])
                if error is not None:
                    self._span.set_status(Status(StatusCode.ERROR, error))
                elif not_followed:
                    self._span.set_status(Status(StatusCode.ERROR, f"{len(not_followed)} proxies did not follow"))
                self._span.end(end_time=_ns(self.ended_at))
        return self.ended_at - self.started_at
