"""The seam between the REST API / CLI and a running control-plane node.

`ControlPlane` is what `node.py` implements with Raft, the xDS server and the proxy tracker;
tests implement it in memory. The API never reaches past this protocol, and the protocol speaks
in domain results and domain errors (core/errors.py): only `api/` turns them into HTTP.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from repstage_mesh.core.models import Announcement, Command, MeshState, Outcome


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

    def cluster(self) -> dict[str, Any]:
        """Raft view: node id, leader, term, commit and applied index, peers, quorum."""
        ...

    def ready(self) -> bool:
        """True once the node has applied the committed state and serves xDS."""
        ...

    # --- failovers (run by the Raft leader; a follower carries changes to it) ---------------

    async def failovers(self) -> tuple[str, list[dict[str, Any]]]:
        """(id of the node answering, the replicated failover history newest first)."""
        ...

    async def failover(self, record_id: str) -> dict[str, Any] | None:
        """One failover record from the replicated history, or None."""
        ...

    async def announce(self, service: str, announcement: Announcement) -> dict[str, Any]:
        """Run an announced change of primary (break-before-make unless `fence` is false) on
        the leader and answer when it is done: service, primary, epoch, previous_primary,
        changed, applied_index, failover (its record), replayed (an idempotency key's earlier
        answer). Raises the domain errors of core/errors.py (DecisionRefused: stale_epoch,
        not_found, conflict; NotReady; NoLeaderKnown; SwitchoverFailed) or relays the leader's."""
        ...

    async def switchover(self, service: str, to: str, timeout: float | None) -> dict[str, Any]:
        """Run a planned switchover to `to` and return its finished record. Raises the domain
        errors of core/errors.py: DecisionRefused, NotReady, NoLeaderKnown, SwitchoverFailed,
        or ApiRequestError / ApiUnreachable relayed from the leader."""
        ...

    # --- snapshots (run by the Raft leader; a follower carries a request to it) ---------------

    async def start_snapshot(self, service: str, member: str) -> dict[str, Any]:
        """Start a snapshot of `service` from `member` ("replica": the most caught-up replica
        within the lag bound; "primary"; or a member's name) and answer with its committed
        intent (a SnapshotEntry as JSON). Raises SnapshotRefused, NotReady, NoLeaderKnown, the
        replication errors, or relays the leader's answer."""
        ...

    async def list_snapshots(self, service: str) -> list[dict[str, Any]] | None:
        """The replicated snapshots of `service`, newest first; None when no such service."""
        ...

    async def get_snapshot(self, service: str, snapshot_id: str) -> dict[str, Any] | None:
        """One snapshot of `service` from the replicated state, or None."""
        ...
