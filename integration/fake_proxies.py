"""Simulated Envoys driving the real sans-IO xDS protocol and a real ProxyTracker, no sockets.

A FakeProxy subscribes (CDS wildcard, EDS by name), receives the `Send` actions the server would
frame, and ACKs or NACKs them when told, so tests and benchmarks can drive pushes, ACKs and NACKs
through exactly the code the ADS server runs (stream.update / stream.receive / tracker.record).
"""

from __future__ import annotations

from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot
from repstage_mesh.xds.protocol import (
    Action,
    DeltaRequest,
    DeltaStream,
    NodeInfo,
    Send,
    SotwRequest,
    SotwStream,
)
from repstage_mesh.xds.tracker import ProxyTracker

__all__ = ["FakeProxy", "snapshot"]


def snapshot(version: int, primary: str = "a", services: tuple[str, ...] = ("db",)) -> Snapshot:
    """A consistent CDS + EDS snapshot: one cluster per service; the first service's endpoints
    name `primary`, the others' do not change with it."""
    clusters: dict[str, EncodedResource] = {}
    endpoints: dict[str, EncodedResource] = {}
    for name in services:
        clusters[name] = EncodedResource.from_bytes(
            res.CLUSTER, name, f"cluster:{name}".encode(), ((res.ENDPOINT, name),)
        )
        endpoints[name] = EncodedResource.from_bytes(
            res.ENDPOINT, name, f"cla:{name}:{primary if name == services[0] else ''}".encode()
        )
    return Snapshot(str(version), {res.CLUSTER: clusters, res.ENDPOINT: endpoints})


class FakeProxy:
    def __init__(
        self,
        tracker: ProxyTracker,
        stream_id: int,
        node_id: str,
        delta: bool = False,
        services: tuple[str, ...] = ("db",),
    ) -> None:
        self.tracker = tracker
        self.stream_id = stream_id
        self.node = NodeInfo(node_id, cluster="test")
        self.delta = delta
        self.services = services
        self.stream: SotwStream | DeltaStream = DeltaStream() if delta else SotwStream()
        self.inbox: list[Send] = []

    def deliver(self, actions: list[Action]) -> None:
        """What the server does with the protocol's actions: frame Sends, record everything."""
        self.inbox.extend(a for a in actions if isinstance(a, Send))
        self.tracker.record(self.stream_id, actions)

    def connect(self, snap: Snapshot | None) -> None:
        self.stream.snapshot = snap
        self.tracker.connect(self.stream_id, self.node, self.stream)
        if isinstance(self.stream, DeltaStream):
            self.deliver(self.stream.receive(DeltaRequest(res.CLUSTER, node=self.node)))
            self.deliver(self.stream.receive(DeltaRequest(res.ENDPOINT, subscribe=self.services)))
        else:
            self.deliver(self.stream.receive(SotwRequest(res.CLUSTER, node=self.node)))
            self.deliver(
                self.stream.receive(SotwRequest(res.ENDPOINT, resource_names=self.services))
            )

    def update(self, snap: Snapshot) -> None:
        """The cache published a new snapshot (the server's watch callback)."""
        self.deliver(self.stream.update(snap))

    def respond(self, nack_types: frozenset[str] = frozenset()) -> int:
        """ACK (or NACK, for the types named) everything received so far; returns how many."""
        count = 0
        while self.inbox:
            send = self.inbox.pop(0)
            error = "rejected by test" if send.type_url in nack_types else None
            if isinstance(self.stream, DeltaStream):
                actions = self.stream.receive(
                    DeltaRequest(send.type_url, response_nonce=send.nonce, error=error)
                )
            else:
                names = self.services if send.type_url == res.ENDPOINT else ()
                actions = self.stream.receive(
                    SotwRequest(send.type_url, send.version, send.nonce, names, error=error)
                )
            self.deliver(actions)
            count += 1
        return count

    def disconnect(self) -> None:
        self.tracker.disconnect(self.stream_id)
