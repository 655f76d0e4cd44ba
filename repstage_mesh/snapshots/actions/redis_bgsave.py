"""The other Redis snapshot: `BGSAVE` on the member, then a copy of its dump file, for a mesh
that shares the member's file system (a sidecar, the same host). `build_action(...,
redis_local_rdb=True)` chooses it; the default (`redis_action.py`) needs only the network.

BGSAVE (plain: not `BGSAVE SCHEDULE`, whose "scheduled" would not mean "started") forks
before it answers "Background saving started", so the save is ours and done when INFO
persistence shows no save in progress; `LASTSAVE` must then have moved, except within the same
second (its resolution is one second), and the save's status must be `ok`. ("rdb_saves" does not
count BGSAVEs on Redis 7.0: measured.) A refusal because another fork runs ("Background save
already in progress", an AOF rewrite) waits for that fork to end and asks again, within the
caller's timeout. The file is opened once and copied (Redis replaces it by rename, so a later
save does not tear the copy); the point is read from the RDB's own `repl-id` and `repl-offset`,
written by the fork that made it.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from repstage_mesh.snapshots.actions.base import SnapshotTarget
from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed
from repstage_mesh.snapshots.actions.rdb import aux_fields
from repstage_mesh.snapshots.actions.rdb import redis_username as _username

POLL = 0.02  # seconds between looks at INFO persistence (the caller's timeout bounds the wait)


async def _forks(client: aioredis.Redis) -> tuple[bool, str, Any]:
    info = await client.info("persistence")
    running = bool(int(info.get("rdb_bgsave_in_progress", 0))) or bool(
        int(info.get("aof_rewrite_in_progress", 0)))
    return running, str(info.get("rdb_last_bgsave_status", "")), await client.lastsave()


async def _until_no_fork(client: aioredis.Redis) -> tuple[str, Any]:
    while True:
        running, status, lastsave = await _forks(client)
        if not running:
            return status, lastsave
        await asyncio.sleep(POLL)


async def bgsave(client: aioredis.Redis) -> None:
    """A BGSAVE that starts after this call, finished with status ok."""
    while True:
        before = await client.lastsave()
        try:
            await client.bgsave(schedule=False)
            break
        except ResponseError as exc:
            if "in progress" not in str(exc) and "child process" not in str(exc):
                raise SnapshotActionFailed(f"BGSAVE refused: {exc}") from exc
            await _until_no_fork(client)  # an older save (its point is older): then ours
    status, lastsave = await _until_no_fork(client)
    if status != "ok" or lastsave < before:
        raise SnapshotActionFailed(f"BGSAVE failed on the member (status {status!r})")


async def bgsave_and_copy(target: SnapshotTarget, dest: Path) -> dict[str, str]:
    client = aioredis.Redis(
        host=target.host, port=target.port, password=target.credentials.get("password"),
        username=_username(target), decode_responses=True,
    )
    try:
        replication = await client.info("replication")
        await bgsave(client)
        directory = str((await client.config_get("dir"))["dir"])
        filename = str((await client.config_get("dbfilename"))["dbfilename"])
    finally:
        await client.aclose()
    source = Path(directory) / filename
    try:
        await asyncio.to_thread(shutil.copyfile, source, dest)
    except OSError as exc:
        raise SnapshotActionFailed(
            f"cannot copy {source} (does the mesh share the member's file system?): {exc}"
        ) from exc
    with open(dest, "rb") as f:
        fields = aux_fields(f.read(4096))
    if "repl-id" not in fields or "repl-offset" not in fields:
        raise SnapshotActionFailed(f"the RDB of {target.member} carries no replication point")
    before = int(replication.get("master_repl_offset", 0))
    if fields["repl-id"] == replication.get("master_replid") and int(fields["repl-offset"]) < before:
        raise SnapshotActionFailed(  # never store an older file as this snapshot
            f"{source} predates this BGSAVE (offset {fields['repl-offset']} < {before})"
        )
    role = str(replication.get("role", ""))
    return {"master_replid": fields["repl-id"], "master_repl_offset": fields["repl-offset"],
            "member_role": role, "rdb_version": fields["rdb-version"],
            "redis_version": fields.get("redis-ver", ""), "method": "bgsave"}
