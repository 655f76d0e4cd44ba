"""Snapshot actions without databases: the RDB and transfer parsers, the ledger and its
comparison, the storage (a directory; an S3 bucket served by moto's server as a stand-in for a
real S3-compatible store), the operator's command (argv, timeout that kills its process group),
and build_action's refusals. Real Redis/PostgreSQL: integration/test_snapshot_actions.py."""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from repstage_mesh.snapshots.actions import (
    SnapshotActionFailed,
    SnapshotActionTimeout,
    SnapshotTarget,
    build_action,
    verify_snapshot,
)
from repstage_mesh.snapshots.actions.command_action import CommandAction
from repstage_mesh.snapshots.actions.ledger import (
    LedgerEntry,
    compare,
    included_by,
    ledger_line,
    parse_ledger,
    parse_lsn,
)
from repstage_mesh.snapshots.actions.postgres_action import wal_end
from repstage_mesh.snapshots.actions.rdb import RdbFormatError, TransferHeader, aux_fields
from repstage_mesh.snapshots.actions.storage import fetch, open_storage, snapshot_key
from tests.fakes import eventually


@dataclass
class Settings:
    storage: str
    take_timeout: float = 30.0
    s3_endpoint_url: str | None = None


TARGET = SnapshotTarget(service="svc", member="m1", host="127.0.0.1", port=6379, kind="tcp",
                        role="replica", epoch=3, snapshot_id="s1")


def _rdb_string(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def _rdb_head(fields: list[tuple[bytes, bytes]]) -> bytes:
    head = b"REDIS0011"
    for key, value in fields:
        head += b"\xfa" + _rdb_string(key) + _rdb_string(value)
    bits = b"\xfa" + _rdb_string(b"redis-bits") + b"\xc0\x40"  # an 8-bit integer encoding
    offset = b"\xfa" + _rdb_string(b"repl-offset") + b"\xc2" + struct.pack("<i", 70000)
    return head + bits + offset + b"\xfe\x00\xff"


def test_rdb_aux_fields_give_the_point_the_fork_was_taken_at() -> None:
    fields = aux_fields(_rdb_head([(b"redis-ver", b"7.0.15"), (b"repl-id", b"a" * 40)]))
    assert fields == {"rdb-version": "11", "redis-ver": "7.0.15", "repl-id": "a" * 40,
                      "redis-bits": "64", "repl-offset": "70000"}
    with pytest.raises(RdbFormatError, match="not an RDB"):
        aux_fields(b"HELLO")


def test_transfer_header_both_forms_with_keepalives_and_refusals() -> None:
    mark = b"m" * 40
    raw = b"\n\n+FULLRESYNC " + b"r" * 40 + b" 1234\r\n\n$EOF:" + mark + b"\r\nREDIS"
    header = TransferHeader.parse(raw)
    assert header is not None and (header.offset, header.eof_mark, header.length) == (1234, mark, None)
    assert raw[header.consumed:] == b"REDIS"
    assert TransferHeader.parse(raw[:20]) is None  # more bytes needed
    sized = TransferHeader.parse(b"+FULLRESYNC x 5\r\n$99\r\n")
    assert sized is not None and sized.length == 99
    with pytest.raises(SnapshotActionFailed, match="refused"):
        TransferHeader.parse(b"-NOMASTERLINK Can't SYNC\r\n")


def test_ledger_lines_round_trip_and_bad_lines_name_line_and_field() -> None:
    entry = LedgerEntry("k", "v", 1.5, "0/3000148", table="kv")
    assert parse_ledger([ledger_line(entry), "\n"]) == [entry]
    with pytest.raises(SnapshotActionFailed, match="line 2: field 'value' must be a string"):
        parse_ledger([ledger_line(entry), '{"key": "a", "value": 1, "acked_at": 1}'])
    with pytest.raises(SnapshotActionFailed, match="line 1: not JSON"):
        parse_ledger(["{"])
    with pytest.raises(SnapshotActionFailed, match="acked_at"):
        parse_ledger(['{"key": "a", "value": "b"}'])
    assert parse_lsn("1/10") == (1 << 32) + 16


def test_compare_classifies_missing_extra_and_unexplained() -> None:
    entries = [LedgerEntry(k, v, 0, str(pos)) for k, v, pos in [
        ("a", "1", 10), ("a", "2", 20), ("b", "1", 30), ("c", "1", 40), ("c", "2", 60),
        ("d", "1", 70), ("e", "1", 15), ("f", "1", 16)]]
    included = included_by("redis", {"master_repl_offset": "50", "master_replid": "x"})
    restored = {"a": "1", "b": "1", "c": "2", "d": None, "e": "zzz", "f": "1"}
    result = compare(entries, included, restored)
    assert (result.missing, result.extra, result.unexplained) == (["a"], ["c"], ["e"])
    assert result.matched == 2 and result.expected == 5 and not result.ok
    # the point: a write starting at the point is after it
    assert not included_by("redis", {"master_repl_offset": "10"})(entries[0])
    assert included_by("postgres", {"end_lsn": "0/11"})(LedgerEntry("k", "v", 0, "0/10"))
    with pytest.raises(SnapshotActionFailed, match="replication id"):
        included(LedgerEntry("k", "v", 0, "1", replid="other"))


def test_wal_end_is_the_end_of_the_last_record_pg_waldump_printed() -> None:
    out = ("rmgr: Heap len (rec/tot): 59/ 59, tx: 5, lsn: 0/03000028, prev 0/0, desc: INSERT\n"
           "rmgr: Transaction len (rec/tot):     34/    34, tx:  5, lsn: 0/0305FFC0, prev 0/1\n")
    assert wal_end(out) == "0/305FFE8"
    assert wal_end("nothing") is None


def test_snapshot_keys_refuse_paths() -> None:
    assert snapshot_key("svc", "s-1") == "svc/s-1"
    for bad in ("../x", "a/b", ""):
        with pytest.raises(SnapshotActionFailed, match="snapshot_id"):
            snapshot_key("svc", bad)


async def test_file_storage_commits_atomically_and_fetches_in_place(tmp_path: Path) -> None:
    storage = open_storage((tmp_path / "snaps").as_uri())
    staged = storage.stage()
    (staged / "dump.rdb").write_bytes(b"12345")
    stored = await storage.commit(staged, "svc/s1")
    assert stored.uri == (tmp_path / "snaps" / "svc" / "s1").as_uri() + "/"
    assert stored.size_bytes == 5 and not staged.exists()
    assert (await fetch(stored.uri, tmp_path)).joinpath("dump.rdb").read_bytes() == b"12345"
    again = storage.stage()
    with pytest.raises(SnapshotActionFailed, match="already stored"):
        await storage.commit(again, "svc/s1")
    for bad in ("ftp://x", "file://", "s3://", "relative/dir"):
        with pytest.raises(SnapshotActionFailed, match="expected file:///"):
            open_storage(bad)


@pytest.fixture
def moto_s3(monkeypatch):
    """moto's server mode: a stand-in for an S3-compatible store, on a free port."""
    from moto.server import ThreadedMotoServer

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


async def test_s3_storage_uploads_and_fetches_back(tmp_path: Path, moto_s3: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="backups")
    storage = open_storage("s3://backups/mesh", moto_s3, timeout=10)
    staged = storage.stage()
    (staged / "base.tar").write_bytes(b"x" * 1000)
    (staged / "backup_manifest").write_text("{}")
    stored = await storage.commit(staged, "svc/s1")
    assert (stored.uri, stored.size_bytes) == ("s3://backups/mesh/svc/s1/", 1002)
    assert not staged.exists()
    local = await fetch(stored.uri, tmp_path / "down", moto_s3, timeout=10)
    assert sorted(p.name for p in local.iterdir()) == ["backup_manifest", "base.tar"]
    with pytest.raises(SnapshotActionFailed, match="no objects"):
        await fetch("s3://backups/mesh/svc/none/", tmp_path / "none", moto_s3, timeout=10)
    missing = open_storage("s3://no-such-bucket/p", moto_s3, timeout=10)
    staged = missing.stage()
    (staged / "dump.rdb").write_bytes(b"x")
    with pytest.raises(SnapshotActionFailed, match="upload to s3://no-such-bucket/p/svc/s2/"):
        await missing.commit(staged, "svc/s2")
    assert not staged.exists()


async def test_command_runs_argv_with_placeholders_and_a_minimal_env(tmp_path: Path) -> None:
    out = tmp_path / "out"
    action = CommandAction([sys.executable, "-c",
                            "import os,sys; open(sys.argv[1],'w').write(' '.join(sys.argv[2:]) "
                            "+ '|' + ','.join(sorted(os.environ))); print('zfs://tank@{snapshot_id}')",
                            str(out), "{service}", "{member}", "{epoch}", "{snapshot_id};rm -rf /"])
    result = await action.take(TARGET, timeout=20)
    args, env = out.read_text().split("|")
    assert args == "svc m1 3 s1;rm -rf /"  # one argv element, never a shell
    assert set(env.split(",")) - {"LC_CTYPE"} == {"LANG", "PATH"}
    assert result.artifact == "zfs://tank@s1" and "finished_at" in result.point


async def test_a_hanging_command_is_killed_with_its_process_group_at_the_timeout(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "child.pid"
    action = CommandAction(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"])
    with pytest.raises(SnapshotActionTimeout, match=r"killed after its timeout of 0\.5 s") as caught:
        await action.take(TARGET, timeout=0.5)
    assert isinstance(caught.value, TimeoutError)  # what the workflow counts as take_timeout
    child = int(pidfile.read_text())

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{child}/stat") as f:  # a zombie waiting for init is gone too
            return f.read().split(")")[1].split()[0] == "Z"

    await eventually(gone, "the command's child killed with its group")


async def test_failing_command_and_bad_templates_say_why() -> None:
    with pytest.raises(SnapshotActionFailed, match="exited with status 3: boom"):
        await CommandAction(["sh", "-c", "echo boom >&2; exit 3"]).take(TARGET, timeout=10)
    with pytest.raises(SnapshotActionFailed, match=r"command\[1\]: unknown placeholder \['dest'\]"):
        CommandAction(["btrfs", "{dest}"])
    with pytest.raises(SnapshotActionFailed, match="cannot run"):
        await CommandAction(["/nonexistent/tool"]).take(TARGET, timeout=10)


def test_build_action_by_kind_and_its_refusals(tmp_path: Path) -> None:
    settings = Settings(storage=tmp_path.as_uri())
    assert type(build_action("redis", settings)).__name__ == "RedisAction"
    assert type(build_action("postgres", settings)).__name__ == "PostgresAction"
    assert type(build_action("tcp", settings, command=["true"])).__name__ == "CommandAction"
    with pytest.raises(SnapshotActionFailed, match="no snapshot action for kind 'tcp'"):
        build_action("tcp", settings)
    with pytest.raises(SnapshotActionFailed, match="storage 'nfs://x'"):
        build_action("redis", Settings(storage="nfs://x"))


async def test_verify_reports_a_record_it_cannot_use_without_raising(tmp_path: Path) -> None:
    result = await verify_snapshot({"kind": "redis"}, None)
    assert not result.ok and "no 'artifact'" in (result.error or "")
    bad = await verify_snapshot({"kind": "redis", "artifact": (tmp_path / "x").as_uri(),
                                 "point": {"master_repl_offset": "1"}}, None)
    assert not bad.ok and not bad.restored and "no such directory" in (bad.error or "")
    assert asyncio.iscoroutinefunction(verify_snapshot)

    @dataclass
    class Entry:  # the workflow's record, as an object; not completed yet
        kind: str = "postgres"
        artifact: str = ""
        point: dict | None = None

    running = await verify_snapshot(Entry(), None)
    assert not running.ok and "no 'artifact' (has it completed?)" in (running.error or "")


class FakeSavingRedis:
    """INFO persistence / LASTSAVE / BGSAVE of a member where a save already runs."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running_polls = 2  # the older save still runs for two looks
        self.clock = 100

    async def info(self, section: str) -> dict[str, object]:
        running = self.running_polls > 0
        self.running_polls -= 1
        return {"rdb_bgsave_in_progress": int(running), "aof_rewrite_in_progress": 0,
                "rdb_last_bgsave_status": "ok"}

    async def lastsave(self) -> int:
        return self.clock

    async def bgsave(self, schedule: bool = True) -> None:
        from redis.exceptions import ResponseError

        assert schedule is False  # "scheduled" would not mean "started"
        self.calls.append("BGSAVE")
        if len(self.calls) == 1:
            raise ResponseError("Background save already in progress")
        self.running_polls = 1
        self.clock += 1


async def test_bgsave_waits_for_a_save_already_in_progress_then_saves_its_own() -> None:
    from repstage_mesh.snapshots.actions.redis_bgsave import bgsave

    fake = FakeSavingRedis()
    await bgsave(fake)  # type: ignore[arg-type]
    assert fake.calls == ["BGSAVE", "BGSAVE"] and fake.running_polls < 0


def test_a_backup_tar_whose_member_leaves_the_directory_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    from repstage_mesh.snapshots.actions.postgres_action import extract_tar

    archive = tmp_path / "base.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "into").mkdir()
    with pytest.raises(SnapshotActionFailed, match=r"base\.tar"):
        extract_tar(archive, tmp_path / "into")
    assert not (tmp_path / "escaped").exists()
