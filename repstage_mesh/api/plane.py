"""The seam between the REST API / CLI and a running control-plane node.

`ControlPlane` is what `node.py` implements with Raft, the xDS server and the proxy tracker;
tests implement it in memory. The API never reaches past this protocol, and the protocol speaks
in domain results and domain errors (core/errors.py): only `api/` turns them into HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from repstage_mesh.core.models import Announcement, Command, MeshState, Outcome
from repstage_mesh.failover.proxies import Progress


@dataclass(frozen=True)
class Caller:
    """Who asked, as far as carrying a request to the leader needs: the caller's own
    `Authorization` header (forwarded as is, so the leader checks the caller's token, not the
    follower's), and the id of the node that forwarded this request here, if one did (a
    forwarded request is never forwarded again: one hop at most)."""

    authorization: str | None = None
    forwarded_by: str | None = None
    actor: str = ""  # the token's name (api/auth.ACTOR): goes into a switchover's cause


DIRECT = Caller()


class ControlPlane(Protocol):
    @property
    def node_id(self) -> str: ...

    @property
    def registry(self) -> CollectorRegistry:
        """Prometheus registry that /metrics exposes."""
        ...

    def state(self) -> MeshState:
        """This node's applied copy of the replicated state."""
        ...

    async def read_state(self, consistent: bool = False) -> MeshState:
        """consistent=True: after a Raft read barrier (linearizable); raises NoQuorum or
        CommitTimeout like submit. False: this node's applied copy."""
        ...

    async def submit(self, command: Command, timeout: float = 5.0) -> Outcome:
        """Commit a command through the log; returns once applied on this node.

        Raises errors.NoQuorum (no leader / no majority within the timeout) or
        errors.CommitTimeout (result unknown).
        """
        ...

    def proxies(self) -> list[dict[str, Any]]:
        """One dict per connected (or recently seen) Envoy: node_id, cluster, stream kind,
        control-plane node, connected_at, and per type URL: sent/acked/nacked version, last
        error text, times, and `behind` (acked version differs from the committed one)."""
        ...

    async def proxy_progress(self, min_index: int, wait: float) -> Progress:
        """Once every proxy connected to this node holds a snapshot at or after `min_index`, or
        after `wait` seconds: how far they are (failover/proxies.local_progress)."""
        ...

    def cluster(self) -> dict[str, Any]:
        """Raft view: node id, leader, term, commit and applied index, peers, quorum."""
        ...

    def ready(self) -> bool:
        """True once the node has applied the committed state and serves xDS."""
        ...

    # --- failovers (run by the Raft leader; a follower carries changes to it) ---------------

    async def failovers(self, caller: Caller = DIRECT) -> tuple[str, list[dict[str, Any]]]:
        """(id of the node answering, the replicated failover history newest first)."""
        ...

    async def failover(self, record_id: str, caller: Caller = DIRECT) -> dict[str, Any] | None:
        """One failover record from the replicated history, or None."""
        ...

    async def announce(self, service: str, announcement: Announcement, caller: Caller = DIRECT) -> dict[str, Any]:
        """Run an announced change of primary (break-before-make unless `fence` is false) on
        the leader and answer when it is done: service, primary, epoch, previous_primary,
        changed, applied_index, failover (its record), replayed (an idempotency key's earlier
        answer). Raises the domain errors of core/errors.py (DecisionRefused: stale_epoch,
        not_found, conflict; NotReady; NoLeaderKnown; NotLeader, a forwarded request on a
        follower; SwitchoverFailed) or relays the leader's."""
        ...

    async def switchover(
        self, service: str, to: str, timeout: float | None,
        wait: float | None = None, caller: Caller = DIRECT,
    ) -> dict[str, Any]:
        """Run a planned switchover to `to` and return its finished record, waiting at most
        `wait` seconds (default and cap: api.switchover_wait). Raises the domain errors of
        core/errors.py: DecisionRefused, NotReady, NoLeaderKnown, NotLeader (a forwarded
        request on a follower), SwitchoverFailed, SwitchoverRunning (the wait ended first),
        SwitchoverUnknown (no answer from the leader), or ApiRequestError / ApiUnreachable
        relayed from the leader."""
        ...
