"""render() against a real Envoy, per primary strategy: switchover, open connections, fail closed.

No xDS server is needed: Envoy reads the rendered resources from files (CDS, LDS, EDS and RDS
each from a `path_config_source` with a watched directory), and publishing a new state is an
atomic rename of those files. The resources are exactly what render() produced, except that
every "over ADS" config source is pointed at the matching file.

What is asserted per strategy:
- all: new connections reach the new primary; with no primary, connections are refused.
- health_fence: the open connection to the demoted primary is closed (within a few fence
  intervals), without any drain time.
- epoch_cluster: the same, once the old filter chain drains (Envoy runs with --drain-time-s 1).
- eds_only: how long the old connection survives is printed, not asserted (Envoy keeps open
  tcp_proxy connections when a host leaves the assignment, FACTS).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import betterproto2
import pytest
import yaml
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    ConfigSource,
    PathConfigSource,
    WatchedDirectory,
)
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)

from repstage_mesh.core.models import Member, MeshState, ServiceProtocol, ServiceSpec, ServiceState
from repstage_mesh.filters import (
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    HTTP_CONNECTION_MANAGER,
    LISTENER,
    ROUTE_CONFIGURATION,
    build_bootstrap,
    pack,
    to_envoy_dict,
)
from repstage_mesh.render.envoy import Resources, render
from repstage_mesh.render.options import PrimaryStrategy, RenderOptions

from .harness import free_low_port, free_port

ENVOY = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "envoy"
pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason="envoy binary not installed")

FILES = {
    CLUSTER: "cds",
    CLUSTER_LOAD_ASSIGNMENT: "eds",
    LISTENER: "lds",
    ROUTE_CONFIGURATION: "rds",
}


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Backend:
    """A TCP server that greets each connection with its name and holds it open."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            conn.sendall(f"{self.name}\n".encode())

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


class FileXds:
    """Feeds rendered resources to Envoy through watched files instead of ADS.

    CDS and LDS read one file each; EDS and RDS subscriptions take exactly one resource, so
    each ClusterLoadAssignment and RouteConfiguration gets its own file.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, type_url: str, name: str = "all") -> Path:
        d = self.root / FILES[type_url] / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def source(self, type_url: str, name: str = "all") -> ConfigSource:
        d = self._dir(type_url, name)
        return ConfigSource(
            path_config_source=PathConfigSource(
                path=str(d / "resources.json"), watched_directory=WatchedDirectory(path=str(d))
            ),
            resource_api_version=ApiVersion.V3,
        )

    def _from_files(self, message: betterproto2.Message) -> betterproto2.Message:
        if isinstance(message, Cluster) and message.eds_cluster_config is not None:
            message = Cluster.parse(bytes(message))
            assert message.eds_cluster_config is not None
            message.eds_cluster_config.eds_config = self.source(
                CLUSTER_LOAD_ASSIGNMENT, message.name
            )
        elif isinstance(message, Listener):
            message = Listener.parse(bytes(message))
            for f in message.filter_chains[0].filters:
                if f.name == HTTP_CONNECTION_MANAGER and f.typed_config is not None:
                    manager = HttpConnectionManager.parse(f.typed_config.value)
                    if manager.rds is not None:
                        name = manager.rds.route_config_name
                        manager.rds.config_source = self.source(ROUTE_CONFIGURATION, name)
                        f.typed_config = pack(manager)
        return message

    @staticmethod
    def _write(d: Path, resources: list[betterproto2.Message]) -> None:
        tmp = d / ".resources.json.tmp"
        tmp.write_text(json.dumps({"resources": [to_envoy_dict(pack(r)) for r in resources]}))
        os.rename(tmp, d / "resources.json")

    def publish(self, resources: Resources) -> None:
        """Endpoints and routes first: a new cluster or listener finds its file already there
        (a file created after Envoy started watching for it could be missed by this harness).
        """
        for name, assignment in resources[CLUSTER_LOAD_ASSIGNMENT].items():
            self._write(self._dir(CLUSTER_LOAD_ASSIGNMENT, name), [assignment])
        for name, routes in resources[ROUTE_CONFIGURATION].items():
            self._write(self._dir(ROUTE_CONFIGURATION, name), [routes])
        self._write(self._dir(CLUSTER), [self._from_files(c) for c in resources[CLUSTER].values()])
        self._write(
            self._dir(LISTENER), [self._from_files(m) for m in resources[LISTENER].values()]
        )

    def bootstrap(self, admin_port: int) -> dict[str, Any]:
        config = build_bootstrap("render-test", [("127.0.0.1", 1)], admin_port)
        config["static_resources"] = {}
        config["dynamic_resources"] = {
            "cds_config": to_envoy_dict(self.source(CLUSTER)),
            "lds_config": to_envoy_dict(self.source(LISTENER)),
        }
        return config


def stop_envoy(envoy: subprocess.Popen[bytes]) -> None:
    envoy.terminate()
    try:
        envoy.wait(10)
    except subprocess.TimeoutExpired:
        envoy.kill()
        envoy.wait()


def greeting(port: int) -> tuple[socket.socket, str] | None:
    """Connect through Envoy; the backend's name, or None when Envoy refuses or closes at once."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return None
    try:
        data = sock.recv(16)
    except OSError:
        data = b""
    if not data:
        sock.close()
        return None
    return sock, data.decode().strip()


def greeted_by(port: int, name: str) -> tuple[socket.socket, str] | None:
    got = greeting(port)
    if got is not None and got[1] != name:
        got[0].close()
        return None
    return got


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(16) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    started = {name: Backend(name) for name in ("a", "b", "c")}
    try:
        yield started
    finally:
        for b in started.values():
            b.close()


@pytest.mark.parametrize("strategy", list(PrimaryStrategy))
def test_switchover_through_real_envoy(
    tmp_path: Path, backends: dict[str, Backend], strategy: PrimaryStrategy
) -> None:
    listen_port, fence_port, admin_port = free_low_port(), free_low_port(2), free_port()
    spec = ServiceSpec(
        name="cache",
        protocol=ServiceProtocol.REDIS,
        listen_port=listen_port,
        members=tuple(
            Member(name=n, address="127.0.0.1", port=b.port) for n, b in backends.items()
        ),
    )
    options = RenderOptions(
        primary_strategy=strategy,
        bind_address="127.0.0.1",
        fence_port=fence_port,
        fence_interval=timedelta(milliseconds=200),
    )

    def rendered(primary: str | None, epoch: int) -> Resources:
        svc = ServiceState(spec=spec, primary=primary, epoch=epoch)
        return render(MeshState(services={"cache": svc}), options)

    xds = FileXds(tmp_path)
    xds.publish(rendered("a", 5))
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(xds.bootstrap(admin_port)))
    log_path = tmp_path / "envoy.log"
    with log_path.open("w") as log:
        envoy = subprocess.Popen(
            [
                str(ENVOY), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                "--drain-time-s", "1", "--log-level", "info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        old_conn, _ = wait_for(lambda: greeted_by(listen_port, "a"), 15, "a connection to a")
        for _ in range(5):  # the replicas get nothing
            conn, name = wait_for(lambda: greeting(listen_port), 5, "a connection")
            assert name == "a"
            conn.close()

        switched = time.monotonic()
        xds.publish(rendered("b", 6))
        conn, _ = wait_for(lambda: greeted_by(listen_port, "b"), 5, "new connections to reach b")
        conn.close()
        reached_new = time.monotonic() - switched
        try:
            wait_for(lambda: closed_by_peer(old_conn), 5, "Envoy to close the old connection")
            closed_after: float | None = time.monotonic() - switched
        except AssertionError:
            closed_after = None
        print(
            f"\n{strategy.value}: new primary reached after {reached_new:.2f}s; old connection "
            + (
                f"closed after {closed_after:.2f}s"
                if closed_after is not None
                else "still open after 5s"
            )
        )
        if strategy is not PrimaryStrategy.EDS_ONLY:
            assert closed_after is not None, "the open connection to the demoted primary survived"
        old_conn.close()

        xds.publish(rendered(None, 7))  # no primary: fail closed
        wait_for(lambda: greeting(listen_port) is None, 5, "connections to be refused")
        for _ in range(3):
            assert greeting(listen_port) is None
    finally:
        stop_envoy(envoy)


class HttpBackend:
    """An HTTP server answering every GET with its name."""

    def __init__(self, name: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def http_get(port: int) -> tuple[int, str] | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return None


@pytest.mark.parametrize("strategy", list(PrimaryStrategy))
def test_http_service_through_real_envoy(tmp_path: Path, strategy: PrimaryStrategy) -> None:
    servers = {name: HttpBackend(name) for name in ("a", "b")}
    listen_port, read_port = free_port(), free_port()
    spec = ServiceSpec(
        name="web",
        protocol=ServiceProtocol.HTTP,
        listen_port=listen_port,
        read_port=read_port,
        members=tuple(Member(name=n, address="127.0.0.1", port=s.port) for n, s in servers.items()),
    )
    options = RenderOptions(
        primary_strategy=strategy,
        bind_address="127.0.0.1",
        fence_port=free_low_port(2),
        fence_interval=timedelta(milliseconds=200),
    )

    def rendered(primary: str | None, epoch: int) -> Resources:
        svc = ServiceState(spec=spec, primary=primary, epoch=epoch)
        return render(MeshState(services={"web": svc}), options)

    xds = FileXds(tmp_path)
    xds.publish(rendered("a", 5))
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(xds.bootstrap(free_port())))
    with (tmp_path / "envoy.log").open("w") as log:
        envoy = subprocess.Popen(
            [str(ENVOY), "-c", str(path), "--disable-hot-restart", "--concurrency", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: http_get(listen_port) == (200, "a"), 15, "GET / to reach a")
        assert {http_get(read_port) for _ in range(6)} == {(200, "a"), (200, "b")}
        xds.publish(rendered("b", 6))
        wait_for(lambda: http_get(listen_port) == (200, "b"), 5, "GET / to reach b")
        xds.publish(rendered(None, 7))
        # (With epoch_cluster a route may briefly name a cluster still warming: a bare 503.)
        wait_for(
            lambda: http_get(listen_port) == (503, "no healthy upstream"), 5, "503 with no primary"
        )
    finally:
        stop_envoy(envoy)
        for s in servers.values():
            s.close()
