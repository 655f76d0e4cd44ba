"""Can Envoy's tcp_proxy hold a *new* connection while its upstream refuses, and forward it once
the upstream answers? (Issue 16 item 5, "TCP: new connections held": what a consistent point
would need; not built.) A static Envoy: one tcp_proxy listener to a static cluster whose only
endpoint refuses (nothing listens); `max_connect_attempts` and `backoff_options` set. A client
connects and sends a line; the upstream starts listening `--open-after` seconds later. Prints
when (if ever) the client got its answer, per setting; never pass/fail.

    .venv/bin/python bench/tcp_hold_probe.py --open-after 0.3
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ENVOY, free_port, loadavg

CONFIG = """
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: held
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: held
          cluster: up
          max_connect_attempts: {attempts}
{backoff}
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]
"""
BACKOFF = "          backoff_options: {{base_interval: {base}, max_interval: {cap}}}"


def echo_server(port: int, stop: threading.Event) -> None:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"up:" + conn.recv(100))


def one(attempts: int, backoff: tuple[str, str] | None, open_after: float) -> str:
    listen, upstream, admin = free_port(), free_port(), free_port()
    config = CONFIG.format(admin=admin, listen=listen, upstream=upstream, attempts=attempts,
                           backoff=BACKOFF.format(base=backoff[0], cap=backoff[1]) if backoff else "")
    work = Path(tempfile.mkdtemp(prefix="tcp-hold-"))
    (work / "envoy.yaml").write_text(config)
    proc = subprocess.Popen([str(ENVOY), "-c", str(work / "envoy.yaml"), "--base-id", str(free_port()), "-l", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until Envoy listens
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        client = socket.create_connection(("127.0.0.1", listen), timeout=5)
        started = time.monotonic()
        client.sendall(b"ping")
        opener = threading.Timer(open_after, lambda: threading.Thread(target=echo_server, args=(upstream, stop), daemon=True).start())
        opener.start()
        try:
            answer = client.recv(100)
        except OSError as exc:
            answer = f"error {exc}".encode()
        took = time.monotonic() - started
        client.close()
        return f"{answer.decode(errors='replace') or '(closed)'} after {took * 1000:.0f} ms"
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--open-after", type=float, default=0.3)
    args = parser.parse_args()
    print(f"load average {loadavg()}; the upstream starts listening {args.open_after * 1000:.0f} ms after the client's connect")
    print("| max_connect_attempts | backoff_options (base, max) | the client got |")
    print("| --- | --- | --- |")
    for attempts, backoff in ((1, None), (20, None), (20, ("0.01s", "0.02s")), (100, ("0.01s", "0.02s"))):
        print(f"| {attempts} | {backoff or 'default'} | {one(attempts, backoff, args.open_after)} |")


if __name__ == "__main__":
    main()
