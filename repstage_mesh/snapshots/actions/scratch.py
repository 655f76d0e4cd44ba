"""Scratch servers for restore drills: a fresh redis-server or PostgreSQL on a snapshot's files,
in a temp directory, stopped (its whole process group killed) and removed however the drill ends.

Redis loads the RDB from its own directory and listens on a Unix socket there only (no TCP
port to race for). PostgreSQL gets
the base backup and its WAL and starts on them as an operator's restore would (crash recovery
from `backup_label`, replaying all the WAL there is, to the snapshot's `end_lsn`), with no
`standby.signal`, `primary_conninfo` and `archive_mode` off (it never talks to the real
cluster), its own pg_hba (trust on its Unix socket only) and no TCP listener. PostgreSQL refuses to run as root: as root, it runs as
`run_as`, by default the `postgres` user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis.asyncio as aioredis
from psycopg import sql

from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed
from repstage_mesh.snapshots.actions.postgres_action import extract_tar, postgres_binary


@dataclass(frozen=True)
class ScratchOptions:
    run_as: str | None = None  # OS user for the scratch PostgreSQL; as root: `postgres` if unset
    pg_bindir: str | None = None
    pg_user: str = "postgres"  # the restored cluster's superuser
    redis_server: str | None = None  # path of redis-server; default: from PATH
    start_timeout: float = 120.0  # loading an RDB / replaying WAL to the point


def _free_port() -> int:
    """A port number for the scratch PostgreSQL's socket name (it listens on no TCP port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


async def _until_up(proc: subprocess.Popen[bytes], log: Path, probe: Any, timeout: float,
                    what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while True:
                if proc.poll() is not None:
                    tail = log.read_text(errors="replace")[-1500:]
                    raise SnapshotActionFailed(f"{what} exited during the restore:\n{tail}")
                with contextlib.suppress(Exception):
                    if await probe():
                        return
                await asyncio.sleep(0.05)  # polling a condition, bounded by the timeout
    except TimeoutError:
        raise SnapshotActionFailed(f"{what} did not come up within {timeout:g} s") from None


@contextlib.asynccontextmanager
async def scratch_redis(files: Path, options: ScratchOptions) -> AsyncIterator[aioredis.Redis]:
    binary = options.redis_server or shutil.which("redis-server") or "/usr/bin/redis-server"
    work = Path(tempfile.mkdtemp(prefix="repstage-verify-redis-"))
    proc = None
    try:
        shutil.copyfile(files / "dump.rdb", work / "dump.rdb")
        socket_path = work / "redis.sock"
        argv = [binary, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
                "--dir", str(work), "--dbfilename", "dump.rdb", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--logfile", ""]
        log = work / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        client = aioredis.Redis(unix_socket_path=str(socket_path), decode_responses=True)
        try:
            await _until_up(proc, log, client.ping, options.start_timeout, "the scratch redis")
            yield client
        finally:
            await client.aclose()
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def _chown_tree(root: Path, user: str) -> None:
    shutil.chown(root, user, user)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            shutil.chown(os.path.join(dirpath, name), user, user)


def scratch_user(options: ScratchOptions) -> str | None:
    """`run_as`; as root without it, the `postgres` user when there is one (PostgreSQL refuses
    to run as root)."""
    if options.run_as or os.geteuid() != 0:
        return options.run_as
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        raise SnapshotActionFailed(
            "PostgreSQL refuses to run as root and there is no 'postgres' user: give the "
            "restore drill a user to run it as (run_as)"
        ) from None


def _prepare_pgdata(files: Path, work: Path) -> tuple[Path, Path]:
    data = work / "data"
    data.mkdir(mode=0o700)
    extract_tar(files / "base.tar", data)
    if (files / "pg_wal.tar").exists():
        extract_tar(files / "pg_wal.tar", data / "pg_wal")
    for name in ("standby.signal", "postmaster.pid"):
        (data / name).unlink(missing_ok=True)
    hba = work / "pg_hba.conf"
    hba.write_text("local all all trust\n")
    data.chmod(0o700)
    return data, hba


def _postgres_argv(options: ScratchOptions, data: Path, hba: Path, work: Path) -> list[str]:
    settings = {
        "port": str(_free_port()), "listen_addresses": "", "unix_socket_directories": str(work),
        "hba_file": str(hba), "primary_conninfo": "", "archive_mode": "off",
        "hot_standby": "on",
        "logging_collector": "off", "log_destination": "stderr",
    }
    argv = [postgres_binary("postgres", options.pg_bindir), "-D", str(data)]
    for name, value in settings.items():
        argv += ["-c", f"{name}={value}"]
    return argv


@contextlib.asynccontextmanager
async def scratch_postgres(files: Path, options: ScratchOptions) -> AsyncIterator[str]:
    """A conninfo for a fresh PostgreSQL restored from the base backup in `files`."""
    run_as = scratch_user(options)
    user: dict[str, Any] = (
        {"user": run_as, "group": run_as, "extra_groups": []} if run_as else {}
    )
    work = Path(tempfile.mkdtemp(prefix="repstage-verify-pg-"))
    proc = None
    try:
        data, hba = await asyncio.to_thread(_prepare_pgdata, files, work)
        if run_as:
            await asyncio.to_thread(_chown_tree, work, run_as)
        argv = _postgres_argv(options, data, hba, work)
        port = argv[argv.index("-c") + 1].split("=", 1)[1]
        conninfo = psycopg.conninfo.make_conninfo(
            host=str(work), port=port, user=options.pg_user, dbname="postgres", connect_timeout=5
        )
        log = work / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=work,
                                    **user)

        async def promoted() -> bool:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
                return row is not None and row[0] is False

        await _until_up(proc, log, promoted, options.start_timeout, "the scratch PostgreSQL")
        yield conninfo
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


async def redis_values(client: aioredis.Redis, keys: Iterable[str]) -> dict[str, str | None]:
    wanted = sorted(set(keys))
    out: dict[str, str | None] = {}
    for start in range(0, len(wanted), 500):
        batch = wanted[start : start + 500]
        found = await client.mget(batch)
        out.update({k: None if v is None else str(v) for k, v in zip(batch, found, strict=True)})
    return out


async def postgres_values(conninfo: str, table: str, keys: Iterable[str]) -> dict[str, str | None]:
    ident = sql.Identifier(*table.split(".", 1))
    query = sql.SQL("SELECT key, value FROM {} WHERE key = ANY(%s)").format(ident)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        try:
            rows = await (await conn.execute(query, (sorted(set(keys)),))).fetchall()
        except psycopg.errors.UndefinedTable:
            rows = []  # the snapshot's point is before the table was created: no rows
    return {str(k): (None if v is None else str(v)) for k, v in rows}
