"""The Redis snapshot: an RDB fetched over the network from the chosen member (a replica
normally), with the exact replication point it was forked at.

Why not `BGSAVE` + `LASTSAVE` + a file copy: the RDB that BGSAVE writes lies on the member's
disk, which the mesh does not share, and its point is only known from inside the file. Asking the
member for a full resynchronisation (`REPLCONF rdb-only 1`, `PSYNC ? -1`, what `redis-cli --rdb`
does) makes it fork once and stream that RDB to us: no file-system access, one fork (BGSAVE and
then a copy through replication would be two), and the answer `+FULLRESYNC <replid> <offset>`
names the point. A save already in progress is Redis's own business here (the transfer waits for
the next fork), so "Background save already in progress" cannot happen. The RDB's own `repl-id`
and `repl-offset` fields must agree with that answer, or the take fails. The point is in the
primary's stream coordinates (a replica carries its primary's replication id): a write whose
stream offset is below `master_repl_offset` is in the snapshot, any later one is not.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import BinaryIO

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotTarget
from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed, SnapshotActionTimeout
from repstage_mesh.snapshots.actions.rdb import TransferHeader, aux_fields
from repstage_mesh.snapshots.actions.rdb import redis_username as _username
from repstage_mesh.snapshots.actions.redis_bgsave import bgsave_and_copy
from repstage_mesh.snapshots.actions.redis_point import OpenFork
from repstage_mesh.snapshots.actions.storage import Storage, snapshot_key

_CHUNK = 1 << 16


def _command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


async def _expect_ok(reader: asyncio.StreamReader, what: str, optional: bool = False) -> None:
    line = (await reader.readline()).decode(errors="replace").strip()
    if line.startswith("+"):
        return
    if optional and line.startswith("-"):
        return
    raise SnapshotActionFailed(f"{what}: {line or 'connection closed'}")


async def _replication_info(target: SnapshotTarget, timeout: float) -> dict[str, str]:
    client = aioredis.Redis(
        host=target.host, port=target.port, password=target.credentials.get("password"),
        username=_username(target), socket_connect_timeout=timeout,
        decode_responses=True,
    )
    try:
        info = await client.info("replication")
    finally:
        await client.aclose()
    return {k: str(v) for k, v in info.items()}


async def _receive_rdb(reader: asyncio.StreamReader, dest: Path, buffer: bytes = b"") -> TransferHeader:
    header = None
    while header is None:
        header = TransferHeader.parse(buffer) if buffer else None
        if header is None:
            chunk = await reader.read(_CHUNK)
            if not chunk:
                raise SnapshotActionFailed("the member closed the connection before the RDB")
            buffer += chunk
    rest = buffer[header.consumed :]
    with open(dest, "wb") as out:
        if header.length is not None:
            remaining = header.length
            while remaining > 0:
                if not rest:
                    rest = await reader.read(min(_CHUNK, remaining))
                    if not rest:
                        raise SnapshotActionFailed("RDB transfer cut short")
                out.write(rest[:remaining])
                remaining -= len(rest[:remaining])
                rest = b""
        else:
            await _copy_until_mark(reader, out, rest, header.eof_mark or b"")
    return header


async def _copy_until_mark(reader: asyncio.StreamReader, out: BinaryIO, first: bytes,
                           mark: bytes) -> None:
    """Write everything before `mark` (the transfer's last 40 bytes) to `out`."""
    held = first
    while True:
        if held.endswith(mark):
            out.write(held[: -len(mark)])
            return
        keep = len(mark) - 1
        if len(held) > keep:
            out.write(held[:-keep])
            held = held[-keep:]
        chunk = await reader.read(_CHUNK)
        if not chunk:
            raise SnapshotActionFailed("RDB transfer cut short (no EOF mark)")
        held += chunk


async def fetch_rdb(target: SnapshotTarget, dest: Path) -> dict[str, str]:
    """Stream an RDB of `target` into `dest`; returns the snapshot point."""
    info = await _replication_info(target, timeout=5.0)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        password = target.credentials.get("password")
        user = _username(target)
        steps: list[tuple[bytes, str, bool]] = []
        if password:
            auth = _command("AUTH", user, password) if user else _command("AUTH", password)
            steps.append((auth, "AUTH", False))
        steps += [(_command("REPLCONF", "capa", "eof"), "REPLCONF capa eof", False),
                  (_command("REPLCONF", "rdb-only", "1"), "REPLCONF rdb-only", True)]
        for command, what, optional in steps:  # one at a time: PSYNC refuses pending output
            writer.write(command)
            await writer.drain()
            await _expect_ok(reader, what, optional)  # rdb-only: Redis < 7 lacks it
        writer.write(_command("PSYNC", "?", "-1"))
        await writer.drain()
        header = await _receive_rdb(reader, dest)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return _checked_point(dest, header, info.get("role", ""))


def _checked_point(dest: Path, header: TransferHeader, role: str) -> dict[str, str]:
    """The point of the RDB in `dest`, which must agree with the transfer's header."""
    with open(dest, "rb") as f:
        fields = aux_fields(f.read(4096))
    in_file = (fields.get("repl-id"), fields.get("repl-offset"))
    if in_file != (None, None) and in_file != (header.replid, str(header.offset)):
        raise SnapshotActionFailed(
            f"RDB point {in_file} differs from the transfer's {header.replid} {header.offset}"
        )
    return {
        "master_replid": header.replid,
        "master_repl_offset": str(header.offset),
        "member_role": role,
        "rdb_version": fields["rdb-version"],
        "redis_version": fields.get("redis-ver", ""),
        "method": "replication",
    }


async def _read_fork(fork: OpenFork, target: SnapshotTarget, dest: Path) -> dict[str, str]:
    try:
        header = await _receive_rdb(fork.reader, dest, fork.head)
    finally:
        fork.close()
    return _checked_point(dest, header, "master" if target.role == "primary" else "slave")


class RedisAction:
    """`take`: an RDB of the target, stored under `<service>/<snapshot id>/dump.rdb`."""

    def __init__(self, storage: Storage, local_rdb: bool = False) -> None:
        self.storage = storage
        self.local_rdb = local_rdb  # BGSAVE + copy of the member's file (redis_bgsave.py)

    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult:
        key = snapshot_key(target.service, target.snapshot_id)
        staged = self.storage.stage()
        try:
            try:
                async with asyncio.timeout(timeout):
                    take = bgsave_and_copy if self.local_rdb else fetch_rdb
                    point = await take(target, staged / "dump.rdb")
                    stored = await self.storage.commit(staged, key)
            except SnapshotActionTimeout:
                raise
            except TimeoutError:
                raise SnapshotActionTimeout(
                    f"redis snapshot of {target.member} stopped at its timeout of {timeout:g} s"
                ) from None
            except (OSError, RedisError) as exc:
                raise SnapshotActionFailed(f"redis snapshot of {target.member}: {exc}") from exc
        except BaseException:
            self.storage.discard(staged)
            raise
        return ActionResult(stored.uri, point, stored.size_bytes)

    async def finish_fork(self, fork: OpenFork, target: SnapshotTarget, timeout: float) -> ActionResult:
        """Read and store the RDB of a fork opened at a consistent point (`redis_point.py`)."""
        key = snapshot_key(target.service, target.snapshot_id)
        staged = self.storage.stage()
        try:
            try:
                async with asyncio.timeout(timeout):
                    point = await _read_fork(fork, target, staged / "dump.rdb")
                    stored = await self.storage.commit(staged, key)
            except TimeoutError:
                raise SnapshotActionTimeout(f"redis transfer from {target.member} stopped at its timeout of {timeout:g} s") from None
            except (OSError, RedisError) as exc:
                raise SnapshotActionFailed(f"redis transfer from {target.member}: {exc}") from exc
        except BaseException:
            fork.close()
            self.storage.discard(staged)
            raise
        return ActionResult(stored.uri, point, stored.size_bytes)
