"""Issue 11, as deployed: three `serve` nodes in three network namespaces (separate hosts to
them), each binding 0.0.0.0 exactly as manifests/base does and advertising its own address
through the environment (REPSTAGE_*__ADVERTISE, as the StatefulSet passes the pod IP); a real
Envoy attached to each node; a Redis primary and replica in two of the namespaces, in
orchestrate mode.

- A switchover requested on a follower is carried to the leader (one hop, with the caller's
  own token) and run there; the record lists the proxies of all three nodes.
- A request that was already forwarded is never forwarded again: a follower answers 503
  not_leader naming who it believes leads.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from integration import netns
from integration.databases import redis_server_binary
from integration.harness import wait_until, workdir

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

RW = "netns-read-write-token"
RO = "netns-read-only-token"
PASSWORD = "netns-raft-password"
CACHE_PORT = 16379
API, XDS, RAFT = 8080, 18000, 7001  # the same ports in every namespace, like pods


def call(method: str, url: str, body: Any = None, token: str = RW,
         headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, Any]:  # fmt: skip
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@dataclass
class Mesh:
    net: netns.Network
    nodes: list[netns.NamespacedNode]
    envoys: list[netns.NamespacedEnvoy]

    def leader(self) -> netns.NamespacedNode:
        by_raft = {f"{n.host.address}:{RAFT}": n for n in self.nodes}

        def agreed() -> netns.NamespacedNode | None:
            views = [call("GET", f"{n.api}/v1/cluster", token=RO, timeout=2)[1] for n in self.nodes]
            leaders = {v.get("leader_address", v.get("leader")) for v in views}  # Raft addresses
            if len(leaders) != 1 or None in leaders:
                return None
            node = by_raft.get(str(leaders.pop()))
            return (
                node
                if node is not None
                and call("GET", f"{node.api}/v1/cluster", token=RO)[1]["is_leader"]
                else None
            )

        found: netns.NamespacedNode = wait_until(agreed, 20, 0.1, "the nodes agree on a leader")
        return found


def _redis(
    host: netns.Host, wd: Path, name: str, replica_of: str | None = None
) -> subprocess.Popen[bytes]:
    binary = redis_server_binary()
    assert binary, "redis-server not found: run scripts/system-deps.sh"
    (wd / name).mkdir()
    argv = [binary, "--port", "6379", "--bind", "0.0.0.0", "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--dir", str(wd / name), "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0"]  # fmt: skip
    if replica_of is not None:
        argv += ["--replicaof", replica_of, "6379"]
    log = open(wd / name / "redis.log", "wb")  # noqa: SIM115 - closed with the process
    proc = host.popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def _node_config(i: int, net: netns.Network, members: list[dict[str, Any]]) -> dict[str, Any]:
    """The same file for every node, as the ConfigMap of manifests/base: wildcard binds."""
    peers = [f"{h.address}:{RAFT}" for j, h in enumerate(net.hosts) if j != i]
    return {
        "node": {"id": f"cp-{i + 1}"},
        "api": {"listen": f"0.0.0.0:{API}", "tokens": {"read_write": [RW], "read_only": [RO]}},
        "xds": {"listen": f"0.0.0.0:{XDS}", "insecure": True},  # as manifests/base: plaintext on a private network
        "raft": {"bind": f"0.0.0.0:{RAFT}", "peers": peers, "password": PASSWORD},
        "envoy": {"listen_address": "0.0.0.0"},
        "services": [{
            "name": "cache", "protocol": "redis", "listen_port": CACHE_PORT, "members": members,
            "primary": "r0",
            "leadership": {"source": "probe", "mode": "orchestrate", "min_failover_interval": 1.0},
        }],
    }  # fmt: skip


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """One mesh for the module (starting it is most of the cost); the tests do not depend on
    each other's order."""
    with workdir() as wd, netns.network(3) as net:
        a, b, _ = net.hosts
        _redis(a, wd, "r0")
        _redis(b, wd, "r1", replica_of=a.address)
        r1 = redis.Redis(host=b.address, port=6379, socket_timeout=2)
        wait_until(lambda: r1.info("replication").get("master_link_status") == "up", 20, 0.1,
                   what="r1 replicates r0")  # fmt: skip
        members = [{"name": "r0", "address": a.address, "port": 6379},
                   {"name": "r1", "address": b.address, "port": 6379}]  # fmt: skip
        nodes, envoys = [], []
        try:
            for i, host in enumerate(net.hosts):
                env = {f"REPSTAGE_{k}__ADVERTISE": f"{host.address}:{port}"
                       for k, port in (("API", API), ("XDS", XDS), ("RAFT", RAFT))}  # fmt: skip
                nodes.append(
                    netns.serve_node(host, wd, _node_config(i, net, members), f"cp-{i + 1}", env)
                )
            for node in nodes:
                node.start(wait_ready=False)
            for node in nodes:
                node.wait_ready(60)
            for host in net.hosts:
                name = f"envoy-{host.index}"
                envoys.append(netns.envoy_in(host, wd, name, [f"{host.address}:{XDS}"]).start())
            yield Mesh(net, nodes, envoys)
        finally:
            for envoy in envoys:
                envoy.stop()
            for node in nodes:
                node.stop()


def _connected(node: netns.NamespacedNode) -> list[str]:
    return [
        str(p["node_id"])
        for p in call("GET", f"{node.api}/v1/proxies", token=RO)[1]
        if p.get("connected")
    ]


def test_switchover_on_a_follower_runs_on_the_leader_and_waits_for_every_nodes_proxies(
    mesh: Mesh,
) -> None:
    # every node announced its advertised addresses, not 127.0.0.1
    view = call("GET", f"{mesh.nodes[0].api}/v1/cluster", token=RO)[1]
    announced = {n["node_id"]: (n["api"], n["xds"], n["raft"]) for n in view["nodes"]}
    for node in mesh.nodes:
        ip = node.host.address
        assert announced[node.name] == (f"{ip}:{API}", f"{ip}:{XDS}", f"{ip}:{RAFT}")
    for node, envoy in zip(mesh.nodes, mesh.envoys, strict=True):
        wait_until(lambda n=node, e=envoy: _connected(n) == [e.node_id], 20, 0.1,
                   what=f"{envoy.node_id} connected to {node.name}")  # fmt: skip
    writer = redis.Redis(host=mesh.net.hosts[2].address, port=CACHE_PORT, socket_timeout=2)
    wait_until(lambda: writer.set("before", 1), 30, 0.1, what="writes through envoy-2 reach r0")

    leader = mesh.leader()
    follower = next(n for n in mesh.nodes if n is not leader)
    status, record = call("POST", f"{follower.api}/v1/services/cache/switchover",
                          {"to": "r1", "timeout": 10})  # fmt: skip
    assert status == 200, record
    assert record["status"] == "done" and record["new_primary"] == "r1", record
    assert record["id"].startswith(leader.name), "run by the leader"
    assert record["missed_fence"] == [] and record["missed_route"] == []
    acked = [e["detail"].get("proxy", "") for e in record["timeline"] if e["name"] == "acked"]
    for envoy in mesh.envoys:
        assert any(envoy.node_id in proxy for proxy in acked), (envoy.node_id, acked)
    # the follower finds the record on the leader (quoted id, one hop)
    status, same = call("GET", f"{follower.api}/v1/failovers/{record['id']}", token=RO)
    assert status == 200 and same["id"] == record["id"]
    # writes through an Envoy of another node now reach r1
    wait_until(lambda: writer.set("after", 2), 10, 0.1, what="writes reach r1")
    r1 = redis.Redis(host=mesh.net.hosts[1].address, port=6379, socket_timeout=2)
    assert r1.get("after") == b"2"


def test_a_forwarded_request_is_never_forwarded_again(mesh: Mesh) -> None:
    leader = mesh.leader()
    follower = next(n for n in mesh.nodes if n is not leader)
    before = call("GET", f"{leader.api}/v1/services/cache", token=RO)[1]["primary"]
    target = "r0" if before == "r1" else "r1"
    forwarded = {"X-Repstage-Forwarded-By": "cp-9"}
    status, body = call("POST", f"{follower.api}/v1/services/cache/switchover", {"to": target},
                        headers=forwarded)  # fmt: skip
    assert status == 503, body
    assert body["error"]["code"] == "not_leader"
    assert f"{leader.host.address}:{RAFT}" in body["error"]["message"]  # who it believes leads
    # reads of the replicated failover history are answered by every node from its own copy
    status, body = call("GET", f"{follower.api}/v1/failovers", token=RO, headers=forwarded)
    assert status == 200 and "failovers" in body
    metrics = urllib.request.urlopen(f"{follower.api}/metrics", timeout=5).read().decode()
    assert 'repstage_api_forwards_total{outcome="not_leader"} 1.0' in metrics
    # nothing ran: the primary did not change
    status, cache = call("GET", f"{leader.api}/v1/services/cache", token=RO)
    assert status == 200 and cache["primary"] == before
