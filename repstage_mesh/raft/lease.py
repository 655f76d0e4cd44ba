"""The primary lease of one node (`xds.primary_lease_ms`, README "Primary lease").

What the node renders under a lease, and the proof that lets it renew: each service's primary
cluster carries the lease as an xDS TTL (`ttls`); `xds.lease.LeaseRenewer` renews it only after
a Raft read barrier (`prove`: a majority answered and every earlier commit is applied here); a
node with no timely proof renders every primary failed closed (`shape`) until the next one.
"""

from __future__ import annotations

from collections.abc import Callable

from repstage_mesh.core.errors import ReplicationError
from repstage_mesh.core.models import MeshState
from repstage_mesh.raft.store import ReplicatedStore
from repstage_mesh.render.envoy import primary_clusters, without_primaries
from repstage_mesh.render.options import RenderOptions
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.lease import LeaseRenewer


class PrimaryLease:
    """`store()` the node's Raft store (None while stopped); `flush()` publishes what is
    applied; `renew()` renews every stream (`AdsServer.renew`); `republish()` renders again
    (called when the node becomes, or stops being, proven current)."""

    def __init__(
        self,
        ttl_ms: int,
        store: Callable[[], ReplicatedStore | None],
        flush: Callable[[], None],
        renew: Callable[[], int],
        republish: Callable[[], None],
    ) -> None:
        self._store = store
        self._flush = flush
        self.renewer = LeaseRenewer(ttl_ms / 1000.0, self.prove, renew, lambda _fresh: republish())

    @classmethod
    def build(
        cls,
        ttl_ms: int | None,
        store: Callable[[], ReplicatedStore | None],
        flush: Callable[[], None],
        renew: Callable[[], int],
        republish: Callable[[], None],
    ) -> PrimaryLease | None:
        """None when the lease is off (`ttl_ms` unset)."""
        return cls(ttl_ms, store, flush, renew, republish) if ttl_ms else None

    @property
    def bound(self) -> float:
        return self.renewer.bound

    async def prove(self, timeout: float) -> bool:
        """A read barrier, then the snapshot brought up to date before its lease is renewed."""
        store = self._store()
        if store is None:
            return False
        try:
            await store.read_barrier(timeout)
        except ReplicationError:
            return False
        self._flush()
        return True

    def shape(self, state: MeshState, options: RenderOptions) -> tuple[MeshState, dict[res.Ref, float]]:
        """The state to render (every primary failed closed while not proven current) and the
        TTL of each primary cluster, for `Snapshot.build`."""
        ttls = {(res.CLUSTER, name): self.renewer.ttl for name in primary_clusters(state, options)}
        return (state if self.renewer.fresh else without_primaries(state)), ttls

    async def run(self) -> None:
        await self.renewer.run()
