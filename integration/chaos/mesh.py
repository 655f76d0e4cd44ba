"""The chaos mesh: six network namespaces on one bridge (integration/netns.py).

- cp-1..cp-3 (hosts 0..2): `repstage-mesh serve`, binding 0.0.0.0 like manifests/base and
  advertising the namespace's address (REPSTAGE_*__ADVERTISE, as the StatefulSet does), and a
  real Envoy attached to all three nodes' xDS.
- r0..r2 (hosts 3..5): Redis, r0 the primary, r1 and r2 its replicas; the `cache` service runs
  in orchestrate mode (the Raft leader probes, promotes a replica, repoints the others).
- `ctl`: a service in announce mode that only the control writers touch (its members are never
  dialled): the control-state history checked for linearizability.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from integration import netns
from integration.databases import redis_server_binary
from integration.harness import wait_until

RW = "chaos-read-write-token"
PASSWORD = "chaos-raft-password-0123"
API, XDS, RAFT = 8080, 18000, 7001
CACHE_PORT, CTL_PORT, FENCE_PORT = 16379, 16400, 15990
CP, REDIS = 3, 3
CTL_MEMBERS = ("a", "b", "c")


def call(method: str, url: str, body: Any = None, timeout: float = 7.0) -> tuple[int, Any]:
    """(status, JSON answer); raises OSError (refused, timeout, reset) like urllib."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {RW}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw or b"null")
        except ValueError:
            return err.code, raw.decode(errors="replace")


def _config(i: int, net: netns.Network, members: list[dict[str, Any]]) -> dict[str, Any]:
    peers = [f"{h.address}:{RAFT}" for h in net.hosts[:CP] if h.index != i]
    ctl = [{"name": m, "address": "127.0.0.1", "port": 21000 + k} for k, m in enumerate(CTL_MEMBERS)]
    return {
        "node": {"id": f"cp-{i + 1}"},
        "api": {"listen": f"0.0.0.0:{API}", "tokens": {"read_write": [RW]}},
        "xds": {"listen": f"0.0.0.0:{XDS}"},
        "raft": {"bind": f"0.0.0.0:{RAFT}", "peers": peers, "password": PASSWORD},
        "envoy": {"listen_address": "0.0.0.0", "fence_port": FENCE_PORT},
        "services": [
            {"name": "cache", "protocol": "redis", "listen_port": CACHE_PORT, "members": members,
             "primary": "r0",
             "leadership": {"source": "probe", "mode": "orchestrate", "min_failover_interval": 1.0,
                            "probe": {"interval": 0.2, "timeout": 0.5, "fall": 3, "rise": 2}}},
            {"name": "ctl", "protocol": "tcp", "listen_port": CTL_PORT, "members": ctl, "primary": "a"},
        ],
    }  # fmt: skip


@dataclass
class ChaosMesh:
    net: netns.Network
    workdir: Path
    nodes: list[netns.NamespacedNode] = field(default_factory=list)
    envoys: list[netns.NamespacedEnvoy] = field(default_factory=list)
    redis: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # --- Redis ---------------------------------------------------------------------------------

    def redis_host(self, member: str) -> netns.Host:
        return self.net.hosts[CP + int(member[1:])]

    def member_of_ip(self) -> dict[str, str]:
        return {self.redis_host(f"r{i}").address: f"r{i}" for i in range(REDIS)}

    def start_redis(self, member: str, replica_of: str | None = None) -> None:
        binary = redis_server_binary()
        assert binary, "redis-server not found: run scripts/system-deps.sh"
        directory = self.workdir / member
        directory.mkdir(exist_ok=True)
        argv = [binary, "--port", "6379", "--bind", "0.0.0.0", "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--dir", str(directory), "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0"]  # fmt: skip
        if replica_of is not None:
            argv += ["--replicaof", self.redis_host(replica_of).address, "6379"]
        with open(directory / "redis.log", "ab") as log:
            self.redis[member] = self.redis_host(member).popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(host=self.redis_host(member).address, port=6379, socket_timeout=1)
        wait_until(lambda: _pings(client), 20, 0.05, f"redis {member} answers")

    def kill_redis(self, member: str) -> None:
        proc = self.redis[member]
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)

    # --- the control plane ---------------------------------------------------------------------

    def alive(self) -> list[netns.NamespacedNode]:
        return [n for n in self.nodes if n.proc.alive()]

    def leader(self, timeout: float = 30.0) -> netns.NamespacedNode:
        """The node every node names as leader and that says it leads."""
        by_raft = {f"{n.host.address}:{RAFT}": n for n in self.nodes}

        def agreed() -> netns.NamespacedNode | None:
            views = []
            for node in self.nodes:
                with contextlib.suppress(OSError, ValueError):
                    status, view = call("GET", f"{node.api}/v1/cluster", timeout=1.0)
                    if status == 200:
                        views.append(view)
            leaders = {v.get("leader") for v in views}
            if len(views) < CP or len(leaders) != 1 or None in leaders:
                return None
            node = by_raft.get(str(leaders.pop()))
            return node if node is not None and any(v.get("is_leader") for v in views) else None

        found: netns.NamespacedNode = wait_until(agreed, timeout, 0.05, "every node agrees on a leader")
        return found

    def cache_primary(self) -> tuple[str | None, int] | None:
        """The primary of `cache` and its epoch by a linearizable read (a Raft read barrier):
        the answer was the committed state at some instant between the call and its answer."""
        for node in self.alive():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                url = f"{node.api}/v1/services/cache/primary?consistent=true"
                status, body = call("GET", url, timeout=1.0)
                if status == 200:
                    return body["primary"], int(body["epoch"])
        return None

    def envoy_stat_sum(self, suffix: str) -> int:
        """The sum of every Envoy counter whose name ends with `suffix`."""
        total = 0
        for envoy in self.envoys:
            text = envoy.admin("/stats?usedonly") or ""
            for line in text.splitlines():
                name, _, value = line.partition(": ")
                if name.endswith(suffix) and value.strip().isdigit():
                    total += int(value)
        return total


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@contextlib.contextmanager
def chaos_mesh(workdir: Path) -> Iterator[ChaosMesh]:
    with netns.network(CP + REDIS) as net:
        mesh = ChaosMesh(net, workdir)
        try:
            mesh.start_redis("r0")
            for member in ("r1", "r2"):
                mesh.start_redis(member, replica_of="r0")
            members = [{"name": f"r{i}", "address": mesh.redis_host(f"r{i}").address, "port": 6379}
                       for i in range(REDIS)]  # fmt: skip
            for i, host in enumerate(net.hosts[:CP]):
                env = {f"REPSTAGE_{k}__ADVERTISE": f"{host.address}:{port}"
                       for k, port in (("API", API), ("XDS", XDS), ("RAFT", RAFT))}  # fmt: skip
                mesh.nodes.append(netns.serve_node(host, workdir, _config(i, net, members), f"cp-{i + 1}", env))
            for node in mesh.nodes:
                node.start(wait_ready=False)
            for node in mesh.nodes:
                node.wait_ready(90)
            xds = [f"{h.address}:{XDS}" for h in net.hosts[:CP]]
            for host in net.hosts[:CP]:
                mesh.envoys.append(netns.envoy_in(host, workdir, f"envoy-{host.index}", xds).start())
            yield mesh
        finally:
            for envoy in mesh.envoys:
                envoy.stop()
            for node in mesh.nodes:
                node.stop()
