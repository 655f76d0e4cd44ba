"""The PostgreSQL snapshot: `pg_basebackup` from the chosen member (a standby normally), tar
format with the WAL it needs streamed alongside (`-F tar -X stream`).

Why pg_basebackup rather than `pg_backup_start`/`pg_backup_stop` around a copy: the mesh does not
share the member's file system, and a copy needs it; pg_basebackup takes the files over the
replication protocol, works from a standby (no load on the primary, no promotion race on the
primary's side), streams the WAL that makes the copy consistent, and writes `backup_manifest`,
whose `WAL-Ranges` give the start and stop LSN and the timeline without parsing log text. The
point's meaning: restored with `recovery_target_lsn = stop_lsn` (not inclusive), the copy holds
the WAL in `pg_wal.tar` that a restore replays. `stop_lsn` is where the copy becomes consistent;
from a standby it is the standby's minRecoveryPoint, which may lie well before the moment of the
backup (even before its start), and the streamed WAL runs on past it, to what the standby had
when the backup ended. A plain restore (start the server on the extracted files) replays all of
it, so the snapshot's point is `end_lsn`, the end of the last complete WAL record in
`pg_wal.tar`, read at take time with `pg_waldump`: the restored cluster holds exactly the
transactions whose commit record starts before `end_lsn`.

A fresh point from a standby: its minRecoveryPoint only moves when it writes a page or makes a
restartpoint, and a restartpoint needs a checkpoint record from the primary. So, by default
(`checkpoint_primary`), the action first asks the standby's upstream (`pg_stat_wal_receiver`)
for a `CHECKPOINT`, waits until the standby has replayed past it, and only then starts
pg_basebackup, whose restartpoint then brings `stop_lsn` to at least that checkpoint
(measured: without it `stop_lsn` stayed where the standby had started, minutes of writes
earlier). The cost is one immediate checkpoint on the primary. If the upstream cannot be reached
the backup goes on (its point stays exact, only older) and `upstream_checkpoint` in the point
says why.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotTarget
from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed, SnapshotActionTimeout
from repstage_mesh.snapshots.actions.process import minimal_env, run_argv
from repstage_mesh.snapshots.actions.storage import Storage, snapshot_key


def postgres_binary(name: str, bindir: str | None = None) -> str:
    """`name` (pg_basebackup, postgres) from `bindir`, else the newest /usr/lib/postgresql/*/bin,
    else PATH."""
    if bindir:
        path = os.path.join(bindir, name)
        if not os.access(path, os.X_OK):
            raise SnapshotActionFailed(f"{path} is not an executable")
        return path
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if not found:
        raise SnapshotActionFailed(f"{name} not found: install the PostgreSQL client programs")
    return found


def manifest_point(manifest: Path) -> dict[str, str]:
    """start_lsn, stop_lsn and timeline from a backup_manifest's WAL-Ranges."""
    try:
        ranges = json.loads(manifest.read_text())["WAL-Ranges"]
        first, last = ranges[0], ranges[-1]
        return {
            "start_lsn": str(first["Start-LSN"]),
            "stop_lsn": str(last["End-LSN"]),
            "timeline": str(last["Timeline"]),
        }
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise SnapshotActionFailed(f"cannot read the backup's WAL range from {manifest}: {exc}") from exc


PROGRAM_MARGIN = 0.2  # seconds
_RECORD = re.compile(r"len \(rec/tot\):\s*\d+/\s*(\d+),.*?lsn: ([0-9A-F]+)/([0-9A-F]+),")


def wal_end(waldump_stdout: str) -> str | None:
    """The end of the last WAL record pg_waldump printed (None if it printed none)."""
    last = None
    for match in _RECORD.finditer(waldump_stdout):
        last = match
    if last is None:
        return None
    start = (int(last.group(2), 16) << 32) | int(last.group(3), 16)
    end = start + ((int(last.group(1)) + 7) & ~7)  # records are 8-byte aligned
    return f"{end >> 32:X}/{end & 0xFFFFFFFF:X}"


def extract_tar(archive: Path, into: Path) -> None:
    """Extract a backup's tar, refusing members that would land outside `into` (tarfile's
    "data" filter; on a Python 3.11 before 3.11.4, which lacks it, the same check by hand)."""
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, filter="data")
                return
            root = into.resolve()
            for member in tar.getmembers():
                inside = (root / member.name).resolve().is_relative_to(root)
                if member.issym() or member.islnk() or not inside:
                    raise tarfile.TarError(f"member {member.name!r} leaves the directory")
            tar.extractall(into)  # every member checked above
    except tarfile.TarError as exc:
        raise SnapshotActionFailed(f"{archive.name}: {exc}") from exc


async def _measure_end(action: PostgresAction, staged: Path, point: dict[str, str],
                       timeout: float) -> str:
    waldir = staged / ".pg_wal"
    try:
        await asyncio.to_thread(extract_tar, staged / "pg_wal.tar", waldir)
        done = await run_argv(
            [postgres_binary("pg_waldump", action.bindir), "-p", str(waldir),
             "-t", point["timeline"], "-s", point["stop_lsn"]],
            timeout, what="pg_waldump", check=False,
        )
    finally:
        shutil.rmtree(waldir, ignore_errors=True)
    end = wal_end(done.stdout)
    if end is None and "could not find a valid record after" in done.stderr:
        return point["stop_lsn"]  # the streamed WAL ends where the backup became consistent
    if end is None:
        raise SnapshotActionFailed(f"pg_waldump found no WAL after {point['stop_lsn']}: "
                                   f"{done.stderr.strip()}")
    return end


def _conninfo(target: SnapshotTarget, host: str, port: int) -> str:
    return make_conninfo(host=host, port=port, user=target.credentials.get("user", "postgres"),
                         password=target.credentials.get("password"),
                         dbname=target.credentials.get("database") or "postgres",
                         connect_timeout=10, application_name="repstage-snapshot")


async def checkpoint_upstream(target: SnapshotTarget) -> str | None:
    """CHECKPOINT on the standby's upstream, then wait for the standby to replay past it; the
    upstream's LSN after the checkpoint, or None when the target is not a streaming standby."""
    async with await psycopg.AsyncConnection.connect(
        _conninfo(target, target.host, target.port), autocommit=True
    ) as standby:
        row = await (await standby.execute(
            "SELECT sender_host, sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'"
        )).fetchone()
        if row is None or not row[0]:
            return None
        host = target.host if str(row[0]).startswith("/") else str(row[0])
        async with await psycopg.AsyncConnection.connect(
            _conninfo(target, host, int(row[1])), autocommit=True
        ) as upstream:
            await upstream.execute("CHECKPOINT")
            lsn_row = await (await upstream.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
        lsn = str(lsn_row[0]) if lsn_row else None
        while lsn is not None:
            done = await (await standby.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))).fetchone()
            if done and done[0]:
                break
            await asyncio.sleep(0.01)  # polling the replay position; the caller bounds it
        return lsn


class PostgresAction:
    """`take`: base.tar + pg_wal.tar + backup_manifest under `<service>/<snapshot id>/`."""

    def __init__(self, storage: Storage, bindir: str | None = None,
                 checkpoint_primary: bool = True) -> None:
        self.storage = storage
        self.bindir = bindir
        self.checkpoint_primary = checkpoint_primary

    def argv(self, target: SnapshotTarget, dest: Path) -> list[str]:
        return [
            postgres_binary("pg_basebackup", self.bindir),
            "-h", target.host, "-p", str(target.port),
            "-U", target.credentials.get("user", "postgres"),
            "-D", str(dest), "-F", "tar", "-X", "stream",
            "--checkpoint", "fast", "--no-password", "--verbose",
        ]

    async def _freshen(self, target: SnapshotTarget) -> str:
        """The upstream checkpoint's LSN, or why there is none. Not fatal: without it the point
        is still exact, only possibly older."""
        if not self.checkpoint_primary:
            return "off"
        try:
            lsn = await checkpoint_upstream(target)
        except psycopg.Error as exc:
            return f"failed: {str(exc).strip()[:300]}"
        return lsn or "none (not a streaming standby)"

    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult:
        """Within `timeout` for everything (checkpoint, backup, WAL reading, storing): a
        program still running then is killed with its process group."""
        key = snapshot_key(target.service, target.snapshot_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        staged = self.storage.stage()
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    # a program's own timeout ends a little before the deadline: its kill, with
                    # its name, is the reason given rather than the take's
                    point = await self._take_into(
                        target, staged, lambda: max(0.01, deadline - loop.time() - PROGRAM_MARGIN))
                    stored = await self.storage.commit(staged, key)
            except SnapshotActionTimeout:
                raise  # a program killed at the deadline: its own reason
            except TimeoutError:
                raise SnapshotActionTimeout(
                    f"postgres snapshot of {target.member} stopped at its timeout of {timeout:g} s"
                ) from None
        except BaseException:
            self.storage.discard(staged)
            raise
        return ActionResult(stored.uri, point, stored.size_bytes)

    async def _take_into(self, target: SnapshotTarget, staged: Path,
                         left: Callable[[], float]) -> dict[str, str]:
        dest = staged / "backup"
        env = {"PGCONNECT_TIMEOUT": "10", "PGAPPNAME": f"repstage-snapshot-{target.snapshot_id}"}
        if "password" in target.credentials:
            env["PGPASSWORD"] = target.credentials["password"]
        fresh = await self._freshen(target)
        await run_argv(self.argv(target, dest), left(), env=minimal_env(env),
                       what=f"pg_basebackup of {target.member}")
        for item in dest.iterdir():
            item.rename(staged / item.name)
        dest.rmdir()
        point = manifest_point(staged / "backup_manifest")
        point["end_lsn"] = await _measure_end(self, staged, point, left())
        point["upstream_checkpoint"] = fresh
        return point
