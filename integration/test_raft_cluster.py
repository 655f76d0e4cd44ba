"""Issue 3's acceptance on real processes: three `repstage-mesh serve` nodes forming a Raft
cluster on loopback, real Envoys bootstrapped by `repstage-mesh bootstrap`.

- a write on any node is visible on every node at the same version, and an Envoy on node A
  applies a change written through node C;
- kill -9 the leader under continuous writes: a new leader commits within 2 s, no
  acknowledged write is lost, the Envoy that was on the killed node moves to a survivor with no
  version regression, and traffic through it never fails;
- SIGSTOP two of three: the survivor refuses writes (503/504 with a clear message) within a
  bounded time and keeps serving xDS; after SIGCONT the cluster heals;
- stop all three and start them again: services, epochs and versions are intact.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    ControlPlaneNode,
    Envoy,
    NamedTcpBackend,
    ask_once,
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

SERVICE = "orders"  # switched between members a and b by the tests
STABLE = "stable"  # never switched: the traffic probe during a kill goes through it
PRIMARY = f"/v1/services/{SERVICE}/primary"
NEW_LEADER_WITHIN = 2.0  # the acceptance bound: kill -9 -> next committed write
COMMIT_TIMEOUT = 5.0  # the API's commit timeout (ApiSettings.commit_timeout)


def version_index(version_info: str) -> int:
    """The Raft index in a version_info we produced ("<index>-<digest>"); -1 for none."""
    return int(version_info.split("-", 1)[0]) if version_info else -1


def envoy_version(envoy: Envoy) -> int:
    """The newest Raft index among the versions Envoy's config_dump reports (a switch of
    primary changes some types only)."""
    return max(version_index(v) for v in envoy.versions().values())


def no_regression(before: dict[str, str], after: dict[str, str]) -> bool:
    """Every xDS type's version in `after` is at the same or a later Raft index."""
    return all(version_index(after.get(k, "")) >= version_index(v) for k, v in before.items())


@dataclass
class Rig:
    wd: Path
    nodes: list[ControlPlaneNode]
    port: int  # SERVICE's listener on Envoy
    stable_port: int  # STABLE's listener on Envoy
    envoys: list[Envoy] = field(default_factory=list)

    def live(self) -> list[ControlPlaneNode]:
        return [n for n in self.nodes if n.proc.alive()]

    def envoy(self, name: str, xds: list[ControlPlaneNode]) -> Envoy:
        envoy = Envoy(self.wd, name, [n.xds_address for n in xds])
        self.envoys.append(envoy)
        envoy.start()
        return envoy

    def serving(
        self, envoy: Envoy, nodes: list[ControlPlaneNode] | None = None
    ) -> list[ControlPlaneNode]:
        """The nodes (default: the live ones) whose /v1/proxies list `envoy` as connected."""
        out = []
        for node in self.live() if nodes is None else nodes:
            status, proxies = http_json("GET", f"{node.api}/v1/proxies", timeout=1.0)
            if status == 200 and any(
                p["node_id"] == envoy.node_id and p["connected"] for p in proxies
            ):
                out.append(node)
        return out

    def envoy_on(self, target: ControlPlaneNode, name: str) -> Envoy:
        """An Envoy whose bootstrap lists every node but whose ADS stream is on `target`.

        Envoy picks the xDS host itself (round robin from a random start, and all hosts in
        panic until their first health check), so each try lands on `target` with about 1 in 3
        odds: retry up to 24 times ((2/3)^24 < 1e-4 of failing)."""
        for attempt in range(24):
            k = (self.nodes.index(target) - 1 + attempt) % len(self.nodes)
            envoy = self.envoy(f"{name}-{attempt}", self.nodes[k:] + self.nodes[:k])
            on = wait_until(partial(self.serving, envoy), 20, 0.05, f"{envoy.node_id} on a node")
            if on == [target]:
                return envoy
            envoy.stop()
            self.envoys.remove(envoy)
        raise AssertionError(f"no Envoy landed on {target.name}")

    def converged(self, nodes: list[ControlPlaneNode] | None = None) -> dict[str, Any] | None:
        """The common view when every given node has applied the same state: same applied
        index, snapshot_version, and SERVICE primary/epoch. None otherwise."""
        views = []
        for node in nodes or self.live():
            status, cluster = http_json("GET", f"{node.api}/v1/cluster", timeout=1.0)
            status2, svc = http_json("GET", f"{node.api}/v1/services/{SERVICE}", timeout=1.0)
            if status != 200 or status2 != 200:
                return None
            views.append(
                {
                    "state_index": cluster["state_index"],
                    "snapshot_version": cluster["snapshot_version"],
                    "primary": svc["primary"],
                    "epoch": svc["epoch"],
                    "service_applied_index": svc["applied_index"],
                }
            )
        first = views[0]
        return first if all(v == first for v in views) else None

    def consistent_primary(self, node: ControlPlaneNode) -> dict[str, Any]:
        status, body = http_json("GET", f"{node.api}{PRIMARY}?consistent=true", timeout=8.0)
        assert status == 200, (node.name, status, body)
        return dict(body)


def converged_at(
    rig: Rig, epoch: int, nodes: list[ControlPlaneNode] | None = None
) -> dict[str, Any] | None:
    """The common view once the nodes have converged on SERVICE at `epoch`."""
    view = rig.converged(nodes)
    return view if view is not None and view["epoch"] == epoch else None


def member(name: str, backend: NamedTcpBackend) -> dict[str, Any]:
    return {"name": name, "address": "127.0.0.1", "port": backend.port}


@pytest.fixture
def rig() -> Iterator[Rig]:
    with (
        workdir() as wd,
        NamedTcpBackend("a") as a,
        NamedTcpBackend("b") as b,
        NamedTcpBackend("s") as s,
    ):
        port, stable_port = free_low_port(), free_low_port()
        base = {
            "services": [
                {
                    "name": SERVICE,
                    "protocol": "tcp",
                    "listen_port": port,
                    "members": [member("a", a), member("b", b)],
                    "primary": "a",
                },
                {
                    "name": STABLE,
                    "protocol": "tcp",
                    "listen_port": stable_port,
                    "members": [member("s", s)],
                    "primary": "s",
                },
            ],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        r = Rig(wd, raft_cluster(wd, 3, base), port, stable_port)
        try:
            start_cluster(r.nodes)
            wait_until(r.converged, 10, 0.05, "the three nodes converge")
            yield r
        finally:
            for envoy in r.envoys:
                envoy.stop()
            for node in r.nodes:
                node.stop()


def test_a_write_on_any_node_is_visible_on_every_node_and_reaches_an_envoy_on_another(
    rig: Rig,
) -> None:
    node_a, node_b, node_c = rig.nodes
    envoy = rig.envoy("edge-on-a", [node_a])  # bootstrapped with node A only
    wait_until(lambda: rig.serving(envoy) == [node_a], 20, 0.05, "envoy on node A")
    wait_until(lambda: ask_once(rig.port).startswith("a:"), 20, 0.01, "traffic reaches a")

    previous_epoch = rig.converged()["epoch"]  # type: ignore[index]
    for writer, target in ((node_a, "b"), (node_b, "a"), (node_c, "b")):
        status, body = writer.call("POST", PRIMARY, {"member": target})
        assert status == 200, (writer.name, body)
        assert body["primary"] == target and body["changed"] is True, body
        assert body["epoch"] > previous_epoch, (previous_epoch, body)
        previous_epoch = body["epoch"]
        view = wait_until(
            partial(converged_at, rig, body["epoch"]),
            10,
            0.02,
            f"every node applies the write made through {writer.name}",
        )
        assert view["primary"] == target, view
        # versions are Raft indexes: the snapshot every node renders is named by the change
        assert view["snapshot_version"] == str(body["epoch"]), (view, body)
        for node in rig.nodes:
            assert rig.consistent_primary(node)["epoch"] == body["epoch"]

    # The last write went through node C; the Envoy on node A applies it.
    wait_until(lambda: ask_once(rig.port).startswith("b:"), 10, 0.01, "traffic moves to b")
    wait_until(
        lambda: envoy_version(envoy) == previous_epoch,
        10,
        0.02,
        "envoy's config_dump names the version of the write made through node C",
    )
    assert rig.serving(envoy) == [node_a]


@dataclass
class Ack:
    node: str
    member: str | None
    status: int | None  # None: no answer (timeout, connection refused)
    body: Any
    call: float
    ret: float


class Writer(threading.Thread):
    """POSTs primary alternating a/b through the live nodes, with a bounded timeout."""

    def __init__(self, rig: Rig, name: str, offset: int) -> None:
        super().__init__(name=name, daemon=True)
        self.rig = rig
        self.offset = offset
        self.acks: list[Ack] = []
        self.stop_event = threading.Event()
        self.skip: set[str] = set()  # node names not to write through (killed)

    def run(self) -> None:
        i = self.offset
        while not self.stop_event.is_set():
            choices = [n for n in self.rig.nodes if n.name not in self.skip]
            node = choices[i % len(choices)]
            target = "ab"[i % 2]
            i += 1
            call = time.monotonic()
            try:
                status, body = http_json(  # fence false: one commit per write (this tests Raft)
                    "POST", f"{node.api}{PRIMARY}", {"member": target, "fence": False},
                    timeout=COMMIT_TIMEOUT + 2,
                )
            except OSError as exc:
                status, body = None, repr(exc)
            self.acks.append(Ack(node.name, target, status, body, call, time.monotonic()))
            if status != 200:
                self.stop_event.wait(0.01)  # back-off after a failure, not synchronisation


class Traffic(threading.Thread):
    """One request on a fresh connection through Envoy, in a loop; counts what fails."""

    def __init__(self, port: int, expect: str) -> None:
        super().__init__(name=f"traffic-{port}", daemon=True)
        self.port = port
        self.expect = expect
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set():
            n += 1
            try:
                answer = ask_once(self.port, f"t{n}", timeout=2.0)
                if answer == f"{self.expect}:t{n}":
                    self.ok += 1
                else:
                    self.failures.append((time.monotonic(), f"unexpected answer {answer!r}"))
            except OSError as exc:
                self.failures.append((time.monotonic(), repr(exc)))


def check_acks(acks: list[Ack], final: dict[str, Any]) -> dict[str, int]:
    """No acknowledged write is lost or reordered; returns counts by outcome."""
    done = [a for a in acks if a.status == 200]
    assert done, "no write was acknowledged"
    by_epoch: dict[int, str | None] = {}
    for ack in done:
        epoch = int(ack.body["epoch"])
        assert ack.body["primary"] == ack.member, ack
        # one primary per epoch
        assert by_epoch.setdefault(epoch, ack.member) == ack.member, (epoch, by_epoch[epoch], ack)
        assert final["epoch"] >= epoch, ("an acknowledged epoch is above the final one", ack, final)
    # an acknowledgement that came before another write was sent is not overtaken by it
    ordered = sorted(done, key=lambda a: a.ret)
    for earlier in ordered:
        for later in done:
            if later.call > earlier.ret:
                assert later.body["epoch"] >= earlier.body["epoch"], (earlier, later)
    unknown = [a for a in acks if a.status is None or a.status == 504]
    refused = [a for a in acks if a.status == 503]
    # 409 conflict: the other writer's change of the service was running; refused, nothing changed
    busy = [a for a in acks if a.status == 409 and a.body["error"]["code"] == "conflict"]
    others = [a for a in acks if a.status not in (None, 200, 503, 504) and a not in busy]
    assert not others, others[:5]
    for ack in refused + [a for a in unknown if a.status == 504]:
        # not_ready: a new leader that has not started deciding yet (announces run as its plans)
        assert ack.body["error"]["code"] in ("no_quorum", "not_ready", "commit_timeout"), ack
    return {"acked": len(done), "unknown": len(unknown), "refused": len(refused)}


def test_kill_leader_under_writes_loses_nothing_and_envoy_moves_without_regression(
    rig: Rig,
) -> None:
    leader = cluster_leader(rig.nodes)
    envoy = rig.envoy_on(leader, "edge-all")
    wait_until(lambda: ask_once(rig.stable_port).startswith("s:"), 20, 0.01, "stable reachable")
    wait_until(lambda: ask_once(rig.port).startswith("a:"), 20, 0.01, "orders reachable")

    writers = [Writer(rig, f"writer-{i}", i) for i in range(2)]
    traffic = Traffic(rig.stable_port, "s")
    threads: list[Writer | Traffic] = [*writers, traffic]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: sum(a.status == 200 for w in writers for a in w.acks) >= 20,
            20,
            0.01,
            "writes committing before the kill",
        )
        wait_until(lambda: traffic.ok >= 20, 20, 0.01, "traffic flowing before the kill")
        before = envoy.versions()
        for w in writers:
            w.skip.add(leader.name)
        killed_at = time.monotonic()
        leader.proc.kill()  # SIGKILL
        survivors = rig.live()

        def committed_after_kill() -> float | None:
            after = [
                a.ret for w in writers for a in w.acks if a.status == 200 and a.call > killed_at
            ]
            return min(after) - killed_at if after else None

        recovery = wait_until(committed_after_kill, 15, 0.01, "a write commits after the kill")
        new_leader = cluster_leader(survivors)
        assert new_leader is not leader
        moved_to = wait_until(
            lambda: rig.serving(envoy), 20, 0.05, "envoy reconnects to a survivor"
        )
        moved_after = time.monotonic() - killed_at
        on_reconnect = envoy.versions()
        assert no_regression(before, on_reconnect), (before, on_reconnect)
        wait_until(
            lambda: (
                sum(
                    a.status == 200 and a.call > killed_at + recovery
                    for w in writers
                    for a in w.acks
                )
                >= 10
            ),
            20,
            0.01,
            "writes keep committing after the new leader",
        )
    finally:
        for t in threads:
            t.stop_event.set()
        for t in threads:
            t.join(COMMIT_TIMEOUT + 5)

    print(
        f"kill -9 leader -> next committed write: {recovery * 1000:.0f} ms; "
        f"envoy on {moved_to[0].name} after {moved_after * 1000:.0f} ms"
    )
    assert recovery < NEW_LEADER_WITHIN, f"first commit {recovery:.2f} s after the kill"
    assert moved_to[0] in survivors

    # Quiet point: every survivor has applied the same state; it holds every acknowledged write.
    final = wait_until(rig.converged, 10, 0.02, "the survivors converge after the writers stop")
    counts = check_acks([a for w in writers for a in w.acks], final)
    print(f"writes: {counts}")
    last = max(
        (a for w in writers for a in w.acks if a.status == 200), key=lambda a: a.body["epoch"]
    )
    read = rig.consistent_primary(survivors[0])
    if counts["unknown"] == 0:
        assert (read["primary"], read["epoch"]) == (last.member, last.body["epoch"]), (read, last)
    else:  # a write whose answer was lost may have committed after the last acknowledged one
        assert read["epoch"] >= last.body["epoch"], (read, last)
    # The last acknowledged write before a quiet point is what every consistent read returns.
    status, body = survivors[1].call("POST", PRIMARY, {"member": "a"})
    assert status == 200, body
    for node in survivors:
        got = rig.consistent_primary(node)
        assert (got["primary"], got["epoch"]) == ("a", body["epoch"]), (node.name, got, body)

    # The Envoy that was on the killed node: same or newer versions, the new config applied.
    after = envoy.versions()
    assert no_regression(before, after), (before, after)
    wait_until(
        lambda: envoy_version(envoy) == body["epoch"],
        10,
        0.02,
        "the moved Envoy applies the latest write",
    )
    wait_until(lambda: ask_once(rig.port).startswith("a:"), 10, 0.01, "orders traffic on a")
    assert traffic.ok > 0 and traffic.failures == [], (traffic.ok, traffic.failures[:5])

    # The killed node comes back and catches up.
    leader.start(wait_ready=False)
    leader.wait_ready(20)
    wait_until(lambda: rig.converged(rig.nodes), 15, 0.02, "the restarted node catches up")


@pytest.mark.parametrize("survivor_role", ["leader", "follower"])
def test_sigstop_two_of_three_refuses_writes_keeps_xds_then_heals(
    rig: Rig, survivor_role: str
) -> None:
    leader = cluster_leader(rig.nodes)
    followers = [n for n in rig.nodes if n is not leader]
    survivor = leader if survivor_role == "leader" else followers[0]
    paused = [n for n in rig.nodes if n is not survivor]
    envoy = rig.envoy("edge-survivor", [survivor])
    wait_until(lambda: rig.serving(envoy) == [survivor], 20, 0.05, "envoy on the survivor")
    wait_until(lambda: ask_once(rig.port).startswith("a:"), 20, 0.01, "traffic reaches a")
    before = wait_until(rig.converged, 10, 0.02, "converged before the pause")
    versions_before = envoy.versions()

    for node in paused:
        node.proc.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body = survivor.call("POST", PRIMARY, {"member": "b"})
        took = time.monotonic() - started
        print(
            f"write on the survivor ({survivor_role}) without quorum: {status} in {took:.2f} s: {body}"
        )
        assert status in (503, 504), (status, body)
        assert took < COMMIT_TIMEOUT + 2.0, took
        error = body["error"]
        if status == 503:
            assert error["code"] == "no_quorum" and "nothing changed" in error["message"], error
        else:
            assert error["code"] == "commit_timeout", error
            assert "may or may not have been applied" in error["message"], error
        # A later write is refused too (by then the node knows it has no majority).
        status2, body2 = survivor.call("POST", PRIMARY, {"member": "b"})
        assert status2 in (503, 504), (status2, body2)

        # xDS keeps serving the last committed routes, never new ones.
        assert rig.serving(envoy, [survivor]) == [survivor]
        cluster = survivor.get("/v1/cluster")
        assert cluster["snapshot_version"] == before["snapshot_version"], (cluster, before)
        assert survivor.get(f"/v1/services/{SERVICE}")["primary"] == "a"
        assert ask_once(rig.port).startswith("a:")
        assert envoy.versions() == versions_before
        assert cluster["has_quorum"] is False or cluster["leader"] is None, cluster
    finally:
        for node in paused:
            node.proc.signal(signal.SIGCONT)

    # Heal: a write succeeds (retried while the cluster elects) and is visible everywhere.
    def healed_write() -> dict[str, Any] | None:
        code, answer = survivor.call("POST", PRIMARY, {"member": "b"})
        return dict(answer) if code == 200 else None

    healed = wait_until(healed_write, 20, 0.1, "a write commits after SIGCONT")
    if status == 503 and status2 == 503:  # "nothing changed": the refused writes never apply
        assert healed["changed"] is True and healed["previous_primary"] == "a", healed
    view = wait_until(
        lambda: converged_at(rig, healed["epoch"], rig.nodes),
        15,
        0.02,
        "all three nodes apply the write made after healing",
    )
    assert view["primary"] == "b" and view["snapshot_version"] == str(healed["epoch"]), view
    wait_until(lambda: ask_once(rig.port).startswith("b:"), 10, 0.01, "traffic moves to b")


def test_full_cluster_restart_keeps_state_and_versions(rig: Rig) -> None:
    node_a, node_b, node_c = rig.nodes
    for writer, target in ((node_b, "b"), (node_c, "a"), (node_a, "b")):
        status, body = writer.call("POST", PRIMARY, {"member": target})
        assert status == 200, body
    status, body = node_c.call("POST", f"/v1/services/{STABLE}/primary", {"member": None})
    assert status == 200, body
    envoy = rig.envoy("edge-restart", rig.nodes)
    wait_until(lambda: rig.serving(envoy), 20, 0.05, "envoy connected")
    wait_until(lambda: ask_once(rig.port).startswith("b:"), 20, 0.01, "traffic reaches b")
    before = wait_until(rig.converged, 10, 0.02, "converged before the restart")
    services_before = {
        s["name"]: (s["primary"], s["epoch"], s["changed_at"], s["spec"])
        for s in node_a.get("/v1/services")["services"]
    }
    wait_until(
        lambda: envoy_version(envoy) == int(before["snapshot_version"]),
        10,
        0.02,
        "envoy applied the last version",
    )
    versions_before = envoy.versions()

    for node in rig.nodes:
        node.stop()
    # With every control-plane node down, Envoy keeps its config and keeps routing.
    assert ask_once(rig.port).startswith("b:")
    start_cluster(rig.nodes)

    after = wait_until(rig.converged, 15, 0.02, "converged after the restart")
    assert after["snapshot_version"] == before["snapshot_version"], (before, after)
    assert (after["primary"], after["epoch"]) == (before["primary"], before["epoch"])
    assert after["state_index"] >= before["state_index"]
    for node in rig.nodes:
        services = {
            s["name"]: (s["primary"], s["epoch"], s["changed_at"], s["spec"])
            for s in node.get("/v1/services")["services"]
        }
        assert services == services_before, node.name
    wait_until(lambda: rig.serving(envoy), 20, 0.05, "envoy reconnects after the restart")
    wait_until(
        lambda: all(
            p["synced"]
            for n in rig.serving(envoy)
            for p in n.get("/v1/proxies")
            if p["node_id"] == envoy.node_id and p["connected"]
        ),
        10,
        0.02,
        "envoy synced after the restart",
    )
    versions_after = envoy.versions()
    assert no_regression(versions_before, versions_after), (versions_before, versions_after)
    assert versions_after == versions_before  # same state: the very same versions
    assert ask_once(rig.port).startswith("b:")
    with pytest.raises(OSError):
        ask_once(rig.stable_port, timeout=1.0)  # still no primary: fail closed after restart
    # and the restarted cluster takes writes
    status, body = node_b.call("POST", PRIMARY, {"member": "a"})
    assert status == 200 and body["epoch"] > before["epoch"], body
