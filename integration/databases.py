"""Real databases for the integration tests: Redis 7 and PostgreSQL 15 from Debian, on loopback.

    with redis_group(replicas=2) as redis:      # primary "r0", replicas "r1", "r2", in sync
        redis.kill("r0")                         # SIGKILL the server and all its children
        redis.stop("r1"); redis.cont("r1")       # SIGSTOP / SIGCONT
        redis.command("r1", "REPLICAOF", "NO", "ONE")

    with postgres_pair() as pg:                  # primary "pg0", streaming standby "pg1"
        pg.query("pg0", "SELECT 1")

Everything started here is stopped when the `with` block ends, however it ends (SIGKILL, then
the temp directory is removed). kill/stop/cont signal the server and all its descendants, read
from /proc (PostgreSQL backends call setsid(), so a process group would miss them): a killed
member looks like a dead host. Ports are picked free (bind port 0); waits poll a condition with a
deadline. PostgreSQL refuses to run as root: initdb, postgres and pg_basebackup run as the
`postgres` user (Popen user=) in a temp directory that user owns. The pytest fixtures
`redis_group_fixture` and `postgres_pair_fixture` wrap the same context managers.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the condition's own failures mean "not yet"
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})"
            )
        time.sleep(interval)


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


def postgres_bindir() -> str | None:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    preferred = [d for d in dirs if "/15/" in d] or dirs
    for d in reversed(preferred):
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    return None


def _descendants(root: int) -> list[int]:
    """Every live descendant of `root`, deepest last (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    queue = list(children.get(root, []))
    while queue:
        pid = queue.pop(0)
        out.append(pid)
        queue.extend(children.get(pid, []))
    return out


@dataclass
class Server:
    """One database server process."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    stopped: bool = False
    killed: bool = False

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def signal(self, sig: int) -> None:
        """Signal the server and every descendant (PostgreSQL backends call setsid(), so the
        process group alone would miss them). All pids are read before any is signalled, so none is orphaned unseen."""
        for pid in [*_descendants(self.process.pid), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class _Group:
    directory: Path
    servers: dict[str, Server] = field(default_factory=dict)

    def port(self, name: str) -> int:
        return self.servers[name].port

    def address(self, name: str) -> str:
        return self.servers[name].address

    @property
    def names(self) -> list[str]:
        return list(self.servers)

    def kill(self, name: str) -> None:
        """SIGKILL the member: the server and all its children (a dead host)."""
        server = self.servers[name]
        server.signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        server.killed = True

    def stop(self, name: str) -> None:
        """SIGSTOP: the member stays connected and silent (a hung or partitioned host)."""
        self.servers[name].signal(signal.SIGSTOP)
        self.servers[name].stopped = True

    def cont(self, name: str) -> None:
        self.servers[name].signal(signal.SIGCONT)
        self.servers[name].stopped = False

    def _stop_all(self) -> None:
        for server in self.servers.values():
            server.signal(signal.SIGCONT)
            server.signal(signal.SIGKILL)
        for server in self.servers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.process.wait(timeout=10)


# --- Redis ------------------------------------------------------------------------------------


class RedisGroup(_Group):
    """A Redis primary (`r0`) and replicas (`r1`...). `client(name)` is a redis-py client."""

    def client(self, name: str, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=self.port(name),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )

    def command(self, name: str, *args: Any) -> Any:
        with self.client(name) as c:
            return c.execute_command(*args)

    def role(self, name: str) -> list[Any]:
        return list(self.command(name, "ROLE"))

    def start(self, name: str, replicaof: str | None = None, port: int | None = None) -> Server:
        """Start (or restart after kill) member `name`, optionally as a replica of `replicaof`."""
        binary = redis_server_binary()
        assert binary, "redis-server not found: run scripts/system-deps.sh"
        old = self.servers.get(name)
        port = port or (old.port if old else free_port())
        workdir = self.directory / name
        workdir.mkdir(exist_ok=True)
        argv = [
            binary,
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(workdir),
            "--protected-mode",
            "no",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            "--logfile",
            "",
        ]
        if replicaof is not None:
            argv += ["--replicaof", HOST, str(self.port(replicaof))]
        log = workdir / "redis.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = Server(name, port, process, log)
        self.servers[name] = server
        wait_until(
            lambda: process.poll() is None and self.command(name, "PING") in (True, "PONG"),
            10,
            f"redis {name} to answer PING\n{server.log_tail()}",
        )
        return server

    def wait_in_sync(self, primary: str, replicas: list[str], timeout: float = 15) -> None:
        """Until every replica's link is up and its offset equals the primary's."""

        def synced() -> bool:
            role = self.role(primary)
            if role[0] != "master":
                return False
            offset = int(role[1])
            for name in replicas:
                r = self.role(name)
                if (
                    r[0] != "slave"
                    or r[3] != "connected"
                    or int(r[4]) != offset
                    or int(r[2]) != self.port(primary)
                ):
                    return False
            return True

        wait_until(synced, timeout, f"replicas {replicas} in sync with {primary}")


@contextlib.contextmanager
def redis_group(replicas: int = 2) -> Iterator[RedisGroup]:
    group = RedisGroup(Path(tempfile.mkdtemp(prefix="repstage-redis-")))
    try:
        group.start("r0")
        names = [f"r{i}" for i in range(1, replicas + 1)]
        for name in names:
            group.start(name, replicaof="r0")
        group.wait_in_sync("r0", names)
        yield group
    finally:
        group._stop_all()
        shutil.rmtree(group.directory, ignore_errors=True)


# --- PostgreSQL -------------------------------------------------------------------------------


def _as_postgres() -> dict[str, Any]:
    """Popen arguments that run the child as `postgres` when we are root. (Not runuser: it
    forks, so the server would not be our child.)"""
    if os.geteuid() != 0:
        return {}
    return {
        "user": "postgres",
        "group": "postgres",
        "extra_groups": [],
        "env": {**os.environ, "HOME": str(Path("~postgres").expanduser())},
    }


class PostgresPair(_Group):
    """A PostgreSQL primary (`pg0`) and a streaming standby (`pg1`). Trust auth on 127.0.0.1."""

    bindir: str = ""

    def dsn(self, name: str) -> str:
        return f"host={HOST} port={self.port(name)} user=postgres dbname=postgres connect_timeout=2"

    def query(self, name: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn(name), autocommit=True) as conn:
            cursor = conn.execute(sql.encode(), params)
            return cursor.fetchall() if cursor.description else []

    def _run(self, argv: list[str], timeout: float = 60) -> None:
        result = subprocess.run(
            argv, capture_output=True, **_as_postgres(), timeout=timeout, cwd=self.directory
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
            )

    def start(self, name: str, port: int | None = None) -> Server:
        old = self.servers.get(name)
        port = port or (old.port if old else free_port())
        datadir = self.directory / name
        log = self.directory / f"{name}.log"
        argv = [
            os.path.join(self.bindir, "postgres"),
            "-D",
            str(datadir),
            "-p",
            str(port),
            "-c",
            f"unix_socket_directories={self.directory}",
            "-c",
            f"listen_addresses={HOST}",
        ]
        out = open(log, "ab")  # noqa: SIM115 - the child keeps it
        try:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.directory,
                **_as_postgres(),
            )
        finally:
            out.close()
        server = Server(name, port, process, log)
        self.servers[name] = server
        wait_until(
            lambda: process.poll() is None and self.query(name, "SELECT 1") == [(1,)],
            30,
            f"postgres {name} to accept connections\n{server.log_tail()}",
        )
        return server

    def wait_streaming(self, primary: str, standby: str, timeout: float = 30) -> None:
        def streaming() -> bool:
            rows = self.query(primary, "SELECT state FROM pg_stat_replication")
            in_recovery = self.query(standby, "SELECT pg_is_in_recovery()")[0][0]
            return bool(rows) and rows[0][0] == "streaming" and in_recovery is True

        wait_until(streaming, timeout, f"{standby} streaming from {primary}")

    def _stop_all(self) -> None:
        super()._stop_all()
        # SIGKILL leaves the postmaster's small SysV segment behind: remove it.
        for server in self.servers.values():
            pidfile = self.directory / server.name / "postmaster.pid"
            with contextlib.suppress(OSError, IndexError, ValueError):
                lines = pidfile.read_text().splitlines()
                shmid = lines[6].split()[1]
                subprocess.run(["ipcrm", "-m", shmid], capture_output=True, timeout=5)


@contextlib.contextmanager
def postgres_pair(full_page_writes: bool = False) -> Iterator[PostgresPair]:
    """`full_page_writes`: on for a pair a backup is taken from the standby (PostgreSQL refuses
    a standby backup whose WAL was written without full-page images)."""
    bindir = postgres_bindir()
    assert bindir, "PostgreSQL server binaries not found: run scripts/system-deps.sh"
    directory = Path(tempfile.mkdtemp(prefix="repstage-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    pair = PostgresPair(directory)
    pair.bindir = bindir
    try:
        primary = directory / "pg0"
        pair._run(
            [
                os.path.join(bindir, "initdb"),
                "-D",
                str(primary),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        )
        conf = "\n".join(
            [
                "wal_level = replica",
                "max_wal_senders = 5",
                "hot_standby = on",
                "fsync = off",
                "synchronous_commit = off",
                f"full_page_writes = {'on' if full_page_writes else 'off'}",
                "shared_buffers = 16MB",
                "wal_receiver_status_interval = 1s",
                "wal_retrieve_retry_interval = 100ms",
                "",
            ]
        )
        _append_as_postgres(primary / "postgresql.conf", conf)
        _append_as_postgres(
            primary / "pg_hba.conf",
            f"host replication all {HOST}/32 trust\nhost all all {HOST}/32 trust\n",
        )
        pair.start("pg0")
        standby = directory / "pg1"
        pair._run(
            [
                os.path.join(bindir, "pg_basebackup"),
                "-h",
                HOST,
                "-p",
                str(pair.port("pg0")),
                "-U",
                "postgres",
                "-D",
                str(standby),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ]
        )
        pair.start("pg1")
        pair.wait_streaming("pg0", "pg1")
        yield pair
    finally:
        pair._stop_all()
        shutil.rmtree(directory, ignore_errors=True)


def _append_as_postgres(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


# --- pytest fixtures --------------------------------------------------------------------------


@pytest.fixture
def redis_group_fixture() -> Iterator[RedisGroup]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (scripts/system-deps.sh)")
    with redis_group(replicas=2) as group:
        yield group


@pytest.fixture
def postgres_pair_fixture() -> Iterator[PostgresPair]:
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL server binaries are not installed (scripts/system-deps.sh)")
    with postgres_pair() as pair:
        yield pair
