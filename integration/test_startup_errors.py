"""`repstage-mesh serve` that cannot start says why in one line naming the field or the file,
exits 2 and prints no traceback (`--debug` keeps it) (issue 15, item 4). Each case runs the
real command as a subprocess."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.harness import REPSTAGE, ControlPlaneNode, free_low_port, workdir

EXIT_REFUSED = 2


@pytest.fixture
def tmp() -> Iterator[Path]:
    with workdir() as path:
        yield path


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other program listens on for the whole test."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", free_low_port()))
        sock.listen()
        yield int(sock.getsockname()[1])


def config(tmp: Path, name: str = "cp-1", **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "node": {"id": name, "data_dir": str(tmp / name)},
        "xds": {"listen": f"127.0.0.1:{free_low_port()}"},
        "api": {"listen": f"127.0.0.1:{free_low_port()}"},
    }
    data.update(sections)
    return data


def serve(path: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run serve to its end (it must refuse to start: a timeout fails the test)."""
    return subprocess.run([REPSTAGE, "serve", "--config", str(path), *extra],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def refused(data: dict[str, Any] | None, tmp: Path, *extra: str, path: Path | None = None) -> str:
    if path is None:
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(data))
    done = serve(path, *extra)
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_REFUSED, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    lines = output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], output
    return lines[0]


def test_the_same_data_dir_for_two_nodes(tmp: Path) -> None:
    first = ControlPlaneNode(tmp, config(tmp, "cp-1"))
    try:
        first.start()
        second = config(tmp, "cp-2")
        second["node"]["data_dir"] = first.config["node"]["data_dir"]
        line = refused(second, tmp)
        assert "node.data_dir: " in line and "in use by another running node" in line
        # --debug keeps the traceback
        done = serve(tmp / "config.yaml", "--debug")
        assert done.returncode == EXIT_REFUSED and "Traceback" in done.stderr, done.stderr
    finally:
        first.stop()


def test_the_xds_port_taken(tmp: Path, held_port: int) -> None:
    line = refused(config(tmp, xds={"listen": f"127.0.0.1:{held_port}"}), tmp)
    assert f"xds.listen: cannot listen on 127.0.0.1:{held_port}: the port is already in use" in line


def test_the_api_port_taken(tmp: Path, held_port: int) -> None:
    line = refused(config(tmp, api={"listen": f"127.0.0.1:{held_port}"}), tmp)
    assert f"api.listen: cannot listen on 127.0.0.1:{held_port}" in line


def test_the_raft_port_taken(tmp: Path, held_port: int) -> None:
    raft = {"bind": f"127.0.0.1:{held_port}", "peers": [f"127.0.0.1:{free_low_port()}"], "password": "integration-raft-password"}
    line = refused(config(tmp, raft=raft), tmp)
    assert f"raft.bind: cannot listen on 127.0.0.1:{held_port}" in line


def test_an_unreadable_config_file(tmp: Path) -> None:
    line = refused(None, tmp, path=tmp)  # a directory
    assert "cannot read" in line and "Is a directory" in line
    binary = tmp / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    assert "not UTF-8" in refused(None, tmp, path=binary)
    assert "file not found" in refused(None, tmp, path=tmp / "missing.yaml")


def test_an_invalid_config_prints_one_line_per_problem(tmp: Path) -> None:
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(config(tmp, envoy={"fence_port": "x"})))
    line = refused(None, tmp, path=path)
    assert "envoy.fence_port: " in line
