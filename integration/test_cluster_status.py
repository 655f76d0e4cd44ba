"""Acceptance (issue 15, items 5 and 6): `repstage-mesh status` on any node of a three-node
cluster (real `serve` processes on loopback, one real Envoy per node) lists the Envoys of all
three nodes, names nodes by id, and prints no Python reprs; a frozen node (SIGSTOP) is shown as
not answering within api.peer_timeout instead of hanging the view, and `--api` moves on to the
next URL when the first cannot be reached.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .harness import (
    REPSTAGE,
    ControlPlaneNode,
    Envoy,
    NamedTcpBackend,
    cluster_leader,
    free_low_port,
    raft_cluster,
    start_cluster,
    wait_until,
    workdir,
)


@dataclass
class Cluster:
    nodes: list[ControlPlaneNode]
    envoys: list[Envoy]

    def cli(self, *argv: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REPSTAGE_")}
        env["COLUMNS"] = str(columns)
        # timeout: a hang detector (a frozen peer must not hold the view), not a speed limit
        return subprocess.run([REPSTAGE, *argv], capture_output=True, text=True, env=env, timeout=60)

    def status(self, api: str) -> dict[str, Any]:
        proc = self.cli("status", "--json", "--api", api)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        return dict(json.loads(proc.stdout))


def _serving(data: dict[str, Any]) -> set[tuple[str, str]]:
    """(Envoy node id, control-plane node) of every connected proxy in a status answer."""
    return {(p["node_id"], p["control_plane"]) for p in data["proxies"] if p["connected"]}


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with workdir() as wd, NamedTcpBackend("a") as a:
        base: dict[str, Any] = {
            "services": [{
                "name": "orders", "protocol": "tcp", "listen_port": free_low_port(), "primary": "a",
                "members": [{"name": "a", "address": "127.0.0.1", "port": a.port}],
            }],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }  # fmt: skip
        c = Cluster(raft_cluster(wd, 3, base), [])
        try:
            start_cluster(c.nodes)
            for node in c.nodes:  # one Envoy per node, bootstrapped with that node only
                c.envoys.append(Envoy(wd, f"edge-{node.name}", [node.xds_address]).start())
            yield c
        finally:
            for envoy in c.envoys:
                envoy.stop()
            for node in c.nodes:
                node.proc.signal(signal.SIGCONT)
                node.stop()


def test_status_on_any_node_lists_the_envoys_of_all_three_nodes(cluster: Cluster) -> None:
    expected = {(f"edge-{n.name}", n.name) for n in cluster.nodes}
    names = {n.name for n in cluster.nodes}
    for node in cluster.nodes:

        def complete(api: str = node.api) -> dict[str, Any] | None:
            data = cluster.status(api)
            return data if _serving(data) == expected else None

        data = wait_until(complete, 30, 0.2, f"status on {node.name} lists every node's Envoy")
        assert data["cluster"]["leader"] in names and data["cluster"]["has_quorum"] is True
        assert all(p["node_id"] in names for p in data["cluster"]["peers"]), data["cluster"]["peers"]
        assert [(n["node_id"], n["reachable"]) for n in data["nodes"]] == [(n, True) for n in sorted(names)]
        table = cluster.cli("status", "--api", node.api)
        assert table.returncode == 0, table.stderr
        for envoy, cp in expected:
            assert envoy in table.stdout and cp in table.stdout, (envoy, table.stdout)
        assert "None" not in table.stdout and "{'" not in table.stdout, table.stdout
        assert max(len(line) for line in table.stdout.splitlines()) <= 80


def test_a_frozen_node_is_shown_unreachable_and_the_api_list_moves_on(cluster: Cluster) -> None:
    expected = {(f"edge-{n.name}", n.name) for n in cluster.nodes}
    first = cluster.nodes[0]
    wait_until(lambda: _serving(cluster.status(first.api)) == expected, 30, 0.2, "every Envoy listed")
    leader = cluster_leader(cluster.nodes)
    frozen, asked = [n for n in cluster.nodes if n is not leader][:2]
    frozen.proc.signal(signal.SIGSTOP)
    try:
        data = cluster.status(asked.api)
        reach = {n["node_id"]: n for n in data["nodes"]}
        assert not reach[frozen.name]["reachable"] and reach[frozen.name]["error"], reach
        assert _serving(data) == expected - {(f"edge-{frozen.name}", frozen.name)}
        table = cluster.cli("proxies", "--api", asked.api, columns=120)
        assert f"{frozen.name}: unreachable" in table.stdout, table.stdout
    finally:
        frozen.proc.signal(signal.SIGCONT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    data = cluster.status(f"{dead},{asked.api}")
    assert data["api"] == asked.api
