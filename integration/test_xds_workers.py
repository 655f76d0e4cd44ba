"""Issue 17 item 1 against real Envoys: xDS served by two worker processes on one port
(`xds.workers: 2`), one of them SIGKILLed while its Envoys are connected and switches are
being committed. Every Envoy comes back (to the other worker or the restarted one), holds the
current version, ACKs a later change, and routes it; an Envoy that comes back holding the
current version is sent nothing. SotW and Delta Envoys together.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    ControlPlaneNode,
    Envoy,
    NamedTcpBackend,
    ask_once,
    free_low_port,
    http_json,
    wait_until,
    workdir,
)

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

PRIMARY = "/v1/services/orders/primary"
ENVOYS = 4


@dataclass
class Mesh:
    wd: Path
    cp: ControlPlaneNode
    envoys: list[Envoy]
    port: int

    @property
    def xds_port(self) -> int:
        return int(self.cp.xds_address.rsplit(":", 1)[1])

    def connected(self) -> dict[str, dict[str, Any]]:
        """node id -> its connected proxy record; {} while an Envoy shows two (a reconnect
        seen before the old stream's end)."""
        out: dict[str, dict[str, Any]] = {}
        for proxy in self.cp.get("/v1/proxies"):
            if proxy["connected"]:
                if proxy["node_id"] in out:
                    return {}
                out[proxy["node_id"]] = proxy
        return out

    def all_synced_at(self, version: str) -> bool:
        proxies = self.connected()
        return len(proxies) == ENVOYS and all(
            p["synced"] and p["snapshot_version"] == version for p in proxies.values()
        )

    def version(self) -> str:
        return str(self.cp.get("/v1/cluster")["snapshot_version"])

    def workers(self) -> dict[int, int]:
        """worker pid -> established xDS connections it holds (from `ss`)."""
        out = {pid: 0 for pid in _children(self.cp.proc.pid)}
        for pid in _socket_pids(f"( sport = :{self.xds_port} )"):
            if pid in out:
                out[pid] += 1
        return out

    def envoys_on(self, worker: int) -> set[str]:
        """The node ids of the Envoys whose xDS connection `worker` holds (by local port)."""
        peers = set(_socket_ports(f"( sport = :{self.xds_port} )", worker))
        by_pid = {e.proc.pid: e.node_id for e in self.envoys}
        lines = _ss(f"( dport = :{self.xds_port} )")
        return {by_pid[pid] for port, pid in _local_ports(lines) if port in peers and pid in by_pid}

    def metric(self, name: str) -> float:
        """The sum of a metric's samples (every label set)."""
        with urllib.request.urlopen(f"{self.cp.api}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        assert samples, (name, text[-2000:])
        return sum(float(v) for v in samples)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _ss(flt: str) -> list[str]:
    out = subprocess.run(["ss", "-Htnp", "state", "established", flt], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _socket_pids(flt: str) -> list[int]:
    return [int(m) for line in _ss(flt) for m in re.findall(r"pid=(\d+)", line)[:1]]


def _local_ports(lines: list[str]) -> list[tuple[int, int]]:
    """(local port, pid) of each line of `ss -Htnp state established`."""
    out = []
    for line in lines:
        fields = line.split()
        pid = re.search(r"pid=(\d+)", line)
        if len(fields) >= 3 and pid:
            out.append((int(fields[2].rsplit(":", 1)[1]), int(pid.group(1))))
    return out


def _socket_ports(flt: str, pid: int) -> list[int]:
    """The peer ports of `pid`'s established sockets matching `flt`."""
    out = []
    for line in _ss(flt):
        fields = line.split()
        if f"pid={pid}," in line and len(fields) >= 4:
            out.append(int(fields[3].rsplit(":", 1)[1]))
    return out


def routed_to(port: int) -> str:
    try:
        return ask_once(port, "probe", timeout=0.5).split(":", 1)[0]
    except OSError:
        return "-"


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    with workdir() as wd, NamedTcpBackend("a") as a, NamedTcpBackend("b") as b:
        port = free_low_port()
        cfg: dict[str, Any] = {
            "services": [{"name": "orders", "protocol": "tcp", "listen_port": port, "primary": "a",
                          "members": [{"name": "a", "address": "127.0.0.1", "port": a.port},
                                      {"name": "b", "address": "127.0.0.1", "port": b.port}]}],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
            "xds": {"listen": f"127.0.0.1:{free_low_port()}", "workers": 2},
        }
        cp = ControlPlaneNode(wd, cfg)
        envoys: list[Envoy] = []
        try:
            cp.start()
            for i in range(ENVOYS):
                envoy = Envoy(wd, f"edge-{i}", [cp.xds_address], delta=i % 2 == 1, extra_args=["--concurrency", "1"])
                envoys.append(envoy)
                envoy.start()
            m = Mesh(wd, cp, envoys, port)
            wait_until(lambda: m.all_synced_at(m.version()), 30, 0.05, "every Envoy synced")
            wait_until(lambda: routed_to(port) == "a", 20, 0.02, "traffic reaches a")
            yield m
        finally:
            for envoy in envoys:
                envoy.stop()
            cp.stop()


def _busiest(m: Mesh) -> int:
    workers = wait_until(lambda: (w if len(w) == 2 and sum(w.values()) == ENVOYS else None)
                         if (w := m.workers()) else None, 20, 0.05, "two workers holding every Envoy")
    return max(workers, key=lambda pid: workers[pid])


def test_a_killed_worker_s_envoys_come_back_synced_and_follow_a_later_change(mesh: Mesh) -> None:
    m = mesh
    victim = _busiest(m)
    moved = m.envoys_on(victim)
    assert moved, m.workers()
    before = m.connected()

    # Under load: switches committed one after another while the worker is killed.
    stop = threading.Event()
    switched: list[int] = []

    def switch() -> None:
        member = "b"
        while not stop.is_set():
            status, body = http_json("POST", f"{m.cp.api}{PRIMARY}", {"member": member}, timeout=10.0)
            if status == 200:
                switched.append(int(body["epoch"]))
                member = "a" if member == "b" else "b"

    load = threading.Thread(target=switch, daemon=True)
    load.start()
    try:
        wait_until(lambda: len(switched) >= 2, 20, 0.01, "switches under way")
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(switched) >= 6, 30, 0.01, "switches after the kill")
    finally:
        stop.set()
        load.join(15)

    # Every Envoy is back, on a new stream for the ones the victim held, and holds the current version.
    wait_until(lambda: m.all_synced_at(m.version()), 30, 0.05, "every Envoy back and synced")
    after = m.connected()
    for node_id in moved:
        assert after[node_id]["stream_id"] != before[node_id]["stream_id"], (node_id, after[node_id])
    gone = [p for p in m.cp.get("/v1/proxies") if not p["connected"]]
    assert {p["node_id"] for p in gone} >= moved, gone
    assert victim not in m.workers()
    wait_until(lambda: len(m.workers()) == 2, 20, 0.05, "the worker restarted")
    assert m.metric("repstage_xds_worker_restarts_total") == 1

    # A later change: every Envoy ACKs it and routes it.
    status, body = http_json("POST", f"{m.cp.api}{PRIMARY}", {"member": "b"}, timeout=10.0)
    assert status == 200, body
    epoch = int(body["epoch"])
    status, progress = http_json("GET", f"{m.cp.api}/v1/proxies/progress?min_index={epoch}&wait=20", timeout=25.0)
    assert status == 200 and progress["satisfied"], progress
    assert sorted(k.split("#")[0] for k in progress["acked"]) == sorted(e.node_id for e in m.envoys), progress
    wait_until(lambda: routed_to(m.port) == "b", 20, 0.02, "traffic follows the later change")


def test_an_envoy_back_with_the_current_version_is_sent_nothing(mesh: Mesh) -> None:
    m = mesh
    victim = _busiest(m)
    moved = m.envoys_on(victim)
    version = m.version()
    before = m.connected()
    pushes = m.metric("repstage_xds_pushes_total")
    os.kill(victim, signal.SIGKILL)

    def back() -> dict[str, dict[str, Any]] | None:
        if not m.all_synced_at(version):
            return None
        proxies = m.connected()
        return proxies if all(proxies[n]["stream_id"] != before[n]["stream_id"] for n in moved) else None

    proxies = wait_until(back, 30, 0.05, "every Envoy back on a new stream and synced")
    assert m.version() == version
    assert m.metric("repstage_xds_pushes_total") == pushes  # not one response to anybody
    for node_id in moved:
        types = proxies[node_id]["types"]
        assert all(t["sent_version"] is None for t in types.values()), (node_id, types)
