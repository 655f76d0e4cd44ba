"""Leased resources: renew them only while this control-plane node proves it is current.

A resource built with a TTL (`cache.EncodedResource`) is dropped by Envoy `ttl` seconds after it
last received it. `LeaseRenewer` re-sends the leased resources to every stream each `period`,
but only after `confirm` proved, within `max_age` seconds before the renewal, that this node
is current (RepStage: a Raft read barrier, which needs a majority and makes every earlier
commit visible here). A node cut off from the majority (partitioned, or frozen and so
silent) stops renewing, and its Envoys drop the leased resources within the TTL.

The bound that gives (README, "Primary lease"): a renewal at `t` carries a state that holds
every commit before `t - max_age`, so an Envoy that hears nothing newer stops using a
resource replaced by a commit at `c` by `c + max_age + ttl` (plus the network delay of the
last renewal).

`on_fresh(False)` tells the owner when the last proof is older than the TTL less one period:
soon whatever it serves may be older than what Envoy would have dropped (a reconnecting
Envoy would get a fresh TTL on a stale state), so the owner serves the leased resources failed
closed instead. It does so a period before its Envoys' TTL runs out, while they still hold the
resources: a push then still reaches them (RepStage's health fence closes open connections to
the primary, which a TTL expiry does not).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass
class LeaseCounters:
    renewals: int = 0  # rounds that renewed
    streams_renewed: int = 0  # streams asked, summed over rounds
    skipped: int = 0  # rounds not renewed: no proof, or the proof came too late


class LeaseRenewer:
    """`confirm(timeout)` -> True once this node is proven current; `renew()` sends the leased
    resources to every stream and returns how many; `on_fresh(fresh)` is told when the last
    proof becomes older than `stale_after` (False) and when a proof comes back (True)."""

    def __init__(
        self,
        ttl: float,
        confirm: Callable[[float], Awaitable[bool]],
        renew: Callable[[], int],
        on_fresh: Callable[[bool], None] = lambda fresh: None,
        *,
        period: float | None = None,
        max_age: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl: must be positive")
        self.ttl = ttl
        self.period = period if period is not None else ttl / 3
        self.max_age = max_age if max_age is not None else self.period / 2
        self.stale_after = self.ttl - self.period  # without a proof for this long: fail closed
        self._confirm = confirm
        self._renew = renew
        self._on_fresh = on_fresh
        self._clock = clock
        self.proven_at: float | None = None  # when the last proof that renewed began
        self.fresh = False
        self.counters = LeaseCounters()

    @property
    def bound(self) -> float:
        """Seconds after a commit by which an Envoy that hears nothing newer has dropped what
        the commit replaced (not counting the network delay of the last renewal)."""
        return self.ttl + self.max_age

    async def round(self) -> bool:
        """One renewal round: prove, then renew. Returns whether it renewed."""
        began = self._clock()
        budget = self.period  # a proof may not take us past the point of failing closed
        if self.proven_at is not None and self.fresh:
            budget = min(budget, max(0.0, self.proven_at + self.stale_after - began))
        try:
            async with asyncio.timeout(budget):
                proven = await self._confirm(budget)
        except Exception as exc:  # a failed or late proof is no proof
            log.debug("lease proof failed: %r", exc)
            proven = False
        if proven and self._clock() - began <= self.max_age:
            self.proven_at = began
            self._set_fresh(True)
            self.counters.renewals += 1
            self.counters.streams_renewed += self._renew()
            return True
        self.counters.skipped += 1
        if self.proven_at is None or self._clock() - self.proven_at > self.stale_after:
            self._set_fresh(False)
        return False

    def _set_fresh(self, fresh: bool) -> None:
        if fresh != self.fresh:
            self.fresh = fresh
            log.log(logging.INFO if fresh else logging.WARNING,
                    "primary lease: %s", "renewing" if fresh else "not proven current for a whole lease: failing closed")
            self._on_fresh(fresh)

    async def run(self) -> None:
        """Rounds every `period` seconds until cancelled."""
        while True:
            began = self._clock()
            await self.round()
            await asyncio.sleep(max(0.0, self.period - (self._clock() - began)))  # the renewal period
