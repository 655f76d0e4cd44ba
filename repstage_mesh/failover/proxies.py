"""Waiting until every proxy of every control-plane node holds a snapshot at or after an index:
the "every proxy confirmed" step of a break-before-make change. Nothing here polls.

- This node's proxies: a tracker waiter (`xds/progress.py`) resolves a future on the ACK that
  satisfies it.
- The other nodes' proxies: one `RemoteProgress` per node (the node wires in
  `api/progress.PeerProgress`, a long-poll of `GET /v1/proxies/progress?min_index=N&wait=S`
  that the peer answers from the same kind of waiter, once satisfied or at the deadline). All
  nodes are waited on at once; a transport error is retried after `RETRY_AFTER_ERROR` until
  the deadline.

The policy (README, "Proxy wait"):
- A proxy that NACKed the change is NOT fenced (Envoy keeps its older config, which may still
  route to the old primary). It is waited on until the deadline like any proxy behind, then
  the wait goes on and the proxy is reported in `missed`, with Envoy's error in `nacked`.
- A node that cannot be asked until the deadline (down, frozen, partitioned) is reported as
  `<node>:unreachable` in `missed` and in `unreachable`: its proxies may still hold the old
  config until their Envoy leaves the node (keepalive, `filters/bootstrap.py`: about 0.6 s
  for a frozen node). An Envoy cut off from every live node keeps routing by its last config
  (static stability) unless the primary lease is on.
- With the primary lease on (`xds.primary_lease_ms`, `xds/lease.py`) and a wait (`ack_deadline`)
  at least the lease's bound + LEASE_MARGIN, an unreachable node's proxies are covered by the
  lease: the wait lasts that long from its start (a commit before the wait is then either on
  those Envoys or their primary route has expired), and the node is reported in `leased`, not
  in `missed`. With a shorter wait the node is reported unreachable, as without a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from repstage_mesh.decide import ProxyAcks
from repstage_mesh.xds.progress import Behind
from repstage_mesh.xds.tracker import ProxyTracker

log = logging.getLogger(__name__)

RETRY_AFTER_ERROR = 0.2  # seconds before asking a node again after a transport error
RECHECK_INTERVAL = 0.5  # seconds between looks at the proxies still behind, for graces that ran out
ANSWER_MARGIN = 0.1  # seconds a peer answers before the deadline, so the answer arrives in time
LEASE_MARGIN = 0.1  # seconds waited beyond the lease's bound for an unreachable node (Envoy's timer)


@dataclass
class Progress:
    """One node's answer: when each proxy reached the index (seconds ago, at `answered`) and
    who is still behind."""

    node_id: str
    satisfied: bool
    acked_ago: dict[str, float] = field(default_factory=dict)
    behind: list[Behind] = field(default_factory=list)
    low_water: int | None = None
    connected: int = 0


class RemoteProgress(Protocol):
    """Another control-plane node's proxy progress (api/progress.PeerProgress)."""

    @property
    def node_id(self) -> str: ...

    async def progress(self, min_index: int, wait: float, timeout: float) -> Progress:
        """Answer once every proxy of the node holds `min_index` or after `wait` seconds; raise
        on no usable answer within `timeout` seconds."""
        ...


async def local_progress(tracker: ProxyTracker, node_id: str, min_index: int, wait: float) -> Progress:
    """This node's proxies: returns once all hold `min_index` or after `wait` seconds."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    waiter = tracker.wait_for(min_index, on_done=wake, clock=time.monotonic)
    deadline = time.monotonic() + max(0.0, wait)
    try:
        while not waiter.done:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, RECHECK_INTERVAL)):
                    await asyncio.shield(done)
            waiter.recheck()  # a never-ACKed proxy's grace may have run out (xds/standing.py)
    finally:
        tracker.cancel(waiter)
    now = time.monotonic()
    return Progress(
        node_id=node_id,
        satisfied=waiter.done,
        acked_ago={key: max(0.0, now - at) for key, at in waiter.reached.items()},
        behind=waiter.lagging(),
        low_water=tracker.low_water(),
        connected=len(waiter.reached) + sum(not r.gate for r in waiter.behind.values()),
    )


@dataclass
class _Outcome:
    acked: dict[str, float] = field(default_factory=dict)  # key -> monotonic time
    missed: list[str] = field(default_factory=list)
    nacked: dict[str, str] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)

    def add(self, answer: Progress, at: float, prefix: str = "") -> None:
        for key, ago in answer.acked_ago.items():
            self.acked[prefix + key] = at - ago
        for lag in answer.behind:
            self.missed.append(prefix + lag.proxy)
            if lag.state == "nacked":
                self.nacked[prefix + lag.proxy] = lag.error


async def _ask(remote: RemoteProgress, min_index: int, deadline: float) -> Progress | str:
    """The node's answer, or why there was none by the deadline."""
    why = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return why
        try:
            return await remote.progress(min_index, max(0.0, left - ANSWER_MARGIN), left)
        except Exception as exc:  # any failure to get an answer is "unreachable"
            why = str(exc) or repr(exc)
        if deadline - time.monotonic() <= RETRY_AFTER_ERROR:
            return why
        await asyncio.sleep(RETRY_AFTER_ERROR)  # after an error only: not a poll of progress


async def await_proxies(
    tracker: ProxyTracker,
    node_id: str,
    remotes: Sequence[RemoteProgress],
    min_index: int,
    timeout: float,
    lease: float | None = None,
) -> ProxyAcks:
    """Wait until every connected proxy (here and on the other nodes) has every type it asked
    for synced at or after `min_index`, or `timeout` seconds passed. `lease`: the primary
    lease's bound (seconds), which covers the proxies of nodes that cannot be asked when it fits
    in `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    here = asyncio.ensure_future(local_progress(tracker, node_id, min_index, timeout))
    answers = await asyncio.gather(*(_ask(r, min_index, deadline) for r in remotes))
    outcome = _Outcome()
    outcome.add(await here, time.monotonic())
    silent = []
    for remote, answer in zip(remotes, answers, strict=True):
        if isinstance(answer, Progress):
            outcome.add(answer, time.monotonic(), prefix=f"{remote.node_id}/")
        else:
            log.warning("proxies of node %s: no progress answer (%s)", remote.node_id, answer)
            silent.append(remote.node_id)
    leased: list[str] = []
    if silent and lease is not None and lease + LEASE_MARGIN <= timeout:
        left = started + lease + LEASE_MARGIN - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)  # until the lease of whatever those Envoys hold ran out
        leased = silent
    else:
        outcome.missed.extend(f"{node}:unreachable" for node in silent)
        outcome.unreachable.extend(silent)
    return ProxyAcks(
        acked=outcome.acked,
        missed=tuple(sorted(outcome.missed)),
        nacked=dict(sorted(outcome.nacked.items())),
        unreachable=tuple(sorted(outcome.unreachable)),
        leased=tuple(sorted(leased)),
    )

