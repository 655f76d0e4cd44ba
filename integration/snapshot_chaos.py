"""kill -9 of the Redis primary at one phase of a snapshot (issue 16), on a real mesh: three
`serve` nodes deciding in orchestrate mode (`cluster3.py`), two real Envoys whose admins prove
the drain, Redis 7 with a primary `r0` and replicas `r1`, `r2`, and a writer through the
primary port. Used by `test_snapshot_chaos.py` (the 20-run chaos suite and one lean case).

One run: a snapshot of a replica (`r1` or `r2`) or of the primary; the primary is killed
when the snapshot reaches `phase`:

- `intent`: killed first, the snapshot asked at once (its intent commits before the failover's);
- `draining`: a client holds a connection to the member through the read port (the drain waits
  until Envoy counts it closed);
- `pre_hook` / `post_hook`: the hook runs (it touches a marker file, then sleeps);
- `taking`: the member's RDB transfer runs (Redis' `rdb-key-save-delay` slows the fork's save);
- `returning`: the post-hook has ended (the completion's commit is on its way).

A watcher samples every Envoy's read cluster (admin `/clusters`) and the snapshot every 20 ms;
the failover record's `fenced` event (the failover's first commit, the leader's monotonic clock,
this host's) is the zero of "back in the pool". A snapshot that completed counts as completed
from a demoted member unless it was seen completed before that commit.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from repstage_mesh.cli.workload import RedisWriter

from .cluster3 import Cluster3, cluster3
from .databases import RedisGroup, redis_group
from .harness import ControlPlaneNode, Envoy, free_low_port, http_json, wait_until

PHASES = ("intent", "draining", "pre_hook", "taking", "post_hook", "returning")
ROLES = ("replica", "primary")
HOLD = 3.0  # seconds a hook sleeps (an abort never cuts a hook short: the undo waits for it)
TAKE_HOLD = 10.0  # seconds the slowed take would last (an abort cancels it: a margin, not a wait)
KEYS = 3000  # with rdb-key-save-delay TAKE_HOLD / KEYS s per key
GENEROUS = 30.0

__all__ = ["GENEROUS", "PHASES", "ROLES", "RunResult", "SnapshotMesh", "one_run", "replicas_seen", "snapshot_mesh"]


@dataclass
class SnapshotMesh:
    c: Cluster3
    group: RedisGroup
    envoys: list[Envoy]
    listen_port: int
    read_port: int
    marks: Path

    def leader(self) -> ControlPlaneNode:
        return self.c.leader(timeout=GENEROUS)

    def snapshot(self, node: ControlPlaneNode, snapshot_id: str) -> dict[str, Any] | None:
        status, body = http_json("GET", f"{node.api}/v1/services/cache/snapshots/{snapshot_id}", timeout=2.0)
        return dict(body) if status == 200 else None

    def listed(self, member: str) -> bool | None:
        """Is `member` in every Envoy's read cluster, not draining? None: an admin did not answer."""
        line = f"cache-read::127.0.0.1:{self.group.port(member)}::health_flags::healthy"
        texts = [envoy.admin("/clusters") for envoy in self.envoys]
        if any(t is None for t in texts):
            return None
        return all(line in (t or "").splitlines() for t in texts)


def _hooks(marks: Path, phase: str) -> dict[str, Any]:
    pre_sleep = HOLD if phase == "pre_hook" else 0
    post_sleep = HOLD if phase == "post_hook" else 0
    return {
        "pre": {"command": ["sh", "-c", f"touch {marks}/pre-{{snapshot}}; sleep {pre_sleep}"], "timeout": 10},
        "post": {"command": ["sh", "-c", f"touch {marks}/post-{{snapshot}}; sleep {post_sleep}; "
                                         f"touch {marks}/postdone-{{snapshot}}"], "timeout": 10},
    }


@contextlib.contextmanager
def snapshot_mesh(phase: str) -> Iterator[SnapshotMesh]:
    with redis_group(replicas=2) as group:
        listen, read = free_low_port(), free_low_port()
        members = [{"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in group.names]
        service = {"name": "cache", "protocol": "redis", "listen_port": listen, "read_port": read,
                   "members": members, "primary": "r0",
                   "leadership": {"source": "probe", "mode": "orchestrate", "min_failover_interval": 1.0}}
        with cluster3([service], start=False) as c:
            envoys = [c.envoy(f"edge-{i}", start=False) for i in (1, 2)]
            marks = c.wd / "marks"
            marks.mkdir()
            for node in c.nodes:
                node.config["snapshots"] = {
                    "envoy_admins": [f"127.0.0.1:{e.admin_port}" for e in envoys], "drain_timeout": 10,
                    "take_timeout": 30, "pre_hook": "pre", "post_hook": "post",
                }
                node.config["hooks"] = _hooks(marks, phase)
            c.start()
            m = SnapshotMesh(c, group, envoys, listen, read, marks)
            for name in group.names:
                wait_until(lambda n=name: m.listed(n), GENEROUS, 0.05, f"{name} in every Envoy's read pool")
            client = redis.Redis(host="127.0.0.1", port=listen, socket_timeout=1)
            wait_until(lambda: client.set("probe", 1), GENEROUS, 0.05, "writes through Envoy reach r0")
            client.close()
            leader = m.leader()
            wait_until(lambda: replicas_seen(leader), GENEROUS, 0.05, "the leader's probes see both replicas")
            yield m


def replicas_seen(leader: ControlPlaneNode) -> bool:
    status, body = http_json("GET", f"{leader.api}/v1/members", timeout=2.0)
    if status != 200:
        return False
    health = {row["member"]: row["health"] for row in body["members"]}
    return health.get("r0") == "primary" and health.get("r1") == health.get("r2") == "replica"


@dataclass
class Watcher:
    """Samples (monotonic time, member listed in every read cluster, snapshot status) every 20 ms."""

    m: SnapshotMesh
    member: str
    node: ControlPlaneNode
    snapshot_id: str = ""
    samples: list[tuple[float, bool | None, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        while not self._stop.is_set():
            listed = self.m.listed(self.member)
            entry = self.m.snapshot(self.node, self.snapshot_id) if self.snapshot_id else None
            self.samples.append((time.monotonic(), listed, entry["status"] if entry else ""))
            self._stop.wait(0.02)  # the sampling period

    def __enter__(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def back_after(self, t0: float) -> float:
        """Seconds from t0 until the member was in every read cluster for good (0: it was at t0)."""
        known = [(t, listed) for t, listed, _ in self.samples if listed is not None]
        last_out = max((t for t, listed in known if not listed), default=None)
        if last_out is None or last_out < t0:
            return 0.0
        back = min((t for t, listed in known if listed and t > last_out), default=None)
        assert back is not None, "the member never came back in every read cluster"
        return back - t0

    def back(self) -> bool:
        """The newest known sample has the member in every read cluster."""
        known = [listed for _, listed, _ in list(self.samples) if listed is not None]
        return bool(known) and bool(known[-1])

    def completed_at(self) -> float | None:
        return min((t for t, _, status in self.samples if status == "completed"), default=None)


@dataclass
class RunResult:
    phase: str
    role: str  # replica | primary
    status: str  # the snapshot's end: completed | aborted | failed | refused (no intent)
    landed: str  # the last step before the failover's commit landed ("-" if none)
    back_s: float  # the failover's commit -> the member in every Envoy's read cluster
    completed_from_demoted: bool
    abort_in_fence: bool | None  # aborted in the failover's own commit (None: not aborted)
    writes: int
    promoted_member: bool = False  # the failover promoted the snapshot's own member
    member: str = ""
    takeover: bool = False  # another node finished the snapshot (the Raft leader changed)


def _hold_connection(m: SnapshotMesh, member: str) -> redis.Redis:
    """A client connected through the read port to `member` (new connections until one lands)."""
    port, others = m.group.port(member), []
    try:
        for _ in range(60):
            client = redis.Redis(host="127.0.0.1", port=m.read_port, single_connection_client=True, socket_timeout=2)
            if int(client.info("server")["tcp_port"]) == port:
                return client
            others.append(client)
        raise AssertionError(f"no connection through the read port reached {member}")
    finally:
        for other in others:
            other.close()


def _reached(m: SnapshotMesh, leader: ControlPlaneNode, phase: str, snapshot_id: str, member: str) -> bool:
    entry = m.snapshot(leader, snapshot_id)
    if entry is not None and entry["status"] != "running" and phase != "returning":
        raise AssertionError(f"the snapshot ended before its {phase} (nothing was killed yet): {entry}")
    if phase == "draining":
        return bool(entry and entry["pool"] == "draining")
    if phase == "taking":
        info = m.group.client(member).info("persistence")
        return bool(int(info.get("rdb_bgsave_in_progress", 0)))  # the fork streaming the RDB
    marker = {"pre_hook": "pre", "post_hook": "post", "returning": "postdone"}[phase]
    return (m.marks / f"{marker}-{snapshot_id}").exists()


def _fence(leader: ControlPlaneNode, after: float) -> dict[str, Any] | None:
    """The failover record of the kill: its `fenced` event (at, epoch = the Raft index)."""
    status, body = http_json("GET", f"{leader.api}/v1/failovers", timeout=2.0)
    if status != 200:
        return None
    for record in body["failovers"]:
        for event in record["timeline"]:
            if record["service"] == "cache" and event["name"] == "fenced" and event["at"] >= after:
                return {**event, "new_primary": record["new_primary"]}
    return None


def _ended(m: SnapshotMesh, leader: ControlPlaneNode, snapshot_id: str) -> dict[str, Any]:
    """The snapshot ended with its member in the pool, then nothing owed; else an error with the
    story. A node that took the snapshot over (the Raft leader changed under load) runs the owed
    post-hook only once the old leader's lease ended (README, "Snapshots"): that wait is allowed."""
    def ended(undone: bool) -> dict[str, Any] | None:
        e = m.snapshot(leader, snapshot_id)
        return e if e and e["status"] != "running" and e["pool"] == "in" and (not undone or not e["undo"]) else None

    try:
        entry = dict(wait_until(lambda: ended(False), GENEROUS, 0.05, "the snapshot ends, its member in the pool"))
        wait = max(GENEROUS, entry["lease_until"] - time.time() + GENEROUS)
        return dict(wait_until(lambda: ended(True), wait, 0.05, "the snapshot's undo is done"))
    except AssertionError as exc:
        logs = "\n".join(f"--- {n.name}\n" + "\n".join(line for line in n.proc.log().splitlines()
                                                       if "snapshot" in line or "leader" in line.lower())
                         for n in m.c.nodes)
        raise AssertionError(f"{exc}\nentry: {m.snapshot(leader, snapshot_id)}\n{logs}") from None


def one_run(m: SnapshotMesh, phase: str, role: str, replica: str = "r1") -> RunResult:
    """`replica`: the member a replica snapshot takes (the failover promotes r1 or r2)."""
    member = replica if role == "replica" else "r0"
    ask = {"member": replica if role == "replica" else "primary"}
    leader = m.leader()
    with m.group.client("r0") as primary:
        primary.mset({f"k:{i}": i for i in range(KEYS)})
    m.group.wait_in_sync("r0", ["r1", "r2"])
    if phase == "taking":
        m.group.command(member, "CONFIG", "SET", "rdb-key-save-delay", str(int(TAKE_HOLD / KEYS * 1e6)))
    held = _hold_connection(m, member) if phase == "draining" else None
    watcher = Watcher(m, member, leader)
    with contextlib.ExitStack() as closing, RedisWriter(m.listen_port) as writer, watcher:
        if held is not None:
            closing.callback(held.close)
        wait_until(lambda: len(writer.acked) > 20, GENEROUS, 0.01, "the writer runs")
        killed_at = time.monotonic()
        if phase == "intent":
            m.group.kill("r0")
        status, started = http_json("POST", f"{leader.api}/v1/services/cache/snapshots", ask, timeout=10.0)
        if status != 202:  # the failover's commit came first: no intent, nothing to fence
            assert phase == "intent" and status == 409, (status, started)
            fence = wait_until(lambda: _fence(leader, killed_at), GENEROUS, 0.05, "the failover's commit")
            return RunResult(phase, role, "refused", "-", 0.0, False, None, len(writer.acked),
                             fence["new_primary"] == member, member)
        snapshot_id = started["id"]
        assert started["member"] == member, started
        watcher.snapshot_id = snapshot_id
        if phase != "intent":
            try:
                wait_until(lambda: _reached(m, leader, phase, snapshot_id, member), GENEROUS, 0.01, f"the snapshot {phase}")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nentry: {m.snapshot(leader, snapshot_id)}") from None
            killed_at = time.monotonic()
            m.group.kill("r0")
        fence = wait_until(lambda: _fence(leader, killed_at), GENEROUS, 0.05, "the failover's commit")
        entry = _ended(m, leader, snapshot_id)
        wait_until(watcher.back, GENEROUS, 0.02, f"{member} back in every Envoy's read cluster")
    completed_at = watcher.completed_at()
    completed = entry["status"] == "completed"
    aborted = re.search(r"aborted at Raft index (\d+)", entry["error"])
    wall_fence = time.time() - (time.monotonic() - fence["at"])  # the fence on the wall clock
    landed = [s["name"] for s in entry["steps"] if s["at"] <= wall_fence and s["name"] != "aborted"]
    return RunResult(
        phase, role, entry["status"], landed[-1] if landed else "-", watcher.back_after(fence["at"]),
        completed and (completed_at is None or completed_at >= fence["at"]),
        None if aborted is None else int(aborted.group(1)) == int(fence["detail"]["epoch"]),
        len(writer.acked), fence["new_primary"] == member, member,
        any(s["name"] == "takeover" for s in entry["steps"]),
    )


def table(results: list[RunResult]) -> str:
    lines = ["| kill -9 of the primary at | snapshot of | runs | aborted | failed | completed (before the failover) "
             "| completed from a demoted member | aborted in the failover's own commit "
             "| failover commit -> back in every read pool: max | failover promoted the snapshot's member "
             "| finished by a new Raft leader | last step recorded before the failover's commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for phase in PHASES:
        for role in ROLES:
            rs = [r for r in results if r.phase == phase and r.role == role]
            if not rs:
                continue
            count = {s: sum(r.status == s for r in rs) for s in ("aborted", "failed", "completed", "refused")}
            fenced = [r.abort_in_fence for r in rs if r.abort_in_fence is not None]
            refused = f" (+{count['refused']} refused at the intent)" if count["refused"] else ""
            members = "/".join(sorted({r.member for r in rs}))
            lines.append(
                f"| {phase} | {role} ({members}) | {len(rs)} | {count['aborted']}{refused} | {count['failed']} "
                f"| {count['completed']} | {sum(r.completed_from_demoted for r in rs)} "
                f"| {sum(fenced)} of {len(fenced)} | {max(r.back_s for r in rs) * 1000:.0f} ms "
                f"| {sum(r.promoted_member for r in rs)} | {sum(r.takeover for r in rs)} "
                f"| {', '.join(sorted({r.landed for r in rs}))} |")
    return "\n".join(lines)
