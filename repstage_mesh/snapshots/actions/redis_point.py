"""Redis at a cross-service consistent point: hold writes, fork at the held offset, release.

- `pause_and_read(primary, ms)`: `CLIENT PAUSE <ms> WRITE` and `INFO replication` in one round
  trip, on one connection kept for the release. Redis ends the pause by itself after
  `ms` even if nobody unpauses it (the control plane may die); reads go on. While paused no
  write runs, so the primary's dataset stays what it is at the `master_repl_offset` read: the
  held point. (Redis 7.0 still sends its replicas the periodic PING while a client pause
  lasts, 14 bytes of stream: the offset may move, the data does not; measured here.)
- `open_fork(member, replid, offset, deadline)`: if the member is a replica, wait (polling
  `INFO replication`, a few ms apart) until it has applied the stream up to `offset`; then ask
  it for a full resynchronisation (`REPLCONF rdb-only 1`, `PSYNC ? -1`) *without* `capa eof`,
  so it forks at once for a disk-based transfer (a diskless one would wait
  `repl-diskless-sync-delay`, 5 s by default). Its `+FULLRESYNC <replid> <offset>` answer is
  sent in the same event-loop pass as the fork: when it names the held offset or one after
  it (PINGs only, while paused), the RDB holds exactly the point's data; the fork's own offset
  is recorded as the point (the ledger's rule: a write below it is in the snapshot). The transfer itself is read later (`finish_fork`), after the release.
- `release(paused)`: `CLIENT UNPAUSE` on the pausing connection (`unpause(primary)` on a new
  one: a new leader's, for a point another leader left open).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from repstage_mesh.snapshots.actions.base import SnapshotTarget
from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed
from repstage_mesh.snapshots.actions.rdb import redis_username

__all__ = ["OpenFork", "Paused", "open_fork", "pause_and_read", "release", "unpause"]

CATCH_UP_POLL = 0.002  # seconds between looks at a replica's offset while it catches up


def _client(target: SnapshotTarget, timeout: float) -> aioredis.Redis:
    return aioredis.Redis(
        host=target.host, port=target.port, password=target.credentials.get("password"),
        username=redis_username(target), socket_connect_timeout=timeout, decode_responses=True,
    )


@dataclass
class Paused:
    """A primary paused by `pause_and_read`: its connection (kept for the unpause) and point."""

    client: aioredis.Redis
    replid: str
    offset: int


async def pause_and_read(primary: SnapshotTarget, ms: int) -> Paused:
    """`CLIENT PAUSE <ms> WRITE` and `INFO replication` in one round trip on one connection
    (kept open for `release`): the offset read is the held one (no write runs after the pause)."""
    client = _client(primary, 1.0)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.execute_command("CLIENT", "PAUSE", str(ms), "WRITE")
            pipe.info("replication")
            _, info = await pipe.execute()
        if info.get("role") != "master":
            raise SnapshotActionFailed(f"{primary.member} is not a primary (role {info.get('role')})")
        return Paused(client, str(info["master_replid"]), int(info["master_repl_offset"]))
    except BaseException:
        await client.aclose()
        raise


async def release(paused: Paused) -> None:
    """`CLIENT UNPAUSE` on the pausing connection, then close it."""
    try:
        await paused.client.execute_command("CLIENT", "UNPAUSE")
    finally:
        await paused.client.aclose()


async def unpause(primary: SnapshotTarget) -> None:
    client = _client(primary, 1.0)
    try:
        await client.execute_command("CLIENT", "UNPAUSE")
    finally:
        await client.aclose()


async def _caught_up(member: SnapshotTarget, replid: str, offset: int, deadline: float) -> None:
    client = _client(member, 1.0)
    try:
        while True:
            info = await client.info("replication")
            have = int(info.get("master_repl_offset", -1))
            if info.get("master_replid") == replid and have >= offset:
                return  # past it by the primary's PINGs at most: no write runs while paused
            if time.time() >= deadline:
                raise SnapshotActionFailed(f"{member.member} did not reach offset {offset} in the window (at {have})")
            await asyncio.sleep(CATCH_UP_POLL)  # a replica's offset has no change feed
    finally:
        await client.aclose()


def _command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


@dataclass
class OpenFork:
    """A transfer whose fork happened at (`replid`, `offset`); the RDB is still to be read."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    replid: str
    offset: int
    head: bytes  # what was read already (the +FULLRESYNC line)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def _line(reader: asyncio.StreamReader, what: str) -> str:
    line = (await reader.readline()).decode(errors="replace").strip()
    if not line:
        raise SnapshotActionFailed(f"{what}: connection closed")
    return line


async def open_fork(member: SnapshotTarget, replid: str, offset: int, deadline: float) -> OpenFork:
    """Fork `member` at (`replid`, `offset`) or after it while writes are held (waiting for a
    replica to get there first)."""
    if member.role != "primary":
        await _caught_up(member, replid, offset, deadline)
    reader, writer = await asyncio.open_connection(member.host, member.port)
    try:
        password, user = member.credentials.get("password"), redis_username(member)
        if password:
            writer.write(_command("AUTH", user, password) if user else _command("AUTH", password))
            await writer.drain()
            if not (await _line(reader, "AUTH")).startswith("+"):
                raise SnapshotActionFailed(f"AUTH refused by {member.member}")
        writer.write(_command("REPLCONF", "rdb-only", "1"))
        await writer.drain()
        await _line(reader, "REPLCONF rdb-only")  # an error (Redis < 7) is fine
        writer.write(_command("PSYNC", "?", "-1"))
        await writer.drain()
        while True:
            raw = await reader.readline()
            if not raw:
                raise SnapshotActionFailed(f"PSYNC: {member.member} closed the connection")
            line = raw.decode(errors="replace").strip()
            if line:
                break  # newlines before it are keep-alives
        parts = line.split()
        if len(parts) != 3 or parts[0] != "+FULLRESYNC":
            raise SnapshotActionFailed(f"PSYNC: {line}")
        fork = OpenFork(reader, writer, parts[1], int(parts[2]), raw)
        if fork.replid != replid or fork.offset < offset:
            raise SnapshotActionFailed(
                f"{member.member} forked at {fork.replid} {fork.offset}, before the held point {replid} {offset} "
                "(a save already running?)")
        return fork
    except BaseException:
        writer.close()
        raise
