"""How long `repstage-mesh status` takes on a three-node cluster (real `serve` processes on
loopback) with every node up, with one follower frozen (SIGSTOP), and with the leader frozen:
the cluster-wide views wait at most `api.peer_timeout` (default 1 s) per node, asked at once.

    .venv/bin/python bench/status_bounded.py [--runs 3]

Prints seconds per `status --json` run (the CLI's own start-up included) and the load average.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.harness import (
    REPSTAGE,
    ControlPlaneNode,
    cluster_leader,
    raft_cluster,
    start_cluster,
    workdir,
)


def timed_status(api: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPSTAGE_")}
    started = time.monotonic()
    proc = subprocess.run([REPSTAGE, "status", "--json", "--api", api], capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - started


def runs(label: str, api: str, count: int) -> None:
    times = [timed_status(api) for _ in range(count)]
    print(f"{label:<22} median {statistics.median(times):.2f} s, max {max(times):.2f} s over {count} runs")


def frozen(node: ControlPlaneNode, label: str, api: str, count: int) -> None:
    node.proc.signal(signal.SIGSTOP)
    try:
        runs(label, api, count)
    finally:
        node.proc.signal(signal.SIGCONT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with workdir() as wd:
        nodes = raft_cluster(wd, 3, {})
        try:
            start_cluster(nodes)
            leader = cluster_leader(nodes)
            follower, asked = [n for n in nodes if n is not leader][:2]
            runs("all up", asked.api, args.runs)
            frozen(follower, "one follower frozen", asked.api, args.runs)
            frozen(leader, "the leader frozen", asked.api, args.runs)
        finally:
            for node in nodes:
                node.proc.signal(signal.SIGCONT)
                node.stop()
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
