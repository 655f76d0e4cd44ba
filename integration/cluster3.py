"""Three `repstage-mesh serve` nodes on loopback as one Raft cluster, and the Envoys a test
starts against them: the set-up shared by the tests and benchmarks that need a control-plane
cluster (`test_frozen_node`, `test_primary_lease`, `test_snapshot_chaos`,
`bench/frozen_node.py`, `bench/primary_lease.py`, `bench/snapshot_latency.py`).

    with two_tcp_members() as service, cluster3([service.spec]) as c:
        envoy = c.envoy("edge-1")               # bootstrapped with every node's xDS address
        leader = c.leader()

On exit every Envoy is stopped and every node is continued (a test may have SIGSTOPped it)
and stopped, whatever happened.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import (
    ControlPlaneNode,
    Envoy,
    NamedTcpBackend,
    cluster_leader,
    free_low_port,
    raft_cluster,
    start_cluster,
    workdir,
)

__all__ = ["Cluster3", "TcpService", "cluster3", "two_tcp_members"]


@dataclass
class Cluster3:
    wd: Path
    nodes: list[ControlPlaneNode]
    envoys: list[Envoy] = field(default_factory=list)

    def envoy(
        self, node_id: str, xds: list[ControlPlaneNode] | None = None, start: bool = True, **kw: Any
    ) -> Envoy:
        """An Envoy bootstrapped with the xDS addresses of `xds` (default: every node), started
        unless `start` is False (its admin port is known before: a node's config may name it);
        stopped when the cluster is."""
        envoy = Envoy(self.wd, node_id, [n.xds_address for n in (xds or self.nodes)], **kw)
        self.envoys.append(envoy)
        return envoy.start() if start else envoy

    def start(self) -> None:
        """Start the nodes (for `cluster3(..., start=False)`), then the Envoys not started yet."""
        start_cluster(self.nodes)
        for envoy in self.envoys:
            if not envoy.proc.alive():
                envoy.start()

    def leader(self, timeout: float = 10.0) -> ControlPlaneNode:
        return cluster_leader(self.nodes, timeout=timeout)

    def live(self) -> list[ControlPlaneNode]:
        return [n for n in self.nodes if n.proc.alive()]


@contextlib.contextmanager
def cluster3(
    services: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
    per_node: Callable[[ControlPlaneNode], None] | None = None,
    start: bool = True,
) -> Iterator[Cluster3]:
    """Three nodes serving `services` (Envoy listeners on 127.0.0.1), with `options` (more
    config sections, deep-copied into every node) and `per_node` (a last change to each node's
    config, e.g. sections that name that node's own ports). Started and ready unless `start`
    is False."""
    with workdir() as wd:
        base: dict[str, Any] = {
            "services": services,
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
            **(options or {}),
        }
        nodes = raft_cluster(wd, 3, base)
        for node in nodes:
            node.config["xds"].setdefault("listen", f"127.0.0.1:{free_low_port()}")
            if per_node is not None:
                per_node(node)
        c = Cluster3(wd, nodes)
        try:
            if start:
                start_cluster(nodes)
            yield c
        finally:
            for envoy in c.envoys:
                envoy.stop()
            for node in nodes:
                if node.proc.alive():
                    node.proc.signal(signal.SIGCONT)
                node.stop()


@dataclass(frozen=True)
class TcpService:
    """A TCP service over two members `a` and `b` that answer every line with their name."""

    spec: dict[str, Any]
    port: int  # the Envoy listener (the primary's)
    name: str


@contextlib.contextmanager
def two_tcp_members(name: str = "orders", primary: str = "a") -> Iterator[TcpService]:
    with NamedTcpBackend("a") as a, NamedTcpBackend("b") as b:
        port = free_low_port()
        spec = {"name": name, "protocol": "tcp", "listen_port": port, "primary": primary,
                "members": [{"name": "a", "address": "127.0.0.1", "port": a.port},
                            {"name": "b", "address": "127.0.0.1", "port": b.port}]}
        yield TcpService(spec, port, name)
