"""Issue 16, "leader killed mid-snapshot": three `repstage-mesh serve` nodes, real Redis, one real
Envoy whose admin the nodes read. A client holds a connection to replica r1 through the read
port, so the snapshot of r1 stays in its drain (DRAINING in Envoy, waiting for cx_active 0);
kill -9 of the leader then; the new leader takes the snapshot's lease, returns r1 to the read
pool and ends the snapshot as interrupted. Nothing stays drained.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from .databases import RedisGroup, redis_group
from .harness import (
    ControlPlaneNode,
    Envoy,
    cluster_leader,
    free_low_port,
    raft_cluster,
    start_cluster,
    wait_until,
    workdir,
)

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial


@dataclass
class Cluster:
    group: RedisGroup
    nodes: list[ControlPlaneNode]
    envoy: Envoy
    read_port: int

    def read_line(self, port: int) -> str:
        text = self.envoy.admin("/clusters") or ""
        prefix = f"cache-read::127.0.0.1:{port}::health_flags::"
        return next((line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)), "absent")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with workdir() as wd, redis_group(replicas=2) as group:
        read = free_low_port()
        members = [{"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in group.names]
        base: dict[str, Any] = {
            "services": [{"name": "cache", "protocol": "redis", "listen_port": free_low_port(), "read_port": read,
                          "members": members, "primary": "r0"}],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        nodes = raft_cluster(wd, 3, base)
        envoy = Envoy(wd, "edge-1", [n.xds_address for n in nodes])
        for node in nodes:
            node.config["snapshots"] = {"envoy_admins": [f"127.0.0.1:{envoy.admin_port}"], "drain_timeout": 60}
        try:
            start_cluster(nodes)
            envoy.start()
            c = Cluster(group, nodes, envoy, read)
            wait_until(lambda: all(c.read_line(group.port(n)) == "healthy" for n in group.names), 20,
                       what="the read pool in Envoy")
            yield c
        finally:
            envoy.stop()
            for node in nodes:
                node.stop()


def hold_connection_to(c: Cluster, member: str) -> tuple[redis.Redis, list[redis.Redis]]:
    """A client connected through the read port to `member` (new connections until one lands)."""
    port, others = c.group.port(member), []
    for _ in range(50):
        client = redis.Redis(host="127.0.0.1", port=c.read_port, single_connection_client=True, socket_timeout=2)
        if int(client.info("server")["tcp_port"]) == port:
            return client, others
        others.append(client)
    raise AssertionError(f"no connection through the read port reached {member}")


def test_a_new_leader_returns_the_member_and_ends_the_snapshot(cluster: Cluster) -> None:
    c = cluster
    leader = cluster_leader(c.nodes)
    held, others = hold_connection_to(c, "r1")
    try:
        for other in others:
            other.close()
        follower = next(n for n in c.nodes if n is not leader)
        # asked of a follower, which carries it to the leader
        status, started = follower.call("POST", "/v1/services/cache/snapshots", {"member": "r1"})
        assert status == 202 and started["member"] == "r1" and started["lease_holder"] == leader.name, started
        port = c.group.port("r1")
        wait_until(lambda: "eds_status_draining" in c.read_line(port), 10, what="r1 DRAINING in Envoy")
        # a follower's reads are its own copy: it holds the drain once it applied it
        draining = wait_until(lambda: (e := follower.get(f"/v1/services/cache/snapshots/{started['id']}"))["pool"]
                              == "draining" and e, 5, what="the follower holds the drain")
        assert draining["status"] == "running"
        assert held.ping()  # the open connection is what holds the drain
        leader.proc.kill()
        killed = time.monotonic()
        survivors = [n for n in c.nodes if n is not leader]
        new_leader = cluster_leader(survivors, timeout=20)

        def back() -> dict[str, Any] | None:
            entry = new_leader.get(f"/v1/services/cache/snapshots/{started['id']}")
            return entry if entry["pool"] == "in" and not entry["undo"] and entry["status"] != "running" else None

        entry = wait_until(back, 20, what="the new leader returns r1 and ends the snapshot")
        returned = time.monotonic() - killed
        assert entry["status"] == "failed" and "interrupted" in entry["error"], entry
        assert entry["lease_holder"] == new_leader.name and "takeover" in [s["name"] for s in entry["steps"]]
        wait_until(lambda: c.read_line(port) == "healthy", 10, what="r1 healthy in Envoy's read cluster again")
        for node in survivors:
            assert node.get(f"/v1/services/cache/snapshots/{started['id']}")["pool"] == "in"
        print(f"kill -9 of the leader -> r1 back in the read pool (replicated) in {returned:.2f} s")
    finally:
        held.close()
