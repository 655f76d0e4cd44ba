"""Issue 3's acceptance: a recorded history of concurrent writes and reads through the REST API
of a three-node Raft cluster, during repeated kill -9 of the leader (each killed node restarted),
is linearizable per service according to `integration.linearizability`.

Operations: POST /v1/services/{s}/primary with and without an epoch claim (the caller's
fencing token, issue 14; `fence: false`, so each change is one commit), and
GET /v1/services/{s}/primary?consistent=true (a Raft read barrier; plain GETs are
follower-local and not linearizable). Outcomes:

- 200: known result; 409 stale_epoch: a known refusal (the model checks it);
- 504, a timeout, a connection lost mid-request: unknown (may or may not have happened);
- 503 no_quorum and connection refused: the write did not happen. They are left out of the
  checked history, so the checker also verifies the API's "nothing changed" promise.

The checked history is saved as JSON in the test's tmp dir (re-check it with
`python -m integration.history FILE` after editing the initial state, see `initial`), the
raw record next to it, and the paths are printed on failure.
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import threading
import time
import urllib.error
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from integration.history import HistoryRecorder, save_history
from integration.linearizability import CheckResult, KeyResult, PrimaryRegister, check_key

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

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

SERVICES = ("orders", "cache")
MEMBERS = ("a", "b", "c")
CLIENTS = 4
KILLS = 3
PACING = 0.05  # seconds between one client's operations (see Client.run)
PHASE_OPS = 80  # operations recorded before each kill and after the last restart
REQUEST_TIMEOUT = 7.0  # above the API's 5 s commit timeout: a 504 is seen before we give up


def _service(name: str) -> dict[str, Any]:
    # The members are never dialled here (no Envoy): only the control plane is under test.
    return {
        "name": name,
        "protocol": "tcp",
        "listen_port": free_low_port(),
        "members": [
            {"name": m, "address": "127.0.0.1", "port": 20000 + i} for i, m in enumerate(MEMBERS)
        ],
        "primary": "a",
    }


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[ControlPlaneNode]]:
    with workdir() as wd:
        base = {
            "services": [_service(s) for s in SERVICES],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        cluster = raft_cluster(wd, 3, base)
        try:
            start_cluster(cluster)
            yield cluster
        finally:
            for node in cluster:
                node.stop()
            for node in cluster:  # kept with the history for a post-mortem
                shutil.copy(node.proc.log_path, tmp_path / f"{node.name}.log")


class Client(threading.Thread):
    """Random reads and writes on random services through one home node (another live node
    while the home is down), every call recorded."""

    def __init__(
        self, index: int, nodes: list[ControlPlaneNode], recorder: HistoryRecorder, seed: int
    ) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.index = index
        self.nodes = nodes
        self.recorder = recorder
        self.random = random.Random(seed)
        self.stop_event = threading.Event()
        self.seen_epoch = {s: 0 for s in SERVICES}  # the highest epoch this client has seen
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None

    def node(self) -> ControlPlaneNode:
        home = self.index % len(self.nodes)
        for k in range(len(self.nodes)):
            node = self.nodes[(home + k) % len(self.nodes)]
            if node.proc.alive():
                return node
        return self.nodes[home]

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.one()
                # Pacing (not synchronisation): every node renders each applied change on its
                # event loop, replay included (~9 ms for these two services on this machine),
                # so a much faster stream of changes saturates the nodes and a restarted node
                # takes long to replay its journal and catch up.
                self.stop_event.wait(PACING)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def one(self) -> None:
        service = self.random.choice(SERVICES)
        node = self.node()
        url = f"{node.api}/v1/services/{service}/primary"
        roll = self.random.random()
        name = f"{self.name}@{node.name}"
        if roll < 0.4:
            op = self.recorder.invoke(service, "read", {}, client=name)
            outcome = self.call("GET", url + "?consistent=true", None)
        else:
            member = self.random.choice(MEMBERS)
            claim: int | None = None
            if roll > 0.75:  # an epoch claim: sometimes stale, usually fresh
                claim = self.seen_epoch[service] + self.random.choice((0, 1, 1000, 1000))
                claim = max(claim, 1)
            op = self.recorder.invoke(
                service, "set_primary", {"member": member, "expected_epoch": claim}, client=name
            )
            # fence false: one commit per change (the break-before-make plan, with its fail-closed
            # step between two commits, is not a register write; test_announce_isolate covers it)
            body: dict[str, Any] = {"member": member, "fence": False}
            if claim is not None:
                body["epoch"] = claim
            outcome = self.call("POST", url, body)
        kind, output = outcome
        self.count(kind)
        if kind == "unknown":
            self.recorder.unknown(op)
        else:
            self.recorder.ok(op, output)
            if "epoch" in output:
                self.seen_epoch[service] = max(self.seen_epoch[service], int(output["epoch"]))

    def call(self, method: str, url: str, body: Any) -> tuple[str, dict[str, Any]]:
        """("ok" | "stale" | "not_applied" | "unknown", output for the recorder)."""
        try:
            status, answer = http_json(method, url, body, timeout=REQUEST_TIMEOUT)
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                return "not_applied", {"not_applied": "connection refused"}
            return "unknown", {}
        except (OSError, http.client.HTTPException):  # timeout, reset, server gone mid-request
            return "unknown", {}
        if status == 200:
            return "ok", {"primary": answer["primary"], "epoch": int(answer["epoch"])}
        code = answer["error"]["code"] if isinstance(answer, dict) else None
        if status == 409 and code == "stale_epoch":
            return "stale", {"rejected": "stale_epoch"}
        if status == 409 and code == "conflict":  # another change of this service is running: refused
            return "not_applied", {"not_applied": code}
        if status == 409 and code == "switchover_failed":  # ran and failed: committed or not
            return "unknown", {}
        if status == 503 and code in ("no_quorum", "not_ready"):
            return "not_applied", {"not_applied": code}
        if status == 503 and code == "unreachable":  # carried to a leader that died: unknown
            return "unknown", {}
        if status == 504 and code == "commit_timeout":
            return "unknown", {}
        raise AssertionError(f"{method} {url} {body}: unexpected answer {status} {answer}")


def progressed(recorder: HistoryRecorder, count: int) -> bool:
    return len(recorder.operations()) >= count


def test_history_under_repeated_leader_kills_is_linearizable(
    nodes: list[ControlPlaneNode], tmp_path: Path
) -> None:
    started = time.monotonic()
    initial: dict[str, tuple[str | None, int]] = {}
    for service in SERVICES:
        status, body = http_json(
            "GET", f"{nodes[0].api}/v1/services/{service}/primary?consistent=true"
        )
        assert status == 200, body
        initial[service] = (body["primary"], int(body["epoch"]))

    recorder = HistoryRecorder()
    clients = [Client(i, nodes, recorder, seed=1000 + i) for i in range(CLIENTS)]
    for c in clients:
        c.start()
    kills: list[dict[str, Any]] = []
    try:
        for _ in range(KILLS):
            wait_until(
                partial(progressed, recorder, len(recorder.operations()) + PHASE_OPS),
                15,
                0.01,
                "clients make progress before a kill",
            )
            leader = cluster_leader(nodes, 15)
            killed_at = time.monotonic()
            leader.proc.kill()
            new_leader = cluster_leader([n for n in nodes if n is not leader], 15)
            kills.append(
                {
                    "killed": leader.name,
                    "new_leader": new_leader.name,
                    "leader_after_s": round(time.monotonic() - killed_at, 3),
                }
            )
            leader.start(wait_ready=False)
            leader.wait_ready(30)
        wait_until(
            partial(progressed, recorder, len(recorder.operations()) + PHASE_OPS),
            15,
            0.01,
            "clients make progress after the last restart",
        )
    finally:
        for c in clients:
            c.stop_event.set()
        for c in clients:
            c.join(REQUEST_TIMEOUT + 5)
    for c in clients:
        assert c.error is None, f"{c.name}: {c.error!r}"

    recorded = recorder.operations()
    checked = [op for op in recorded if not (op.output and "not_applied" in op.output)]
    history_path = tmp_path / "history.json"
    raw_path = tmp_path / "history-raw.json"
    save_history(history_path, checked)
    raw_path.write_text(
        json.dumps(
            {"initial": initial, "kills": kills, "operations": [op.to_json() for op in recorded]},
            indent=1,
        )
    )

    keys: dict[str, KeyResult] = {}
    for service in SERVICES:
        primary, epoch = initial[service]
        model = PrimaryRegister(initial_primary=primary, initial_epoch=epoch, claims=True)
        keys[service] = check_key(service, [op for op in checked if op.key == service], model)
    verdicts = [k.ok for k in keys.values()]
    result: CheckResult[Any] = CheckResult(
        False if False in verdicts else (None if None in verdicts else True),
        "primary-register",
        keys,
    )
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(result.report(), indent=1))

    counts: dict[str, int] = {}
    for c in clients:
        for kind, n in c.counts.items():
            counts[kind] = counts.get(kind, 0) + n
    elapsed = time.monotonic() - started
    summary = (
        f"{len(recorded)} operations ({counts}), {len(checked)} checked, kills {kills}, "
        f"{elapsed:.1f} s; history {history_path}, raw {raw_path}, report {report_path}"
    )
    print(summary)
    assert result.ok is True, f"not linearizable (or no verdict): {summary}"
    assert len(kills) == KILLS and all(k["new_leader"] != k["killed"] for k in kills), kills
    # The history exercised what it claims to: writes, reads, refusals and epoch claims.
    assert counts.get("ok", 0) >= 100 and counts.get("stale", 0) >= 1, counts
    assert sum(1 for op in checked if op.name == "read" and op.output) >= 30
