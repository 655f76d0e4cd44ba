"""One ReplicatedStore in its own OS process, driven by JSON lines on stdin (test helper).

Usage: python raft_node_proc.py NODE_ID SELF_ADDRESS DATA_DIR PASSWORD [PEER ...]
(environment: RAFT_NODE_DURABLE=0 turns the durable journal off, for bench/raft_commit.py)

Requests, one JSON object per line: {"op": "status"} | {"op": "state"} |
{"op": "submit", "envelope": {...}, "timeout": 2.0} | {"op": "confirm", "timeout": 1.0} |
{"op": "bench", "envelope": {...}, "n": 200} |
{"op": "quit"}. Each answer is one JSON line: {"ok": true, ...} or {"ok": false, "error": "Type",
"message": "..."}. The first line printed is {"ready": true} once the store is bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from repstage_mesh.core.errors import ReplicationError
from repstage_mesh.core.models import CommandEnvelope
from repstage_mesh.core.state import encode_state
from repstage_mesh.raft.store import ReplicatedStore


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _handle(store: ReplicatedStore, request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "status":
        return {"ok": True, "status": store.status()}
    if op == "state":
        return {"ok": True, "state": encode_state(store.state).decode(), "index": store.state.index}
    if op == "submit":
        envelope = CommandEnvelope.model_validate(request["envelope"])
        outcome = await store.submit(envelope, float(request["timeout"]))
        return {"ok": True, "outcome": outcome.model_dump(mode="json"), "index": store.state.index}
    if op == "confirm":
        was_leader = store.is_leader()
        confirmed = await store.confirm_leadership(float(request["timeout"]))
        return {"ok": True, "was_leader": was_leader, "confirmed": confirmed}
    if op == "bench":  # sequential commits from this node, timed here (no pipe in the way)
        envelope = CommandEnvelope.model_validate(request["envelope"])
        samples = []
        for _ in range(int(request["n"])):
            start = time.perf_counter()
            await store.submit(envelope, 5.0)
            samples.append(time.perf_counter() - start)
        samples.sort()
        return {
            "ok": True,
            "p50_ms": samples[len(samples) // 2] * 1000,
            "p99_ms": samples[int(len(samples) * 0.99)] * 1000,
        }
    raise ValueError(f"op: unknown {op!r}")


async def main(argv: list[str]) -> None:
    node_id, address, data_dir, password, *peers = argv
    durable = os.environ.get("RAFT_NODE_DURABLE", "1") != "0"
    store = ReplicatedStore(node_id, address, peers, data_dir, password=password, durable_journal=durable)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _print({"ready": True})
    try:
        while line := await reader.readline():
            request = json.loads(line)
            if request["op"] == "quit":
                break
            try:
                _print(await _handle(store, request))
            except (ReplicationError, ValueError) as exc:
                _print(
                    {
                        "ok": False,
                        "error": type(exc).__name__,
                        "message": str(exc),
                        "kinds": [c.__name__ for c in type(exc).__mro__],
                    }
                )
    finally:
        store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
