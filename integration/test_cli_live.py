"""The operator CLI as a user runs it: `repstage-mesh` subprocesses against a live `serve` with a
real Envoy connected. status, services, proxies and failovers in table and --json form; the sync
view shows per proxy and xDS type the versions sent and ACKed, and whether the proxy is behind
the committed state (an Envoy paused with SIGSTOP while the primary changes is; after SIGCONT it
catches up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .databases import RedisGroup, redis_group, redis_server_binary
from .harness import (
    REPSTAGE,
    ControlPlaneNode,
    Envoy,
    NamedTcpBackend,
    ask_once,
    free_low_port,
    wait_until,
    workdir,
)

SERVICE = "orders"
CACHE = "cache"  # Redis in orchestrate mode: planned switchovers make failover records

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="redis-server not installed")


@dataclass
class Live:
    cp: ControlPlaneNode
    envoy: Envoy
    port: int
    group: RedisGroup

    def cli(self, *argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REPSTAGE_")}
        env["COLUMNS"] = "300"  # rich wraps tables at the terminal width; keep rows on one line
        proc = subprocess.run(
            [REPSTAGE, *argv, "--api", self.cp.api], capture_output=True, text=True, env=env, timeout=60
        )
        if ok:
            assert proc.returncode == 0, (argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *argv: str) -> Any:
        return json.loads(self.cli(*argv, "--json").stdout)


@pytest.fixture
def live() -> Iterator[Live]:
    with (
        workdir() as wd,
        NamedTcpBackend("a") as a,
        NamedTcpBackend("b") as b,
        redis_group(replicas=1) as group,
    ):
        port = free_low_port()
        cfg: dict[str, Any] = {
            "services": [{
                "name": SERVICE, "protocol": "tcp", "listen_port": port, "primary": "a",
                "members": [{"name": "a", "address": "127.0.0.1", "port": a.port},
                            {"name": "b", "address": "127.0.0.1", "port": b.port}],
            }, {
                "name": CACHE, "protocol": "redis", "listen_port": free_low_port(), "primary": "r0",
                "members": [{"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in group.names],
                "leadership": {"source": "probe", "mode": "orchestrate"},
            }],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        cp = ControlPlaneNode(wd, cfg)
        envoy = Envoy(wd, "edge-cli", [cp.xds_address], subprocess_cli=True)  # `repstage-mesh bootstrap` itself
        try:
            cp.start()
            envoy.start()
            wait_until(lambda: ask_once(port).startswith("a:"), 20, what="traffic through Envoy reaches a")
            yield Live(cp, envoy, port, group)
        finally:
            envoy.stop()
            cp.stop()


def only_proxy(proxies: list[dict[str, Any]]) -> dict[str, Any]:
    (proxy,) = [p for p in proxies if p["connected"]]
    return proxy


def test_cli_against_a_live_node_and_envoy(live: Live) -> None:
    # status: cluster, services and proxies at a glance
    status = live.json("status")
    assert status["cluster"]["node"] == "cp-1"
    assert sorted(s["name"] for s in status["services"]) == [CACHE, SERVICE]
    assert only_proxy(status["proxies"])["node_id"] == "edge-cli"
    text = live.cli("status").stdout
    for word in ("Cluster", "Services", "Proxies", SERVICE, "a*", "edge-cli", "synced"):
        assert word in text, (word, text)

    # services: list and one
    services = live.json("services")
    assert {s["name"]: s["primary"] for s in services["services"]} == {SERVICE: "a", CACHE: "r0"}
    applied = services["applied_index"]
    assert f"applied index {applied}" in live.cli("services").stdout
    one = live.json("services", "get", SERVICE)
    assert {m["name"]: m["role"] for m in one["members"]} == {"a": "primary", "b": "replica"}
    assert "Members" in live.cli("services", "get", SERVICE).stdout

    # proxies: per type the version sent and ACKed, synced with the committed state
    wait_until(lambda: only_proxy(live.json("proxies")["proxies"])["synced"], 10, what="edge-cli synced")
    proxy = only_proxy(live.json("proxies")["proxies"])
    types = proxy["types"]
    assert {"cds", "lds"} <= set(types)
    for name, t in types.items():
        assert t["acked_version"] == t["sent_version"] and not t["behind"], (name, t)
    envoy_versions = live.envoy.versions()  # what Envoy itself says it applied
    assert envoy_versions["cds"] == types["cds"]["acked_version"]
    assert envoy_versions["lds"] == types["lds"]["acked_version"]
    table = live.cli("proxies").stdout
    assert "ACKED" in table and "synced" in table and "cp-1" in table
    index = types["cds"]["acked_version"].split("-")[0]  # the table shows the Raft index
    assert f"all {index}" in table or f"cds {index}" in table, table

    # behind: Envoy paused while the primary changes; the sync view says which types are behind
    live.envoy.proc.signal(signal.SIGSTOP)
    try:
        change = live.cp.call("POST", f"/v1/services/{SERVICE}/primary", {"member": "b", "cause": "cli test"})
        assert change[0] == 200 and change[1]["changed"], change

        def behind() -> dict[str, Any] | None:
            p = only_proxy(live.json("proxies")["proxies"])
            return p if not p["synced"] and any(t["behind"] for t in p["types"].values()) else None

        lagging = wait_until(behind, 10, 0.1, "edge-cli reported behind")
        late = sorted(name for name, t in lagging["types"].items() if t["behind"])
        assert "eds" in late or "cds" in late, lagging["types"]
        for name in late:  # sent the new version, still ACKing the old one
            t = lagging["types"][name]
            assert t["sent_version"] != t["acked_version"], (name, t)
        table = live.cli("proxies").stdout
        assert "behind (" in table and all(name in table for name in late), table
    finally:
        live.envoy.proc.signal(signal.SIGCONT)
    wait_until(lambda: only_proxy(live.json("proxies")["proxies"])["synced"], 15, 0.1, "edge-cli caught up")
    wait_until(lambda: ask_once(live.port).startswith("b:"), 15, what="traffic reaches b")
    assert "synced" in live.cli("proxies").stdout

    # failovers: a planned switchover of the Redis service through the CLI, recorded by the leader
    out = live.cli("switchover", CACHE, "--to", "r1").stdout
    assert f"{CACHE}: r0 -> r1" in out and "committed" in out, out
    failovers = live.json("failovers")
    rows = failovers if isinstance(failovers, list) else failovers["failovers"]
    (mine,) = [r for r in rows if r["service"] == CACHE]
    assert mine["status"] == "done" and mine["kind"] == "switchover", mine
    assert mine["old_primary"] == "r0" and mine["new_primary"] == "r1" and mine["missed_route"] == []
    table = live.cli("failovers").stdout
    for word in ("Failovers", mine["id"], "r0 → r1", "done", "switchover"):
        assert word in table, (word, table)
    detail = live.cli("failovers", mine["id"]).stdout  # the timeline, step by step
    assert "Timeline" in detail and all(e["name"] in detail for e in mine["timeline"]), detail

    # members: health, offset and lag as the leader's probes see them (like patronictl list)
    def observed() -> dict[str, Any] | None:
        rows = {m["member"]: m for m in live.json("status")["members"]["members"] if m["service"] == CACHE}
        ok = rows["r1"]["health"] == "primary" and all(m["offset"] is not None for m in rows.values())
        return rows if ok else None

    rows = wait_until(observed, 15, 0.2, "the cache's members observed with offsets")
    assert rows["r1"]["lag"] == 0 and rows["r0"]["role"] == "replica", rows
    assert "HEALTH" in live.cli("services", "get", CACHE).stdout
    assert live.group.role("r1")[0] == "master"

    # a bad request: a clear error naming the field, exit 1, nothing printed on stdout
    bad = live.cli("services", "get", "nope", ok=False)
    assert bad.returncode == 1 and bad.stdout == ""
    assert "not found" in bad.stderr and "field: name" in bad.stderr
