"""Which endpoint changes make a real Envoy replace a host rather than update it in place.

The health fence (render/envoy.py) flips a promoted member's health-check port so that every
Envoy creates a new host for it, checked at once; the cost is ~1 ms of Envoy CPU per Envoy and
switch (bench/RESULTS.md, issue 17). This probe asks a real Envoy (file-based EDS, one
endpoint, an active HTTP health check against a local server answering 200) what each change
costs in host identity, read from the cluster's `membership_change` counter (hosts added or
removed) and `health_check.attempt` (a new host is checked at once):

    .venv/bin/python bench/host_identity.py

Each step prints (membership_change, health_check.attempt, the host's health) after the change.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.harness import ENVOY, free_low_port, wait_until


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _endpoint(port: int, disable_hc: bool, status: str, hc_port: int | None) -> dict[str, Any]:
    hc: dict[str, Any] = {"disable_active_health_check": disable_hc}
    if hc_port is not None:
        hc["port_value"] = hc_port
    return {"health_status": status, "endpoint": {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "health_check_config": hc}}


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = int(server.server_address[1])
    server2 = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)  # a second check port, same answer
    threading.Thread(target=server2.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    other = int(server2.server_address[1])
    admin = free_low_port()
    with tempfile.TemporaryDirectory(prefix="host-identity-") as tmp:
        eds = Path(tmp) / "eds.json"

        def write(endpoint: dict[str, Any]) -> None:
            doc = {"resources": [{"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                                  "cluster_name": "c", "endpoints": [{"lb_endpoints": [endpoint]}]}]}
            staged = Path(tmp) / "eds.tmp"
            staged.write_text(json.dumps(doc))
            os.rename(staged, eds)  # Envoy watches for the move

        write(_endpoint(port, False, "HEALTHY", None))
        boot = {
            "node": {"id": "probe", "cluster": "probe"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"clusters": [{
                "name": "c", "type": "EDS", "connect_timeout": "1s",
                "eds_cluster_config": {"eds_config": {"path_config_source": {"path": str(eds)},
                                                      "resource_api_version": "V3"}},
                "health_checks": [{"timeout": "1s", "interval": "0.2s", "unhealthy_threshold": 1,
                                   "healthy_threshold": 1, "http_health_check": {"path": "/hc"}}],
            }]},
        }
        (Path(tmp) / "boot.json").write_text(json.dumps(boot))
        envoy = subprocess.Popen([ENVOY, "-c", str(Path(tmp) / "boot.json"), "--disable-hot-restart", "-l", "error"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def get(path: str) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=2) as answer:
                return str(answer.read().decode())

        def state() -> tuple[int, int, str]:
            stats = dict(line.split(": ", 1) for line in get("/stats?filter=^cluster\\.c\\.").splitlines() if ": " in line)
            host = json.loads(get("/clusters?format=json"))["cluster_statuses"][0]["host_statuses"][0]
            return (int(stats.get("cluster.c.membership_change", 0)), int(stats.get("cluster.c.health_check.attempt", 0)),
                    host["health_status"].get("eds_health_status", "?"))

        def ready() -> bool:
            try:
                return get("/ready").strip() == "LIVE"
            except OSError:
                return False

        def step(label: str, endpoint: dict[str, Any]) -> None:
            before = state()
            write(endpoint)
            changed: Callable[[], bool] = lambda: state()[2] == endpoint["health_status"] and state() != before  # noqa: E731
            with contextlib.suppress(AssertionError):  # nothing visible changed: what the row says
                wait_until(changed, 2.0, 0.05, label)
            print(f"{label:55s} {state()}")

        try:
            wait_until(ready, 20, 0.05, "envoy ready")
            wait_until(lambda: state()[1] >= 1, 10, 0.05, "the first check")
            print(f"{'start':55s} {state()}")
            step("EDS health_status HEALTHY -> UNHEALTHY", _endpoint(port, False, "UNHEALTHY", None))
            step("EDS health_status UNHEALTHY -> HEALTHY", _endpoint(port, False, "HEALTHY", None))
            step("disable_active_health_check false -> true", _endpoint(port, True, "HEALTHY", None))
            step("disable_active_health_check true -> false", _endpoint(port, False, "HEALTHY", None))
            step("health-check port -> another (the fence's flip)", _endpoint(port, False, "HEALTHY", other))
        finally:
            envoy.terminate()
            envoy.wait(10)
            server.shutdown()
            server2.shutdown()


if __name__ == "__main__":
    main()
