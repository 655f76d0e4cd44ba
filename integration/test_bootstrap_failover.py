"""The bootstrap moves a real Envoy to another control-plane node when its node dies or hangs.

Three stub ADS servers (integration/ads_stub_proc.py, separate processes) stand in for the
control plane; Envoy gets `build_bootstrap` listing all three. The stubs never answer, which is
enough: Envoy's ADS stream opening on a server is what is observed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from repstage_mesh.filters import XDS_SERVER_GRPC_OPTIONS, build_bootstrap

HERE = Path(__file__).resolve().parent
ENVOY = HERE.parent / ".venv" / "bin" / "envoy"
# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = [
    pytest.mark.serial,
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy binary not installed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stubs:
    """Stub ADS servers; their events (stream open/close) arrive on one queue."""

    def __init__(self, names: list[str], options: Sequence[tuple[str, int]]) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.ports: dict[str, int] = {}
        for name in names:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "ads_stub_proc.py"), name, json.dumps(options)],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.procs[name] = proc
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline() or "{}")
            assert ready.get("ready"), f"stub {name} did not start"
            self.ports[name] = int(ready["port"])
            threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.events.put(json.loads(line))

    def next_open(self, timeout: float) -> dict[str, Any]:
        """The next stream opening within `timeout` seconds (closings are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no ADS stream opened within {timeout}s")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event["event"] == "open":
                return event

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


@pytest.fixture
def stubs() -> Iterator[Stubs]:
    started = Stubs(["cp-0", "cp-1", "cp-2"], XDS_SERVER_GRPC_OPTIONS)
    try:
        yield started
    finally:
        started.stop()


def run_envoy(tmp_path: Path, stubs: Stubs, delta: bool) -> subprocess.Popen[bytes]:
    config = build_bootstrap(
        "failover-test", [("127.0.0.1", p) for p in stubs.ports.values()], free_port(), delta=delta
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    with (tmp_path / "envoy.log").open("w") as log:
        return subprocess.Popen(
            [str(ENVOY), "-c", str(path), "--disable-hot-restart", "--concurrency", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_envoy(envoy: subprocess.Popen[bytes]) -> None:
    envoy.terminate()
    try:
        envoy.wait(10)
    except subprocess.TimeoutExpired:
        envoy.kill()
        envoy.wait()


def test_stream_is_stable_then_moves_off_killed_and_paused_nodes(
    tmp_path: Path, stubs: Stubs
) -> None:
    envoy = run_envoy(tmp_path, stubs, delta=False)
    try:
        first = stubs.next_open(15)
        # Keepalive PINGs every 2 s must not make the server end the stream (too_many_pings).
        with pytest.raises(AssertionError):
            stubs.next_open(12)

        killed = first["server"]
        t = time.monotonic()
        stubs.procs[killed].kill()
        second = stubs.next_open(20)  # a bound for "it moves at all", not a speed figure
        print(f"\nkilled {killed}: stream on {second['server']} after {time.monotonic() - t:.2f}s")
        assert second["server"] != killed

        paused = second["server"]
        t = time.monotonic()
        os.kill(stubs.procs[paused].pid, signal.SIGSTOP)
        third = stubs.next_open(30)  # a bound for "it moves at all", not a speed figure
        print(f"paused {paused}: stream on {third['server']} after {time.monotonic() - t:.2f}s")
        assert third["server"] not in (killed, paused)
    finally:
        stop_envoy(envoy)


def test_delta_bootstrap_opens_a_delta_stream(tmp_path: Path, stubs: Stubs) -> None:
    envoy = run_envoy(tmp_path, stubs, delta=True)
    try:
        assert stubs.next_open(15)["node"] == "failover-test"
    finally:
        stop_envoy(envoy)
