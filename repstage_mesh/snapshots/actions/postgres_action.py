"""The PostgreSQL snapshot: `pg_basebackup` from the chosen member (a standby normally), tar
format with the WAL it needs streamed alongside (`-F tar -X stream`).

Why pg_basebackup rather than `pg_backup_start`/`pg_backup_stop` around a copy: the mesh does not
share the member's file system, and a copy needs it; pg_basebackup takes the files over the
replication protocol, works from a standby (no load on the primary, no promotion race on the
primary's side), streams the WAL that makes the copy consistent, and writes `backup_manifest`,
whose `WAL-Ranges` give the start and stop LSN and the timeline without parsing log text. The
point's meaning: restored with `recovery_target_lsn = stop_lsn` (not inclusive), the copy holds
exactly the transactions whose commit record starts before `stop_lsn` (the drill in `verify.py`
restores it that way; the streamed WAL may run a little past `stop_lsn`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotTarget
from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed
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


class PostgresAction:
    """`take`: base.tar + pg_wal.tar + backup_manifest under `<service>/<snapshot id>/`."""

    def __init__(self, storage: Storage, bindir: str | None = None) -> None:
        self.storage = storage
        self.bindir = bindir

    def argv(self, target: SnapshotTarget, dest: Path) -> list[str]:
        return [
            postgres_binary("pg_basebackup", self.bindir),
            "-h", target.host, "-p", str(target.port),
            "-U", target.credentials.get("user", "postgres"),
            "-D", str(dest), "-F", "tar", "-X", "stream",
            "--checkpoint", "fast", "--no-password", "--verbose",
        ]

    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult:
        key = snapshot_key(target.service, target.snapshot_id)
        staged = self.storage.stage()
        try:
            dest = staged / "backup"
            env = {"PGCONNECT_TIMEOUT": "10", "PGAPPNAME": f"repstage-snapshot-{target.snapshot_id}"}
            if "password" in target.credentials:
                env["PGPASSWORD"] = target.credentials["password"]
            done = await run_argv(self.argv(target, dest), timeout, env=minimal_env(env),
                                  what=f"pg_basebackup of {target.member}")
            for item in dest.iterdir():
                item.rename(staged / item.name)
            dest.rmdir()
            point = manifest_point(staged / "backup_manifest")
            point["pg_basebackup"] = done.stderr.strip().splitlines()[-1] if done.stderr else ""
            stored = await self.storage.commit(staged, key)
        except BaseException:
            self.storage.discard(staged)
            raise
        return ActionResult(stored.uri, point, stored.size_bytes)
