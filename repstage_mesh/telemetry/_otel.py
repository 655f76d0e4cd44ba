"""Helpers the tracing modules share: `repstage.`-prefixed span attributes, wall-clock seconds to
OTel nanoseconds, and the W3C trace-context propagator (the context a failover's trace carries
inside the replicated command)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
Attr = str | bool | int | float | Sequence[str]


def _attrs(values: Mapping[str, Any]) -> dict[str, Attr]:
    """`repstage.`-prefixed OTel attributes; None values are left out."""
    out: dict[str, Attr] = {}
    for key, value in values.items():
        if value is None:
            continue
        name = key if key.startswith("repstage.") else f"repstage.{key}"
        if isinstance(value, str | bool | int | float):
            out[name] = value
        elif isinstance(value, Iterable):
            out[name] = [str(v) for v in value]
        else:
            out[name] = str(value)
    return out


def _ns(wall_seconds: float | None) -> int | None:
    return None if wall_seconds is None else int(wall_seconds * 1e9)
