"""Waiting until every proxy of every control-plane node holds a snapshot at or after an index:
the "every proxy confirmed" step of a break-before-make change.

This node's proxies are read from its tracker; the other nodes' come from a `RemoteProxies`
(the node wires in the REST client of `api/peers.py`). A node that does not answer counts as
one proxy that did not follow (`<node>:unreachable`): its proxies keep their last config,
which may still route to the old primary.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from repstage_mesh.decide import ProxyAcks
from repstage_mesh.xds import standing
from repstage_mesh.xds.tracker import ProxyTracker

POLL_INTERVAL = 0.002  # seconds between looks at the tracker while proxies are behind


class RemoteProxies(Protocol):
    async def pending(self, min_index: int, acked: dict[str, float]) -> list[str]:
        """Keys of the other nodes' proxies still behind `min_index`; adds the ones that
        caught up to `acked` (key -> monotonic time)."""
        ...

    async def close(self) -> None: ...


class NoRemoteProxies:
    """A single node, or a test: nobody else's proxies to wait for."""

    async def pending(self, min_index: int, acked: dict[str, float]) -> list[str]:
        return []

    async def close(self) -> None:
        return None


async def await_proxies(
    tracker: ProxyTracker, remote: RemoteProxies, min_index: int, timeout: float
) -> ProxyAcks:
    """Wait until every connected proxy (here and on the other nodes) has every type it asked
    for synced at or after `min_index`, or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    acked: dict[str, float] = {}
    try:
        while True:
            pending = []
            for record in tracker.connected():
                key = f"{record.node.id}#{record.stream_id}"
                if key in acked:
                    continue
                if standing.excused(record, min_index):
                    continue  # flagged in /v1/proxies; neither waited for nor counted as an ACK
                if record.synced(min_index):
                    acked[key] = time.monotonic()
                else:
                    pending.append(key)
            pending += await remote.pending(min_index, acked)
            if not pending or time.monotonic() >= deadline:
                return ProxyAcks(acked=acked, missed=tuple(sorted(pending)))
            await asyncio.sleep(POLL_INTERVAL)  # polling the tracker between ACKs
    finally:
        await remote.close()
