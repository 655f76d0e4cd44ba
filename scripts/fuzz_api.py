"""Schemathesis against a real `repstage-mesh serve` node: the whole OpenAPI document, every
phase (examples, coverage, fuzzing, stateful with inferred links), every check except
positive_data_acceptance (see README "REST API": requests valid for the schema that the state
refuses, e.g. a switchover in follow mode, a hook this config does not define).

    .venv/bin/python scripts/fuzz_api.py [--max-examples 100] [--seed 13] [--token-role read_write]

Starts one node on free loopback ports in a temporary directory, runs `schemathesis run`
against it, stops the node (also on failure), and exits with schemathesis's status; the node's
log is checked for 500s ("unexpected error").
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
TOKENS = {"read_write": "fuzz-writer-token-0123456789", "read_only": "fuzz-reader-token-0123456789"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(directory: Path, api: int) -> Path:
    path = directory / "node.yaml"
    path.write_text(f"""
node: {{id: fuzz-1, data_dir: {directory / "data"}}}
xds: {{listen: "127.0.0.1:{free_port()}"}}
api:
  listen: "127.0.0.1:{api}"
  tokens:
    - {{name: fuzz-writer, role: read_write, token: {TOKENS["read_write"]}}}
    - {{name: fuzz-reader, role: read_only, token: {TOKENS["read_only"]}}}
raft: {{bind: "127.0.0.1:{free_port()}"}}
hooks: {{promote-cache: {{command: [/bin/true]}}}}
services:
  - name: orders
    listen_port: 15000
    members: [{{name: a, address: 127.0.0.1, port: 9001}}, {{name: b, address: 127.0.0.1, port: 9002}}]
    primary: a
""")
    return path


def wait_ready(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)  # polling the node's start-up
    raise SystemExit(f"the node at {url} did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--token-role", choices=sorted(TOKENS), default="read_write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repstage-fuzz-") as tmp:
        directory, port = Path(tmp), free_port()
        log = (directory / "serve.log").open("w")
        node = subprocess.Popen([BIN / "repstage-mesh", "serve", "--config", config(directory, port)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, time.monotonic() + 30)
            code = subprocess.call([
                BIN / "schemathesis", "run", f"{url}/openapi.json",
                "-H", f"Authorization: Bearer {TOKENS[args.token_role]}",
                "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                "--max-examples", str(args.max_examples), "--seed", str(args.seed),
                "--continue-on-failure",
            ], cwd=directory)  # its cache (.schemathesis/) stays in the temporary directory
        finally:
            node.terminate()
            node.wait(timeout=30)
            log.close()
        errors = (directory / "serve.log").read_text().count("unexpected error")
        print(f"node log: {errors} unexpected error(s) (500s)")
        return code or (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
