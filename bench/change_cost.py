"""What one change costs a node before its push, by the size of the mesh (issue 17 item 4).

Usage: .venv/bin/python bench/change_cost.py [--services 1 10 100 1000] [--changes 30]
       (`PYTHONPATH=<another tree>` measures that tree: old and new side by side)

In one process, no sockets: a replicated state of N services (two members each, health
fence, as `serve` renders by default) takes `--changes` changes of two kinds, and each is
timed piece by piece as the node does it on its event loop after the commit is applied:

- `put`: a PUT of one service with member b's port changed (the fence's answers stay);
- `switch`: one service's primary moves (what every failover commits; the fence changes).

Columns (p50 ms per change): `render` (state -> Envoy messages), `encode` (Snapshot.build:
the changed messages to bytes), `frame` (what the node writes to each xDS worker: pickled,
and its size), `apply` (a worker decoding the frame into its snapshot). A tree without delta
frames (before this bench) sends the whole snapshot in every frame. Nothing asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from repstage_mesh.config.settings import Settings  # noqa: E402
from repstage_mesh.core.models import PutService, ServiceSpec, SetPrimary  # noqa: E402
from repstage_mesh.core.state import MeshState, apply, initial_state  # noqa: E402
from repstage_mesh.node import render_options  # noqa: E402
from repstage_mesh.render.envoy import clear_render_cache, render  # noqa: E402
from repstage_mesh.xds import relay  # noqa: E402
from repstage_mesh.xds import resources as res  # noqa: E402
from repstage_mesh.xds.cache import Snapshot  # noqa: E402

ORDER = (res.CLUSTER, res.ROUTE, res.ENDPOINT, res.LISTENER, res.SECRET)


def _services(n: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"svc{i}", "protocol": "tcp", "listen_port": 20000 + i, "primary": "a",
            "members": [
                {"name": "a", "address": "127.0.0.1", "port": 30000 + 2 * i},
                {"name": "b", "address": "127.0.0.1", "port": 30001 + 2 * i},
            ],
        }
        for i in range(n)
    ]  # fmt: skip


def _frame(base: Snapshot, snap: Snapshot, seq: int) -> bytes:
    if hasattr(relay, "snapshot_delta"):
        return relay.encode(("delta", "", relay.snapshot_delta(base, snap), seq - 1, seq))
    return relay.encode(("snapshot", "", relay.snapshot_wire(snap)))


def _apply(base: Snapshot, frame: bytes) -> Snapshot:
    (message,) = relay.FrameDecoder().feed(frame)
    if message[0] == "delta":
        return relay.snapshot_from_delta(base, message[2])
    return relay.snapshot_from_wire(message[2])


def measure(n: int, kind: str, changes: int) -> dict[str, float]:
    services = _services(n)
    settings = Settings.model_validate({
        "services": services, "node": {"id": "cp-1", "data_dir": "/tmp/change-cost"},
        "envoy": {"listen_address": "127.0.0.1", "fence_port": 15990},
    })  # fmt: skip
    options = render_options(settings)
    clear_render_cache()  # as a node that starts: the cache holds this state's own objects
    state = MeshState()
    for index, command in enumerate(initial_state(settings.specs()), 1):
        state, _ = apply(state, command, index)
    snap = Snapshot.build(state.last_change, render(state, options), None, ORDER)
    worker = snap
    times: dict[str, list[float]] = {"render": [], "encode": [], "frame": [], "apply": [], "bytes": []}
    index = state.index
    target = services[n // 2]
    for k in range(changes):
        index += 1
        if kind == "put":
            b = {**target["members"][1], "port": 40000 + k}
            command: Any = PutService(spec=ServiceSpec.model_validate({**target, "members": [target["members"][0], b]}))
        else:
            command = SetPrimary(service=target["name"], member="ab"[(k + 1) % 2])
        state, outcome = apply(state, command, index)
        assert outcome.ok, outcome
        t0 = time.perf_counter()
        messages = render(state, options)
        t1 = time.perf_counter()
        new = Snapshot.build(state.last_change, messages, snap, ORDER)
        t2 = time.perf_counter()
        frame = _frame(snap, new, k + 2)
        t3 = time.perf_counter()
        worker = _apply(worker, frame)
        t4 = time.perf_counter()
        assert worker.version == new.version
        snap = new
        for name, took in (("render", t1 - t0), ("encode", t2 - t1), ("frame", t3 - t2), ("apply", t4 - t3)):
            times[name].append(took * 1000)
        times["bytes"].append(len(frame))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--changes", type=int, default=30)
    args = parser.parse_args()
    print(common.machine())
    print("| services | change | render ms | encode ms | frame ms | frame bytes | worker apply ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in args.services:
        for kind in ("put", "switch"):
            r = measure(n, kind, args.changes)
            print(f"| {n} | {kind} | {r['render']:.2f} | {r['encode']:.2f} | {r['frame']:.2f} | "
                  f"{r['bytes']:,.0f} | {r['apply']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
