"""Snapshot actions against real servers (issue 16, items 3 and 6): a writer runs throughout a
snapshot taken from a replica; the snapshot, restored into a fresh server, holds exactly the
writes acknowledged before its recorded point (0 missing, 0 extra), for Redis and PostgreSQL.
The ledger always holds writes after the point too, so a restore that went past it would fail.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from integration.databases import HOST, postgres_bindir, postgres_pair, redis_group, wait_until
from repstage_mesh.snapshots.actions import SnapshotTarget, build_action, verify_snapshot
from repstage_mesh.snapshots.actions.ledger import LedgerEntry, ledger_line
from repstage_mesh.snapshots.actions.scratch import ScratchOptions


@dataclass
class Settings:
    storage: str
    take_timeout: float = 120.0
    s3_endpoint_url: str | None = None


class Writer(threading.Thread):
    """Writes w:<i> = <i> until stopped; `acked` counts acknowledged writes."""

    def __init__(self, write_one) -> None:
        super().__init__(daemon=True)
        self.write_one = write_one
        self.stopping = threading.Event()
        self.acked = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.write_one(self.acked)
                self.acked += 1
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        assert self.error is None, self.error


def _target(kind: str, member: str, port: int) -> SnapshotTarget:
    return SnapshotTarget(service="svc", member=member, host=HOST, port=port, kind=kind,
                          role="replica", epoch=7, snapshot_id=f"{kind}-s1")


@pytest.mark.parametrize("method", ["replication", "bgsave"])
async def test_redis_snapshot_from_a_replica_under_writes_restores_exactly_the_acked_writes(
    tmp_path: Path, method: str
) -> None:
    """`bgsave`: a save already runs on the member (slowed down per key) when the action asks for
    its own: it waits for that one, then saves and copies the file (the harness shares it)."""
    with redis_group(replicas=1) as group:
        await _redis_snapshot_under_writes(group, tmp_path, method)


async def _redis_snapshot_under_writes(group, tmp_path: Path, method: str) -> None:
    ledger = tmp_path / "ledger.jsonl"
    primary = redis.Redis(host=HOST, port=group.port("r0"), decode_responses=True)
    with open(ledger, "w", encoding="utf-8") as out:

        def write_one(i: int) -> None:
            # INFO inside the MULTI: the offset at which this SET starts in the stream
            pipe = primary.pipeline(transaction=True)
            pipe.info("replication").set(f"w:{i}", str(i))
            info, _ = pipe.execute()
            out.write(ledger_line(LedgerEntry(f"w:{i}", str(i), time.time(),
                                              str(info["master_repl_offset"]),
                                              replid=info["master_replid"])))

        writer = Writer(write_one)
        writer.start()
        try:
            wait_until(lambda: writer.acked >= 300, 20, "300 writes before the snapshot")
            # the replica lags a little (the machine is shared): let it apply those 300 first, so
            # that the point has writes on both sides (the writer goes on meanwhile)
            offset = int(group.command("r0", "INFO", "replication")["master_repl_offset"])
            wait_until(lambda: int(group.command("r1", "INFO", "replication")["master_repl_offset"])
                       >= offset, 20, "the replica past the first 300 writes")
            action = build_action("redis", Settings(storage=(tmp_path / "snaps").as_uri()),
                                  redis_local_rdb=method == "bgsave")
            if method == "bgsave":
                group.command("r1", "CONFIG", "SET", "rdb-key-save-delay", "300")  # microseconds
                group.command("r1", "BGSAVE")
            result = await action.take(_target("redis", "r1", group.port("r1")), timeout=60)
            assert result.point["method"] == method
            at_snapshot = writer.acked
            wait_until(lambda: writer.acked >= at_snapshot + 300, 20, "300 writes after it")
        finally:
            writer.stop()
    assert result.artifact.startswith("file://") and result.size_bytes > 0
    assert result.point["member_role"] == "slave"
    record = {"kind": "redis", "artifact": result.artifact, "point": result.point}
    verdict = await verify_snapshot(record, ledger)
    assert verdict.error is None and verdict.ok and verdict.restored, verdict.error or verdict
    assert verdict.comparison["counts"] == {"missing": 0, "extra": 0, "unexplained": 0}
    expected = verdict.comparison["expected"]
    assert 300 <= expected < writer.acked, (expected, writer.acked, result.point)  # both sides
    # the same snapshot recorded with a later point: the writes after the real one are missing
    late = {**result.point, "master_repl_offset": str(int(result.point["master_repl_offset"]) + 10**9)}
    wrong = await verify_snapshot({**record, "point": late}, ledger)
    assert not wrong.ok and wrong.comparison["counts"]["missing"] == writer.acked - expected


def _pg_writer(dsn: str, rows: list[tuple[str, str, float, int]]):
    conn = psycopg.connect(dsn)

    def write_one(i: int) -> None:
        with conn.transaction():
            xid = conn.execute(
                "INSERT INTO kv VALUES (%s, %s) RETURNING txid_current()", (f"w:{i}", str(i))
            ).fetchone()[0]
        rows.append((f"w:{i}", str(i), time.time(), int(xid)))

    return conn, write_one


async def _a_stopped_standby_gets_pg_basebackup_killed_at_the_timeout(pair, tmp_path: Path) -> None:
    from repstage_mesh.snapshots.actions import SnapshotActionTimeout
    from repstage_mesh.snapshots.actions.postgres_action import PostgresAction
    from repstage_mesh.snapshots.actions.storage import open_storage

    storage = tmp_path / "hung"
    action = PostgresAction(open_storage(storage.as_uri()), postgres_bindir(),
                            checkpoint_primary=False)
    target = SnapshotTarget(**{**_target("postgres", "pg1", pair.port("pg1")).__dict__,
                               "snapshot_id": "hung"})
    pair.stop("pg1")  # SIGSTOP: connected, silent
    try:
        with pytest.raises(SnapshotActionTimeout, match=r"pg_basebackup of pg1 .* killed after its timeout of [0-9.]+ s"):
            await action.take(target, timeout=2)
    finally:
        pair.cont("pg1")

    def cmdlines() -> list[str]:
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
        return out

    assert not [c for c in cmdlines() if str(storage) in c]  # no pg_basebackup left behind
    assert not (storage / "svc" / "hung").exists()
    assert list((storage / ".staging").iterdir()) == []


def _pg_ledger(pair, start_lsn: str, rows, ledger: Path) -> None:
    """Each acknowledged transaction's commit LSN, read from the primary's WAL (pg_walinspect)."""
    end = pair.query("pg0", "SELECT pg_current_wal_insert_lsn()::text")[0][0]
    wait_until(  # synchronous_commit is off in the pair: the walwriter flushes a little later
        lambda: pair.query("pg0", "SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (end,))[0][0],
        10, "the primary's WAL flushed",
    )
    commits = dict(
        pair.query(
            "pg0",
            "SELECT xid::text::bigint, start_lsn::text FROM pg_get_wal_records_info(%s, %s) "
            "WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT'",
            (start_lsn, end),
        )
    )
    with open(ledger, "w", encoding="utf-8") as out:
        for key, value, acked_at, xid in rows:
            out.write(ledger_line(LedgerEntry(key, value, acked_at, commits[xid % 2**32], "kv")))


async def test_postgres_snapshot_from_a_standby_under_writes_restores_exactly_the_acked_writes(
    tmp_path: Path,
) -> None:
    with postgres_pair(full_page_writes=True) as pair:
        pair.query("pg0", "CREATE TABLE kv (key text PRIMARY KEY, value text)")
        pair.query("pg0", "CREATE EXTENSION pg_walinspect")
        start_lsn = pair.query("pg0", "SELECT pg_current_wal_insert_lsn()::text")[0][0]
        rows: list[tuple[str, str, float, int]] = []
        conn, write_one = _pg_writer(pair.dsn("pg0"), rows)
        writer = Writer(write_one)
        writer.start()
        try:
            wait_until(lambda: writer.acked >= 300, 30, "300 writes before the snapshot")
            lsn = pair.query("pg0", "SELECT pg_current_wal_insert_lsn()::text")[0][0]
            wait_until(lambda: pair.query("pg1", "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                          (lsn,))[0][0], 30, "the standby past the first 300 writes")
            action = build_action("postgres", Settings(storage=(tmp_path / "snaps").as_uri()),
                                  pg_bindir=postgres_bindir())
            result = await action.take(_target("postgres", "pg1", pair.port("pg1")), timeout=120)
            at_snapshot = writer.acked
            wait_until(lambda: writer.acked >= at_snapshot + 300, 30, "300 writes after it")
        finally:
            writer.stop()
            conn.close()
        _pg_ledger(pair, start_lsn, rows, tmp_path / "ledger.jsonl")
        await _a_stopped_standby_gets_pg_basebackup_killed_at_the_timeout(pair, tmp_path)
    assert set(result.point) >= {"start_lsn", "stop_lsn", "timeline", "end_lsn"}
    assert "/" in result.point["upstream_checkpoint"], result.point  # an LSN: it was asked
    assert sorted(os.listdir(result.artifact.removeprefix("file://"))) == [
        "backup_manifest", "base.tar", "pg_wal.tar"]
    record = {"kind": "postgres", "result": {"artifact": result.artifact, "point": result.point}}
    verdict = await verify_snapshot(record, tmp_path / "ledger.jsonl",
                                    options=ScratchOptions(pg_bindir=postgres_bindir()))
    assert verdict.error is None and verdict.ok and verdict.restored, verdict.error or verdict
    assert verdict.comparison["counts"] == {"missing": 0, "extra": 0, "unexplained": 0}
    expected = verdict.comparison["expected"]
    assert 300 <= expected < writer.acked, (expected, writer.acked, result.point, verdict)


async def test_redis_snapshot_to_an_s3_bucket_restores_and_a_stopped_member_times_out(
    tmp_path: Path, monkeypatch
) -> None:
    """moto's server stands in for an S3-compatible store. A member that stops answering (SIGSTOP)
    makes the take fail at its timeout, with that reason, and leaves nothing stored."""
    import boto3
    from moto.server import ThreadedMotoServer

    from repstage_mesh.snapshots.actions import SnapshotActionTimeout

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = ThreadedMotoServer(ip_address=HOST, port=0)
    s3.start()
    try:
        endpoint = "http://{}:{}".format(*s3.get_host_and_port())
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="snaps")
        with redis_group(replicas=1) as group:
            group.command("r0", "SET", "k", "v")
            group.wait_in_sync("r0", ["r1"])
            action = build_action("redis", Settings("s3://snaps/mesh", 30, endpoint))
            result = await action.take(_target("redis", "r1", group.port("r1")), timeout=30)
            assert result.artifact == "s3://snaps/mesh/svc/redis-s1/"
            verdict = await verify_snapshot(
                {"kind": "redis", "artifact": result.artifact, "point": result.point}, None,
                s3_endpoint_url=endpoint)
            assert verdict.ok and verdict.restored and not verdict.compared, verdict
            group.stop("r1")
            try:
                late = SnapshotTarget(**{**_target("redis", "r1", group.port("r1")).__dict__,
                                         "snapshot_id": "late"})
                with pytest.raises(SnapshotActionTimeout, match="timeout of 1 s"):
                    await action.take(late, timeout=1)
            finally:
                group.cont("r1")
        listed = client.list_objects_v2(Bucket="snaps", Prefix="mesh/svc/late/")
        assert listed.get("KeyCount", 0) == 0
    finally:
        s3.stop()
