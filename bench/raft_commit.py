"""Raft commit latency for 1, 3 and 5 control-plane nodes, and leader loss -> next committed
write (issue 3). Prints tables and writes the `raft_commit` section of bench/RESULTS.md.

Usage: .venv/bin/python bench/raft_commit.py [--sizes 1 3 5] [--n 300] [--kills 10]
       [--parts store api kill durability] [--repeats 3] [--no-write]

Everything runs as real OS processes on loopback:

- store: `ReplicatedStore.submit` called sequentially inside one node's process
  (integration/raft_node_proc.py: one store per process, no HTTP, no rendering), on the leader
  and on a follower (which forwards to the leader). Each write is one SetPrimary entry through
  the log (replicated, committed, applied on the node before submit returns).
- api: `repstage-mesh serve` nodes; POST /v1/services/orders/primary from one sequential client
  on a keep-alive connection, to the leader and to a follower. `change` alternates the primary:
  the node answers after it has applied the entry, and applying a change renders and encodes the
  node's xDS snapshot on the event loop first. `same` re-asserts the current primary: committed
  through the log like any write, but it changes nothing, so there is nothing to render.
- durability: the `store` measurement with the durable journal on (msync before every read or
  send, term and vote fsync'd; the default) and off (`raft.durable_journal: false`,
  RAFT_NODE_DURABLE=0 for raft_node_proc.py), alternating on/off `--repeats` times, each run on
  fresh processes and data directories in the system temp dir (ext4 here). Written to its own
  section `raft_durable` of RESULTS.md.
- kill: 3 `serve` nodes; one writer thread per node POSTs alternating primaries (5 s commit
  timeout); kill -9 the leader; the figure is the time from the kill to the first 200 for a
  write sent after the kill. The killed node is restarted and the cluster converges between
  rounds.

Nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

from integration.harness import (  # noqa: E402
    ControlPlaneNode,
    cluster_leader,
    free_low_port,
    free_port,
    http_json,
    raft_cluster,
    start_cluster,
    wait_until,
    workdir,
)

PASSWORD = "bench-raft-password"
NODE_PROC = ROOT / "integration" / "raft_node_proc.py"
SERVICE = "orders"


# --- store: ReplicatedStore in its own process ---------------------------------------------------


class StoreProc:
    """One ReplicatedStore in its own process, driven by JSON lines (raft_node_proc.py)."""

    def __init__(
        self, node_id: str, address: str, peers: list[str], data_dir: Path, durable: bool = True
    ) -> None:
        self.address = address
        self.proc = subprocess.Popen(
            [sys.executable, str(NODE_PROC), node_id, address, str(data_dir), PASSWORD, *peers],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "RAFT_NODE_DURABLE": "1" if durable else "0"},
        )
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"{node_id} did not start: {ready}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("store process exited")
        return dict(json.loads(line))

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with suppress(OSError, RuntimeError, ValueError):
                self.ask({"op": "quit"})
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def envelope(command: dict[str, Any]) -> dict[str, Any]:
    return {"command": command}


def store_bench(size: int, n: int, durable: bool = True) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="raft-bench-") as tmp:
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(size)]
        procs: list[StoreProc] = []
        try:
            for i, address in enumerate(addresses):
                peers = [a for a in addresses if a != address]
                data = Path(tmp) / f"n{i}"
                data.mkdir()
                procs.append(StoreProc(f"n{i}", address, peers, data, durable))

            def leader() -> StoreProc | None:
                for p in procs:
                    if p.ask({"op": "status"})["status"]["is_leader"]:
                        return p
                return None

            lead = wait_until(leader, 20, 0.05, "a store leader")
            spec = {
                "kind": "put_service",
                "spec": {
                    "name": SERVICE,
                    "listen_port": 15000,
                    "members": [
                        {"name": "a", "address": "127.0.0.1", "port": 20001},
                        {"name": "b", "address": "127.0.0.1", "port": 20002},
                    ],
                    "primary": "a",
                },
            }
            answer = lead.ask({"op": "submit", "envelope": envelope(spec), "timeout": 5.0})
            if not answer["ok"]:
                raise RuntimeError(f"put_service failed: {answer}")
            where = [("leader", lead)] + (
                [("follower", next(p for p in procs if p is not lead))] if size > 1 else []
            )
            for role, proc in where:
                # raft_node_proc's bench op repeats one envelope: a SetPrimary of the current
                # primary, a full trip through the log whose apply changes nothing (applying a
                # change costs microseconds in the store; rendering is the node's, not measured)
                cmd = {"kind": "set_primary", "service": SERVICE, "member": "a"}
                out = proc.ask({"op": "bench", "envelope": envelope(cmd), "n": n})
                if not out["ok"]:
                    raise RuntimeError(f"bench failed: {out}")
                rows.append(
                    {"nodes": size, "on": role, "n": n, "p50": out["p50_ms"], "p99": out["p99_ms"],
                     "durable": durable}
                )
        finally:
            for p in procs:
                p.stop()
    return rows


# --- api: real `serve` nodes ---------------------------------------------------------------------


def base_config() -> dict[str, Any]:
    return {
        "services": [
            {
                "name": SERVICE,
                "protocol": "tcp",
                "listen_port": free_low_port(),
                "members": [
                    {"name": "a", "address": "127.0.0.1", "port": 20001},
                    {"name": "b", "address": "127.0.0.1", "port": 20002},
                ],
                "primary": "a",
            }
        ],
        "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
    }


@contextmanager
def serve_cluster(size: int) -> Iterator[list[ControlPlaneNode]]:
    with workdir() as wd:
        if size == 1:
            nodes = [ControlPlaneNode(wd, base_config(), name="cp-1")]
        else:
            nodes = raft_cluster(wd, size, base_config())
        try:
            start_cluster(nodes, 60)
            yield nodes
        finally:
            for node in nodes:
                node.stop()


def post_latencies(node: ControlPlaneNode, members: list[str], n: int) -> list[float]:
    host, port = node.config["api"]["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    samples = []
    try:
        for i in range(n + 10):
            body = json.dumps({"member": members[i % len(members)]})
            start = time.perf_counter()
            conn.request(
                "POST",
                f"/v1/services/{SERVICE}/primary",
                body,
                {"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            raw = response.read()
            took = time.perf_counter() - start
            if response.status != 200:
                raise RuntimeError(f"POST on {node.name}: {response.status} {raw!r}")
            if i >= 10:  # warm-up
                samples.append(took)
    finally:
        conn.close()
    return samples


def api_bench(size: int, n: int) -> list[dict[str, Any]]:
    rows = []
    with serve_cluster(size) as nodes:
        lead = cluster_leader(nodes, 20) if size > 1 else nodes[0]
        where = [("leader", lead)] + (
            [("follower", next(x for x in nodes if x is not lead))] if size > 1 else []
        )
        for role, node in where:
            for kind, members in (("change", ["b", "a"]), ("same", ["a"])):
                if kind == "same":
                    status, body = http_json(
                        "POST", f"{node.api}/v1/services/{SERVICE}/primary", {"member": "a"}
                    )
                    assert status == 200, body
                samples = post_latencies(node, members, n)
                rows.append(
                    {
                        "nodes": size,
                        "on": role,
                        "write": kind,
                        "n": len(samples),
                        "p50": common.percentile(samples, 50) * 1000,
                        "p99": common.percentile(samples, 99) * 1000,
                    }
                )
    return rows


# --- kill: leader loss -> next committed write ---------------------------------------------------


class Writer(threading.Thread):
    def __init__(self, node: ControlPlaneNode, offset: int) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.offset = offset
        self.results: list[tuple[float, float, int | None]] = []  # call, ret, status
        self.stop_event = threading.Event()

    def run(self) -> None:
        i = self.offset
        while not self.stop_event.is_set():
            if not self.node.proc.alive():
                self.stop_event.wait(0.01)
                continue
            i += 1
            call = time.monotonic()
            try:
                status, _ = http_json(
                    "POST",
                    f"{self.node.api}/v1/services/{SERVICE}/primary",
                    {"member": "ab"[i % 2]},
                    timeout=7.0,
                )
            except OSError:
                status = None
            self.results.append((call, time.monotonic(), status))
            if status != 200:
                self.stop_event.wait(0.005)


def kill_bench(kills: int) -> list[dict[str, Any]]:
    rounds = []
    with serve_cluster(3) as nodes:
        writers = [Writer(node, i) for i, node in enumerate(nodes)]
        for w in writers:
            w.start()
        try:
            for r in range(kills):
                lead = cluster_leader(nodes, 20)
                wanted = sum(len(w.results) for w in writers) + 20
                wait_until(lambda: sum(len(w.results) for w in writers) >= wanted, 20)  # noqa: B023
                killed_at = time.monotonic()
                lead.proc.kill()

                def first_commit(t: float = killed_at) -> float | None:
                    done = [
                        ret
                        for w in writers
                        for call, ret, s in list(w.results)
                        if s == 200 and call > t
                    ]
                    return min(done) - t if done else None

                recovery = wait_until(first_commit, 20, 0.005, "a commit after the kill")
                survivors = [n for n in nodes if n is not lead]
                new = cluster_leader(survivors, 20)
                rounds.append(
                    {
                        "round": r + 1,
                        "killed": lead.name,
                        "new_leader": new.name,
                        "first_commit_ms": recovery * 1000,
                    }
                )
                print(
                    f"  round {r + 1}: killed {lead.name}, first commit after "
                    f"{recovery * 1000:.0f} ms (new leader {new.name})",
                    flush=True,
                )
                lead.start(wait_ready=False)
                lead.wait_ready(60)
        finally:
            for w in writers:
                w.stop_event.set()
            for w in writers:
                w.join(10)
    return rounds


# --- durability: the durable journal on vs off --------------------------------------------------


def durability_bench(n: int, repeats: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rep in range(repeats):
        for durable in (True, False):
            print(f"  3 nodes, durable journal {'on' if durable else 'off'} (run {rep + 1}) ...", flush=True)
            for row in store_bench(3, n, durable):
                rows.append({**row, "run": rep + 1})
    return rows


def durability_section(rows: list[dict[str, Any]], n: int, repeats: int, machine: str) -> str:
    lines = [
        "## Raft commit latency with the durable journal on and off (bench/raft_commit.py)",
        "",
        f"Command: `.venv/bin/python bench/raft_commit.py --parts durability --n {n} "
        f"--repeats {repeats}`  ",
        f"Machine: {machine}; load average after {common.loadavg()} (other engineers' jobs share "
        f"these 2 cores). Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Data "
        "directories on ext4 (virtio disk).",
        "",
        "3 store processes on loopback, sequential `ReplicatedStore.submit` inside one node's "
        "process (as the `store` table of the section above); on = `raft.durable_journal: true` "
        "(default: msync of the journal before any read or message, term and vote fsync'd), "
        "off = pysyncobj's own behaviour (nothing synced). Runs alternate on/off.",
        "",
        "| journal | submitted on | run | writes | p50 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *[
            f"| {'durable' if r['durable'] else 'not durable'} | {r['on']} | {r['run']} | {r['n']} | "
            f"{r['p50']:.2f} | {r['p99']:.2f} |"
            for r in sorted(rows, key=lambda r: (not r["durable"], r["on"], r["run"]))
        ],
        "",
    ]
    for role in ("leader", "follower"):
        on = [r for r in rows if r["on"] == role and r["durable"]]
        off = [r for r in rows if r["on"] == role and not r["durable"]]
        if on and off:
            lines.append(
                f"- on the {role}, median of the runs: durable p50 "
                f"{common.percentile([r['p50'] for r in on], 50):.2f} ms / p99 "
                f"{common.percentile([r['p99'] for r in on], 50):.2f} ms; not durable p50 "
                f"{common.percentile([r['p50'] for r in off], 50):.2f} ms / p99 "
                f"{common.percentile([r['p99'] for r in off], 50):.2f} ms."
            )
    lines += [
        "",
        "Old figure (before the durable journal, section above, load ~7): 3 nodes, leader p50 "
        "1.04 ms, p99 4.85 ms; follower p50 2.05 ms, p99 5.85 ms.",
        "",
        "Reading: with the durable journal a commit waits for two msyncs in a row: the "
        "leader's (before it sends the entry: it reads it back to send it) and then one "
        "follower's (before its AppendEntries answer).",
    ]
    return "\n".join(lines)


# --- report --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--n", type=int, default=300, help="sequential writes per measurement")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--parts", nargs="+", default=["store", "api", "kill"])
    parser.add_argument("--repeats", type=int, default=3, help="durability: on/off runs each")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    machine = common.machine()  # its load average is the one before the run
    if args.parts == ["durability"]:
        rows = durability_bench(args.n, args.repeats)
        text = durability_section(rows, args.n, args.repeats, machine)
        print(text)
        if not args.no_write:
            common.write_section("raft_durable", text)
            print(f"wrote {common.RESULTS}")
        return
    store_rows: list[dict[str, Any]] = []
    api_rows: list[dict[str, Any]] = []
    kill_rows: list[dict[str, Any]] = []
    for size in args.sizes:
        if "store" in args.parts:
            print(f"store, {size} node(s) ...", flush=True)
            store_rows += store_bench(size, args.n)
        if "api" in args.parts:
            print(f"api, {size} node(s) ...", flush=True)
            api_rows += api_bench(size, args.n)
    if "kill" in args.parts and args.kills:
        print(f"leader loss x {args.kills} ...", flush=True)
        kill_rows = kill_bench(args.kills)

    lines = [
        "## Raft commit latency and leader loss (bench/raft_commit.py)",
        "",
        f"Command: `.venv/bin/python bench/raft_commit.py --sizes {' '.join(map(str, args.sizes))} "
        f"--n {args.n} --kills {args.kills} --parts {' '.join(args.parts)}`  ",
        f"Machine: {machine}; load average after {common.loadavg()} "
        "(other engineers' jobs share these 2 cores). "
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Real OS processes on loopback. Sequential client: one write at a time.",
        "",
    ]
    if store_rows:
        lines += [
            "### Commit on the store (ReplicatedStore.submit inside the node's process, no HTTP, "
            "no rendering)",
            "",
            "| nodes | submitted on | writes | p50 ms | p99 ms |",
            "| ---: | --- | ---: | ---: | ---: |",
            *[
                f"| {r['nodes']} | {r['on']} | {r['n']} | {r['p50']:.2f} | {r['p99']:.2f} |"
                for r in store_rows
            ],
            "",
        ]
    if api_rows:
        lines += [
            "### Commit through the REST API (POST /v1/services/orders/primary on `serve` nodes)",
            "",
            "`change`: alternates the primary; the answer waits until this node has applied the "
            "entry, which includes rendering and encoding its xDS snapshot. `same`: re-asserts "
            "the current primary (committed through the log, nothing to render).",
            "",
            "| nodes | sent to | write | writes | p50 ms | p99 ms |",
            "| ---: | --- | --- | ---: | ---: | ---: |",
            *[
                f"| {r['nodes']} | {r['on']} | {r['write']} | {r['n']} | {r['p50']:.2f} | "
                f"{r['p99']:.2f} |"
                for r in api_rows
            ],
            "",
        ]
    if kill_rows:
        times = [r["first_commit_ms"] for r in kill_rows]
        lines += [
            "### Leader loss -> next committed write (3 `serve` nodes, kill -9 the leader)",
            "",
            "One writer thread per node, POSTing alternating primaries; the figure is from the "
            "kill to the first 200 for a write sent after it. The killed node is restarted "
            "between rounds.",
            "",
            "| rounds | p50 ms | max ms | min ms |",
            "| ---: | ---: | ---: | ---: |",
            f"| {len(times)} | {common.percentile(times, 50):.0f} | {max(times):.0f} | "
            f"{min(times):.0f} |",
            "",
            "Per round (ms): " + ", ".join(f"{t:.0f}" for t in times),
            "",
        ]
    lines += [
        "Reading: the issue's goals are a p50 commit under 1 ms on loopback and leader loss -> "
        "next committed write under 1.5 s. The store figures are the Raft commit itself "
        "(pysyncobj with `appendEntriesUseBatch=False`); the REST figures add HTTP, JSON, "
        "validation and, for `change`, rendering the new xDS snapshot on the answering node "
        "before it answers. Leader loss is bounded below by the election timeout (0.3-0.7 s "
        "after the last heartbeat, raft_conf.RaftTimings) and includes a write that was in "
        "flight to the dead leader failing first. On a loaded 2-core machine every figure "
        "moves with the load average shown above.",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if not args.no_write:
        common.write_section("raft_commit", text)
        print(f"wrote {common.RESULTS}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
