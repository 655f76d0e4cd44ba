"""Issue 11 item 5 with real processes: the failover history is replicated through Raft.

Three `repstage-mesh serve` nodes, one service in announce mode, no Envoy (no proxy to wait
for). The fence interval is 2 s, so an announce spends about 2.2 s in its `AwaitClose` step:
long enough to kill -9 the leader in the middle of it. The followers already hold the record
(committed at its start and when fenced), and the new leader ends it as interrupted; a finished
announce then shows on every node, the old record too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from .harness import (
    ControlPlaneNode,
    cluster_leader,
    free_low_port,
    http_json,
    raft_cluster,
    start_cluster,
    wait_until,
    workdir,
)

SERVICE = "orders"


@pytest.fixture
def nodes() -> Iterator[list[ControlPlaneNode]]:
    with workdir() as wd:
        base: dict[str, Any] = {
            "services": [{
                "name": SERVICE, "protocol": "tcp", "listen_port": free_low_port(),
                "members": [{"name": "a", "address": "127.0.0.1", "port": 9001},
                            {"name": "b", "address": "127.0.0.1", "port": 9002}],
                "primary": "a",
            }],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2), "fence_interval_ms": 2000},
        }
        cluster = raft_cluster(wd, 3, base)
        try:
            start_cluster(cluster)
            yield cluster
        finally:
            for node in cluster:
                node.stop()


def records(node: ControlPlaneNode) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in node.get("/v1/failovers")["failovers"]}


def test_a_new_leader_shows_the_history_and_the_interrupted_announce(nodes: list[ControlPlaneNode]) -> None:
    leader = cluster_leader(nodes)
    followers = [n for n in nodes if n is not leader]
    answer: dict[str, Any] = {}

    def announce() -> None:  # answered by nobody: the leader dies during it
        try:
            answer["result"] = http_json("POST", f"{leader.api}/v1/services/{SERVICE}/primary",
                                         {"member": "b"}, timeout=15)
        except OSError as exc:  # the connection dies with the leader
            answer["error"] = exc

    thread = threading.Thread(target=announce, daemon=True)
    thread.start()

    def fenced_on_every_follower() -> str | None:
        seen = [{i for i, r in records(f).items()
                 if r["kind"] == "announce" and r["status"] == "running" and r["fence_epoch"]} for f in followers]
        common = set.intersection(*seen)
        return common.pop() if common else None

    record_id = wait_until(fenced_on_every_follower, 10, 0.02, "the followers hold the running, fenced record")
    assert record_id.startswith(f"{leader.name}-")
    leader.proc.kill()  # SIGKILL, during the 2.2 s AwaitClose
    thread.join(20)
    assert "error" in answer, answer  # the caller never got an answer: the outcome was unknown to it

    new_leader = cluster_leader(followers, timeout=15)

    def interrupted(node: ControlPlaneNode) -> bool:
        record = records(node).get(record_id)
        return bool(record and record["status"] == "failed" and "interrupted" in record["reason"])
    for node in followers:
        wait_until(lambda n=node: interrupted(n), 10, 0.05, f"{node.name} shows {record_id} interrupted")
    record = records(new_leader)[record_id]
    assert leader.name in record["reason"] and new_leader.name in record["reason"], record
    names = [e["name"] for e in record["timeline"]]
    assert "fenced" in names and "committed" not in names, names  # where it stopped
    assert new_leader.get(f"/v1/services/{SERVICE}")["primary"] is None  # left fail-closed

    # The next announce, on a follower, is carried to the new leader and shows everywhere.
    other = next(n for n in followers if n is not new_leader)
    status, body = other.call("POST", f"/v1/services/{SERVICE}/primary", {"member": "b", "cause": "retry"})
    assert status == 200, body
    assert body["failover"]["id"].startswith(f"{new_leader.name}-") and body["primary"] == "b"
    for node in followers:
        wait_until(lambda n=node: records(n).get(body["failover"]["id"], {}).get("status") == "done", 10, 0.05,
                   f"{node.name} holds the finished announce")
        assert record_id in records(node)  # the old leader's record stays in the history
