"""What bounds the work one request can cause: body size, JSON depth, and consistent reads.

- `max_body_bytes` (aiohttp's `client_max_size`): a larger body is refused with 413 before it
  is read whole.
- `max_json_depth`: a body nested deeper is refused with 400 before it is parsed (Python's
  parser would raise RecursionError near depth 1,000: a 500 with a traceback).
- `CoalescedReads`: `?consistent=true` needs a Raft read barrier, which commits a Noop. Every
  waiting read shares the next barrier, and barriers start at most once per
  `consistent_read_interval`: however many clients ask, the log grows by at most one entry per
  interval, and each read still sees every write committed before it arrived (the barrier it
  waits for was submitted after its arrival).

Each refusal, and each read that waits for the interval, counts in
`repstage_api_limit_hits_total{limit}`.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from repstage_mesh.core.models import MeshState

__all__ = ["CoalescedReads", "json_depth", "limit_counter"]

# A JSON string, or an unterminated one up to the end: the first greedy attempt always
# matches, so a hostile body (b'\\"' * N) costs one linear pass, not one pass per quote.
_STRING = re.compile(rb'"(?:[^"\\]|\\.?)*(?:"|$)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")

_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def limit_counter(registry: CollectorRegistry) -> Counter:
    """repstage_api_limit_hits_total{limit} in `registry` (one per registry)."""
    counter = _COUNTERS.get(registry)
    if counter is None:
        counter = Counter(
            "repstage_api_limit_hits_total",
            "API requests refused or held back by a limit (body_bytes: api.max_body_bytes, "
            "json_depth: api.max_json_depth, consistent_read_interval: a read waited for the next barrier)",
            ["limit"],
            registry=registry,
        )
        _COUNTERS[registry] = counter
    return counter


def json_depth(raw: bytes, limit: int) -> int:
    """The nesting depth of a JSON text, counted until it exceeds `limit` (strings skipped).
    Linear in the size; used before parsing so that no parser recursion is ever deep."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


@dataclass
class _Barrier:
    task: asyncio.Future[MeshState] | None = None
    covers: int | None = None  # reads numbered below this arrived before it was submitted

    def covered(self, seq: int) -> bool:
        # not yet submitted (its coroutine has not run): every read seen so far is covered
        return self.covers is None or self.covers > seq


class CoalescedReads:
    """Linearizable reads that share read barriers (see the module docstring)."""

    def __init__(
        self,
        barrier: Callable[[], Awaitable[MeshState]],
        min_interval: float,
        on_limited: Callable[[], None] = lambda: None,
    ) -> None:
        self._barrier = barrier
        self._on_limited = on_limited  # a read waited for the interval (the metric)
        self._interval = min_interval
        self._arrivals = 0
        self._current: _Barrier | None = None
        self._last_start = float("-inf")
        self.barriers = 0  # how many were started (tests, metrics)
        self.waiting = 0  # reads waiting now

    async def read(self) -> MeshState:
        """This node's state after a barrier submitted after this call began."""
        self.waiting += 1
        try:
            return await self._read()
        finally:
            self.waiting -= 1

    async def _read(self) -> MeshState:
        loop = asyncio.get_running_loop()
        seq = self._arrivals
        self._arrivals += 1
        while True:
            current = self._current
            if current is not None and current.task is not None and current.covered(seq):
                return await asyncio.shield(current.task)
            if current is not None and current.task is not None and not current.task.done():
                await asyncio.wait({current.task})
                continue
            delay = self._last_start + self._interval - loop.time()
            if delay > 0:
                self._on_limited()
                await asyncio.sleep(delay)  # the rate limit itself, not synchronisation
                continue
            self._last_start = loop.time()
            self.barriers += 1
            barrier = self._current = _Barrier()
            barrier.task = asyncio.ensure_future(self._submit(barrier))
            barrier.task.add_done_callback(_retrieve)

    async def _submit(self, barrier: _Barrier) -> MeshState:
        barrier.covers = self._arrivals  # from here on the barrier is being committed
        return await self._barrier()


def _retrieve(task: asyncio.Future[MeshState]) -> None:
    if not task.cancelled():
        task.exception()  # joiners get it; never "exception was never retrieved"
