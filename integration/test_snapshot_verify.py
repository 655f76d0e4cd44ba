"""Restore drills end to end (issue 16, item 6): two `repstage-mesh serve` nodes, real Redis (and
PostgreSQL). A writer runs throughout a snapshot taken through a node (the real actions); its
ledger of acknowledged writes is the one the operator configured for the service
(`snapshots.verify.ledgers`). Then `repstage-mesh snapshot verify SERVICE ID`, sent to the
follower (which carries it to the leader), restores the snapshot into a scratch server; the
verification committed with the snapshot shows ok, the ledger compared, 0 missing and 0 extra,
on every node. A request that names a ledger is refused (422) and changes nothing. A drill running
when its leader is killed (-9) is marked interrupted by the next leader, never left running.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from integration.databases import HOST, postgres_bindir, postgres_pair, redis_group, wait_until
from integration.harness import (
    REPSTAGE,
    ControlPlaneNode,
    cluster_leader,
    free_low_port,
    raft_cluster,
    start_cluster,
    workdir,
)
from integration.test_snapshot_actions import Writer, _pg_ledger, _pg_writer
from repstage_mesh.snapshots.actions.ledger import LedgerEntry, ledger_line


@contextlib.contextmanager
def _nodes(wd: Path, service: dict[str, Any], snapshots: dict[str, Any]) -> Iterator[list[ControlPlaneNode]]:
    nodes = raft_cluster(wd, 2, {"services": [service]})
    for node in nodes:
        node.config["snapshots"] = snapshots
    try:
        start_cluster(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _snapshot_under_writes(nodes: list[ControlPlaneNode], service: str, member: str, writer: Writer,
                           caught_up: Callable[[], bool]) -> dict[str, Any]:
    """300 writes, the member caught up, a snapshot through the follower, 300 writes after it."""
    leader = cluster_leader(nodes)
    follower = next(n for n in nodes if n is not leader)
    wait_until(lambda: writer.acked >= 300, 30, "300 writes before the snapshot")
    wait_until(caught_up, 30, "the member past the first 300 writes")
    status, started = follower.call("POST", f"/v1/services/{service}/snapshots", {"member": member})
    assert status == 202, started

    def ended() -> dict[str, Any] | None:
        entry = follower.get(f"/v1/services/{service}/snapshots/{started['id']}")
        return entry if entry["status"] != "running" and entry["pool"] == "in" and not entry["undo"] else None

    entry = wait_until(ended, 120, what="the snapshot ends")
    assert entry["status"] == "completed", (entry["error"], entry["steps"])
    at_snapshot = writer.acked
    wait_until(lambda: writer.acked >= at_snapshot + 300, 30, "300 writes after it")
    return entry


def _verify_through_the_cli(nodes: list[ControlPlaneNode], service: str, snapshot_id: str) -> dict[str, Any]:
    leader = cluster_leader(nodes)
    follower = next(n for n in nodes if n is not leader)
    before = follower.get(f"/v1/services/{service}/snapshots/{snapshot_id}")
    status, body = follower.call("POST", f"/v1/services/{service}/snapshots/{snapshot_id}/verify",
                                 {"ledger": "/etc/shadow"})
    assert status == 422 and body["error"]["field"] == "ledger", body
    assert follower.get(f"/v1/services/{service}/snapshots/{snapshot_id}") == before  # nothing changed
    done = subprocess.run([REPSTAGE, "--json", "snapshot", "verify", service, snapshot_id, "--api", follower.api],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout, done.stderr)
    entry = json.loads(done.stdout)
    v = entry["verification"]
    assert v["status"] == "ok" and v["restored"] and v["compared"] and v["node"] == leader.name, v
    assert v["counts"] == {"missing": 0, "extra": 0, "unexplained": 0}, v
    for node in nodes:  # committed with the snapshot: every node answers it
        wait_until(lambda n=node: n.get(f"/v1/services/{service}/snapshots/{snapshot_id}")["verification"] == v,
                   10, what=f"{node.name} has the verification")
    with urllib.request.urlopen(f"{leader.api}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert f'repstage_snapshot_verifications_total{{result="ok",service="{service}"}} 1.0' in metrics
    return dict(v)


@pytest.fixture
def tmp_ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger.jsonl"


def test_redis_snapshot_verified_through_a_follower_holds_exactly_the_acked_writes(tmp_ledger: Path) -> None:
    with workdir() as wd, redis_group(replicas=1) as group:
        members = [{"name": n, "address": HOST, "port": group.port(n)} for n in group.names]
        service = {"name": "cache", "protocol": "redis", "listen_port": free_low_port(), "members": members,
                   "primary": "r0"}
        primary = redis.Redis(host=HOST, port=group.port("r0"), decode_responses=True)
        snapshots = {"verify": {"ledgers": {"cache": str(tmp_ledger)}, "start_timeout": 60}}
        with _nodes(wd, service, snapshots) as nodes:
            with open(tmp_ledger, "w", encoding="utf-8") as out:

                def write_one(i: int) -> None:
                    pipe = primary.pipeline(transaction=True)  # the offset at which this SET starts
                    pipe.info("replication").set(f"w:{i}", str(i))
                    info, _ = pipe.execute()
                    out.write(ledger_line(LedgerEntry(f"w:{i}", str(i), time.time(), str(info["master_repl_offset"]),
                                                      replid=info["master_replid"])))

                offsets: list[int] = []

                def caught_up() -> bool:  # the replica past the offset the primary had at the first look
                    if not offsets:
                        offsets.append(int(group.command("r0", "INFO", "replication")["master_repl_offset"]))
                    return int(group.command("r1", "INFO", "replication")["master_repl_offset"]) >= offsets[0]

                writer = Writer(write_one)
                writer.start()
                try:
                    entry = _snapshot_under_writes(nodes, "cache", "r1", writer, caught_up)
                finally:
                    writer.stop()
            v = _verify_through_the_cli(nodes, "cache", entry["id"])
            assert 300 <= v["expected"] < writer.acked and v["matched"] == v["expected"], (v, writer.acked)


def test_postgres_snapshot_verified_holds_exactly_the_acked_writes(tmp_ledger: Path) -> None:
    with workdir() as wd, postgres_pair(full_page_writes=True) as pair:
        pair.query("pg0", "CREATE TABLE kv (key text PRIMARY KEY, value text)")
        pair.query("pg0", "CREATE EXTENSION pg_walinspect")
        start_lsn = pair.query("pg0", "SELECT pg_current_wal_insert_lsn()::text")[0][0]
        members = [{"name": n, "address": HOST, "port": pair.port(n)} for n in ("pg0", "pg1")]
        service = {"name": "db", "protocol": "postgres", "listen_port": free_low_port(), "members": members,
                   "primary": "pg0"}
        snapshots = {"pg_bindir": postgres_bindir(), "take_timeout": 120,
                     "verify": {"ledgers": {"db": str(tmp_ledger)}, "start_timeout": 120}}
        with _nodes(wd, service, snapshots) as nodes:
            rows: list[tuple[str, str, float, int]] = []
            conn, write_one = _pg_writer(pair.dsn("pg0"), rows)
            lsn: list[str] = []

            def caught_up() -> bool:
                if not lsn:
                    lsn.append(pair.query("pg0", "SELECT pg_current_wal_insert_lsn()::text")[0][0])
                return bool(pair.query("pg1", "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn[0],))[0][0])

            writer = Writer(write_one)
            writer.start()
            try:
                entry = _snapshot_under_writes(nodes, "db", "pg1", writer, caught_up)
            finally:
                writer.stop()
                conn.close()
            _pg_ledger(pair, start_lsn, rows, tmp_ledger)
            v = _verify_through_the_cli(nodes, "db", entry["id"])
            assert 300 <= v["expected"] < writer.acked, (v, writer.acked)


def test_a_drill_running_when_its_leader_is_killed_is_marked_interrupted_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot is the operator's command (`snapshots.commands`, per service); its artifact
    is an s3:// URI on an endpoint that accepts connections and never answers, so the drill
    holds in its fetch until the leader is killed."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "drill-test")  # the serve processes inherit them (boto3 asks first)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with workdir() as wd, socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(16)  # never accepted: the kernel completes connections, nobody answers
        members = [{"name": n, "address": HOST, "port": free_low_port()} for n in ("a", "b")]
        service = {"name": "web", "protocol": "tcp", "listen_port": free_low_port(), "members": members,
                   "primary": "a"}
        nodes = raft_cluster(wd, 3, {"services": [service]})
        for node in nodes:
            node.config["snapshots"] = {
                "commands": {"web": ["sh", "-c", "echo s3://drills/{service}/{snapshot_id}"]},
                "s3_endpoint_url": f"http://{HOST}:{silent.getsockname()[1]}",
            }
        try:
            start_cluster(nodes)
            leader = cluster_leader(nodes)
            status, started = leader.call("POST", "/v1/services/web/snapshots", {"member": "b"})
            assert status == 202, started
            path = f"/v1/services/web/snapshots/{started['id']}"
            entry = wait_until(lambda: (e := leader.get(path))["status"] != "running" and not e["undo"] and e,
                               30, what="the command snapshot ends")
            assert entry["status"] == "completed" and entry["artifact"].startswith("s3://drills/web/"), entry
            status, body = leader.call("POST", f"{path}/verify")
            assert status == 202 and body["verification"]["status"] == "running", body
            leader.proc.kill()
            alive = [n for n in nodes if n is not leader]
            successor = cluster_leader(alive, timeout=30)
            v = wait_until(lambda: (e := successor.get(path)["verification"])["status"] != "running" and e,
                           30, what="the next leader ends the drill")
            assert v["status"] == "interrupted" and leader.name in v["error"], v
            with urllib.request.urlopen(f"{successor.api}/metrics", timeout=10) as resp:
                metrics = resp.read().decode()
            assert 'repstage_snapshot_verifications_total{result="interrupted",service="web"} 1.0' in metrics
        finally:
            for node in nodes:
                node.stop()
