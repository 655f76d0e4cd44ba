"""A real Patroni 4 cluster for the integration tests and the Patroni bench: one etcd (Debian
`etcd-server`, v3 API) and three Patroni nodes, each running a PostgreSQL 15, on loopback.

    with patroni_cluster(tmp, on_role_change=[...]) as cluster:
        leader = cluster.wait_leader()             # "pg0" / "pg1" / "pg2"
        cluster.kill_postgres(leader)              # SIGKILL the postmaster and its backends
        cluster.wait_leader(other_than=leader)

Each member is one "host": its own loopback address (127.0.0.1, .2, .3) with the same
PostgreSQL port and the same Patroni REST port on each, as on three machines; RepStage probes
Patroni's REST API with `probe.port`. Patroni runs as the `postgres` user (PostgreSQL refuses
root) from a virtualenv on Debian's python3 that `scripts/system-deps.sh` creates (the
project's own venv may live where `postgres` cannot read, here pyenv under /root): the
checkout's `.venv-patroni` with this checkout installed editable, or, when `postgres` cannot read
the checkout, /var/lib/postgresql/repstage-patroni-venv with a copy refreshed by every
system-deps run; so a callback runs the code under test.

Settings (see PATRONI_DCS): ttl 20 s (Patroni's minimum), loop_wait 1 s, retry_timeout 5 s,
primary_start_timeout 0 (a crashed primary is failed over at once rather than restarted in
place), use_pg_rewind with wal_log_hints, asynchronous replication. Everything started here is
stopped when the block ends (SIGKILL of every process we started and their descendants), and
the temp directory removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .databases import _as_postgres, _descendants, postgres_bindir, wait_until

ROOT = Path(__file__).resolve().parent.parent
# Where scripts/system-deps.sh puts it: in the checkout when `postgres` can read the checkout,
# else under postgres's home.
_VENVS = [ROOT / ".venv-patroni", Path("/var/lib/postgresql/repstage-patroni-venv")]
PATRONI_VENV = Path(
    os.environ.get("REPSTAGE_PATRONI_VENV")
    or next((v for v in _VENVS if (v / "bin" / "patroni").exists()), _VENVS[0])
)
SCOPE = "pg-cluster"
NAMES = ("pg0", "pg1", "pg2")

PATRONI_DCS: dict[str, Any] = {
    "ttl": 20,
    "loop_wait": 1,
    "retry_timeout": 5,
    "maximum_lag_on_failover": 16 * 1024 * 1024,
    "primary_start_timeout": 0,
    "postgresql": {
        "use_pg_rewind": True,
        "use_slots": True,
        "parameters": {
            "wal_level": "replica",
            "hot_standby": "on",
            "wal_log_hints": "on",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "fsync": "off",
            "full_page_writes": "on",
            "synchronous_commit": "off",
            "shared_buffers": "16MB",
            "wal_receiver_status_interval": "1s",
            "wal_retrieve_retry_interval": "100ms",
        },
    },
}


def etcd_binary() -> str | None:
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)


def patroni_binary() -> str | None:
    path = PATRONI_VENV / "bin" / "patroni"
    return str(path) if os.access(path, os.X_OK) else None


def missing() -> str | None:
    """Why a Patroni cluster cannot be started here, or None."""
    if postgres_bindir() is None:
        return "PostgreSQL server binaries are not installed (scripts/system-deps.sh)"
    if etcd_binary() is None:
        return "etcd is not installed (Debian etcd-server; scripts/system-deps.sh)"
    if patroni_binary() is None:
        return f"no Patroni in {PATRONI_VENV} (scripts/system-deps.sh creates it)"
    return None


def host_of(name: str) -> str:
    return f"127.0.0.{NAMES.index(name) + 1}"


def _free_on_all(hosts: list[str]) -> int:
    """A port free on every one of `hosts` (each member binds it on its own address)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        try:
            with contextlib.ExitStack() as stack:
                for h in hosts[1:]:
                    sock = stack.enter_context(socket.socket())
                    sock.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every member address")


@dataclass
class PatroniCluster:
    directory: Path
    pg_port: int
    rest_port: int
    etcd_port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # --- addresses ------------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """RepStage members: each node's PostgreSQL address and port."""
        return [{"name": n, "address": host_of(n), "port": self.pg_port} for n in NAMES]

    def dsn(self, name: str, timeout: int = 2) -> str:
        return (f"host={host_of(name)} port={self.pg_port} user=postgres password=postgres "
                f"dbname=postgres connect_timeout={timeout}")  # fmt: skip

    def rest(self, name: str, path: str, timeout: float = 1.0) -> tuple[int, Any]:
        url = f"http://{host_of(name)}:{self.rest_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body else None

    # --- roles ----------------------------------------------------------------------------------

    def leader(self) -> str | None:
        """The member whose Patroni answers 200 on /primary (leader lock + running primary)."""
        for name in NAMES:
            with contextlib.suppress(OSError, ValueError):
                if self.rest(name, "/primary", 0.5)[0] == 200:
                    return name
        return None

    def wait_leader(self, other_than: str | None = None, timeout: float = 60) -> str:
        def found() -> str | None:
            leader = self.leader()
            return leader if leader is not None and leader != other_than else None

        return str(wait_until(found, timeout, f"a Patroni leader other than {other_than}", 0.02))

    def healthy(self) -> str | None:
        """The leader when /cluster (asked of every member) shows one running leader and the
        two others streaming on its timeline; else None."""
        for name in NAMES:
            with contextlib.suppress(OSError, ValueError):
                status, body = self.rest(name, "/cluster", 0.5)
                if status != 200:
                    continue
                members = {m["name"]: m for m in body.get("members", [])}
                leaders = [n for n, m in members.items() if m.get("role") == "leader" and m.get("state") == "running"]
                if len(leaders) != 1 or len(members) != len(NAMES):
                    return None
                timeline = members[leaders[0]].get("timeline")
                streaming = [n for n, m in members.items()
                             if m.get("role") == "replica" and m.get("state") == "streaming"
                             and m.get("timeline") == timeline]  # fmt: skip
                return leaders[0] if len(streaming) == len(NAMES) - 1 else None
        return None

    def wait_healthy(self, timeout: float = 90) -> str:
        """Wait for a running leader and two replicas streaming from it; return the leader."""
        return str(wait_until(self.healthy, timeout, "a Patroni leader and two streaming replicas", 0.1))

    # --- faults ---------------------------------------------------------------------------------

    def postmaster_pid(self, name: str) -> int:
        pidfile = self.directory / name / "data" / "postmaster.pid"
        return int(pidfile.read_text().split()[0])

    def kill_postgres(self, name: str) -> float:
        """SIGKILL the member's postmaster and every backend (Patroni keeps running)."""
        pid = self.postmaster_pid(name)
        pids = [pid, *_descendants(pid)]
        killed = time.monotonic()
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        return killed

    # --- life cycle -----------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], as_postgres: bool) -> None:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        kwargs: dict[str, Any] = _as_postgres() if as_postgres else {}
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, start_new_session=True, **kwargs
        )
        log.close()

    def start_etcd(self) -> None:
        etcd = etcd_binary()
        assert etcd is not None
        peer = _free_on_all(["127.0.0.1"])
        client = f"http://127.0.0.1:{self.etcd_port}"
        argv = [etcd, "--name", "e0", "--data-dir", str(self.directory / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"e0=http://127.0.0.1:{peer}",
                "--log-level", "warn"]  # fmt: skip
        self._spawn("etcd", argv, as_postgres=False)

        def healthy() -> bool:
            with urllib.request.urlopen(f"{client}/health", timeout=0.5) as r:
                return bool(json.loads(r.read()).get("health") == "true")

        wait_until(healthy, 20, "etcd healthy", 0.05)

    def config(self, name: str, on_role_change: list[str] | None) -> dict[str, Any]:
        host = host_of(name)
        bindir = postgres_bindir()
        cfg: dict[str, Any] = {
            "scope": SCOPE,
            "name": name,
            "restapi": {"listen": f"{host}:{self.rest_port}", "connect_address": f"{host}:{self.rest_port}"},
            "etcd3": {"hosts": f"127.0.0.1:{self.etcd_port}"},
            "bootstrap": {
                "dcs": PATRONI_DCS,
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}],
                "pg_hba": ["host replication replicator 127.0.0.0/8 trust",
                           "host all all 127.0.0.0/8 trust"],
            },
            "postgresql": {
                "listen": f"{host}:{self.pg_port}",
                "connect_address": f"{host}:{self.pg_port}",
                "data_dir": str(self.directory / name / "data"),
                "bin_dir": bindir,
                "pgpass": str(self.directory / name / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "replicator", "password": "replicator"},
                    "rewind": {"username": "postgres", "password": "postgres"},
                },
                "parameters": {"unix_socket_directories": str(self.directory / name)},
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
        }
        if on_role_change is not None:
            cfg["postgresql"]["callbacks"] = {"on_role_change": " ".join(on_role_change)}
        return cfg

    def start_node(self, name: str, on_role_change: list[str] | None) -> None:
        node_dir = self.directory / name
        node_dir.mkdir(exist_ok=True)
        path = node_dir / "patroni.yml"
        path.write_text(yaml.safe_dump(self.config(name, on_role_change)))
        if os.geteuid() == 0:
            for p in (node_dir, path):
                shutil.chown(p, "postgres", "postgres")
        patroni = patroni_binary()
        assert patroni is not None
        self._spawn(name, [patroni, str(path)], as_postgres=True)

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            pids = [proc.pid, *_descendants(proc.pid)]
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            del name
        # postgres may have been started by a Patroni that was killed first: sweep the data dirs
        for name in NAMES:
            with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                pid = self.postmaster_pid(name)
                for p in [pid, *_descendants(pid)]:
                    os.kill(p, signal.SIGKILL)

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.directory / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def patroni_cluster(on_role_change: list[str] | None = None, timeout: float = 120) -> Iterator[PatroniCluster]:
    """etcd + 3 Patroni nodes, a leader and two streaming replicas when the block starts.
    `on_role_change`: the callback command (Patroni appends ACTION ROLE SCOPE); `{name}` in it
    is replaced by each member's name."""
    why = missing()
    assert why is None, why
    directory = Path(tempfile.mkdtemp(prefix="repstage-patroni-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    hosts = [host_of(n) for n in NAMES]
    cluster = PatroniCluster(directory, _free_on_all(hosts), _free_on_all(hosts), _free_on_all(["127.0.0.1"]))
    try:
        cluster.start_etcd()
        for name in NAMES:
            cmd = [part.replace("{name}", name) for part in on_role_change] if on_role_change else None
            cluster.start_node(name, cmd)
        try:
            cluster.wait_healthy(timeout=timeout)
        except AssertionError as exc:
            tails = "\n".join(f"--- {n}\n{cluster.log_tail(n)}" for n in ("etcd", *NAMES))
            raise AssertionError(f"{exc}\n{tails}") from None
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
