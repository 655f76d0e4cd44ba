"""The part of `Node` that carries failover requests: the leader runs them, a follower forwards
them to the leader's API once at most (`api/forwarding.py`). A mixin so that `node.py`, the
composition root, stays a wiring module; every attribute it uses is built by `Node.__init__`."""

from __future__ import annotations

import asyncio
from typing import Any

from repstage_mesh.api.forwarding import Forwarder
from repstage_mesh.api.plane import DIRECT, Caller
from repstage_mesh.config import Settings
from repstage_mesh.core.errors import (
    CommitTimeout,
    NoLeaderKnown,
    NotLeader,
    NotReady,
    SwitchoverFailed,
    SwitchoverRunning,
)
from repstage_mesh.core.models import Announcement, MeshState
from repstage_mesh.decide import Decider
from repstage_mesh.failover.announces import Announcer
from repstage_mesh.failover.engine import LeaderEngine
from repstage_mesh.failover.runner import FailoverRunner
from repstage_mesh.raft.store import ReplicatedStore
from repstage_mesh.telemetry.metrics import MeshMetrics


class LeaderRequests:
    """Failover history reads, announcements and switchovers, as `plane.ControlPlane` names them."""

    settings: Settings
    store: ReplicatedStore | None
    metrics: MeshMetrics
    decider: Decider
    engine: LeaderEngine
    announcer: Announcer
    runner: FailoverRunner
    api_port: int | None
    _node_id: str
    _forwarder: Forwarder

    def state(self) -> MeshState:
        raise NotImplementedError

    async def read_state(self, consistent: bool = False) -> MeshState:
        raise NotImplementedError

    def _leader_api(self, caller: Caller = DIRECT) -> str | None:
        """HOST:PORT of the leader's API, None if this node leads. One hop at most: a request
        another node forwarded here is never forwarded again (NotLeader, naming who this node
        believes leads). Raises NoLeaderKnown when no leader's API is known."""
        store = self.store
        if store is None or store.is_leader():
            return None
        leader = store.leader()
        api = next(
            (n.api for n in self.state().nodes.values() if leader is not None and n.raft == leader and n.api),
            None,
        )
        believed = f"{leader} (API {api or 'not announced'})" if leader else "no node"
        if caller.forwarded_by is not None:
            self.metrics.observe_forward("not_leader")
            raise NotLeader(
                f"node {self._node_id} does not lead, and this request was already forwarded "
                f"here by {caller.forwarded_by} (requests are forwarded once at most); it "
                f"believes the leader is {believed}; retry shortly", leader,
            )
        if api is None:
            raise NoLeaderKnown(f"no Raft leader's API is known to this node right now (leader: {believed}); retry shortly")
        if api == self.settings.api.advertised(self.api_port):
            raise NotLeader(
                f"the leader {leader} announces this node's own API ({api}); check api.advertise "
                "on every node", leader,
            )
        return api

    async def failovers(self, caller: Caller = DIRECT) -> tuple[str, list[dict[str, Any]]]:
        """The replicated history as this node holds it, newest first; the records this node
        is running are shown as they are now (fresher than their last commit)."""
        return self._node_id, [self._fresh(entry.id, entry.record) for entry in reversed(self.state().failovers)]

    async def failover(self, record_id: str, caller: Caller = DIRECT) -> dict[str, Any] | None:
        entry = self.state().failover(record_id)
        if entry is not None:
            return self._fresh(record_id, entry.record)
        record = self.decider.record(record_id)  # running here, its first commit not applied yet
        return record.as_dict() if record is not None else None

    def _fresh(self, record_id: str, replicated: dict[str, Any]) -> dict[str, Any]:
        record = self.decider.record(record_id)
        return record.as_dict() if record is not None else dict(replicated)

    async def announce(self, service: str, announcement: Announcement, caller: Caller = DIRECT) -> dict[str, Any]:
        """Run an announced change on the leader (a follower carries it there) and answer with
        the primary after it and its failover record. An idempotency key already used answers
        what its first use did (waiting for it if it is still running)."""
        api = self._leader_api(caller)
        if api is not None:
            return await self._forward_announce(api, service, announcement, caller)
        if not self.engine.active:
            raise NotReady("this node leads but has not started deciding yet; retry shortly")
        return await self.announcer.run(service, announcement)

    async def _forward_announce(
        self, api: str, service: str, announcement: Announcement, caller: Caller
    ) -> dict[str, Any]:
        # A leader that cannot be reached through Raft will not answer over HTTP either: a Raft
        # read barrier runs beside the hop (not before it: a healthy forward does not wait for a
        # commit first), and if it fails before the leader answered, the hop is abandoned within
        # the commit timeout instead of waiting on a frozen or partitioned leader. The announce
        # may have reached the leader by then: the answer is 504 (unknown), never 503.
        forward = asyncio.ensure_future(self._forwarder.announce(api, service, announcement, caller))
        barrier = asyncio.ensure_future(self.read_state(consistent=True))
        try:
            await asyncio.wait({forward, barrier}, return_when=asyncio.FIRST_COMPLETED)
            if not forward.done() and barrier.exception() is not None:
                raise CommitTimeout(
                    f"this node lost the Raft leader ({barrier.exception()}) while the announce was "
                    f"carried to its API at {api}; it may or may not have been applied"
                ) from barrier.exception()
            return await forward
        finally:
            for task in (forward, barrier):
                task.cancel()
                task.add_done_callback(_retrieve)

    def switchover_wait(self, wait: float | None) -> float:
        """How long a switchover request is held open: `wait`, capped by api.switchover_wait."""
        cap = self.settings.api.switchover_wait
        return cap if wait is None else min(wait, cap)

    async def switchover(
        self, service: str, to: str, timeout: float | None,
        wait: float | None = None, caller: Caller = DIRECT,
    ) -> dict[str, Any]:
        wait = self.switchover_wait(wait)
        api = self._leader_api(caller)
        if api is not None:
            return await self._forwarder.switchover(api, service, to, timeout, wait, caller)
        if not self.engine.active:
            raise NotReady("this node leads but has not started deciding yet; retry shortly")
        actor = caller.actor
        cause = f"planned switchover requested by {actor}" if actor else "planned switchover"
        record = await self.runner.switchover(service, to, timeout, wait=wait, cause=cause)
        if record.status == "failed":
            raise SwitchoverFailed(f"switchover {record.id} failed: {record.reason}", record.as_dict())
        if record.status == "running":
            self.metrics.switchover_wait_expired.inc()
            raise SwitchoverRunning(
                f"switchover {record.id} of {service} to {to} is still running after {wait:g} s; "
                f"follow it at GET /v1/failovers/{record.id}", record.as_dict(),
            )
        return record.as_dict()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # the answer went out already; never "exception was never retrieved"
