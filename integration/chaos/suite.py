"""The chaos rounds: one random fault per round, injected under continuous traffic, healed,
and the mesh waited on until it has recovered; then the whole recording is judged.

Each round has its own seed (printed): `random.Random(seed)` picks the fault, its target and
how long it lasts, so `CHAOS_SEEDS=<seed>` replays that round. Faults:

    kill9_leader / kill9_follower       kill -9 of a `serve` node, restarted after the hold
    stop_leader / stop_follower         SIGSTOP, SIGCONT after the hold
    partition_cp                        the Raft leader cut from both followers (packets dropped)
    partition_follower                  a follower cut from the leader and the other follower
    partition_leader_replica            the Raft leader cut from a Redis replica
    kill9_redis_primary                 kill -9 of the Redis primary; restarted (empty) once the
                                        mesh has failed over; the control plane must repoint it

Recovered: every node names the same leader; the committed `cache` primary is a live Redis
master and every other live member replicates it; a write through every Envoy and a control
write, both sent after the heal, were acknowledged.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from integration.chaos.mesh import REDIS, ChaosMesh
from integration.chaos.workload import ControlWriter, DataWriter, PrimaryWatcher
from integration.harness import wait_until
from integration.history import HistoryRecorder

FAULTS = ("kill9_leader", "kill9_follower", "stop_leader", "stop_follower", "partition_cp",
          "partition_follower", "partition_leader_replica", "kill9_redis_primary")  # fmt: skip
RECOVER_TIMEOUT = 60.0


@dataclass
class Round:
    index: int
    seed: int
    fault: str
    target: str
    injected: float
    healed: float = 0.0
    recovered: bool = False
    data_rto: float | None = None  # until a write through every Envoy was acknowledged again
    control_rto: float | None = None  # until a control write was acknowledged again
    note: str = ""


class Chaos:
    def __init__(self, mesh: ChaosMesh, seed: int) -> None:
        self.mesh = mesh
        self.recorder = HistoryRecorder()
        ips = mesh.member_of_ip()
        self.data = [DataWriter(e.host.index, e.host.address, ips) for e in mesh.envoys]
        self.control = [ControlWriter(i, mesh, self.recorder, seed + i) for i in range(2)]
        self.watcher = PrimaryWatcher(mesh)
        self.rounds: list[Round] = []

    @property
    def threads(self) -> list[DataWriter | ControlWriter | PrimaryWatcher]:
        return [*self.data, *self.control, self.watcher]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        started = time.monotonic()
        wait_until(lambda: all(w.acked_after(started) for w in self.data), 60, 0.05,
                   "a write through every Envoy")  # fmt: skip

    def stop(self) -> None:
        for thread in self.threads:
            thread.stop()
        for thread in self.threads:
            thread.join(30)

    # --- one round -----------------------------------------------------------------------------

    def run_round(self, index: int, seed: int) -> Round:
        rng = random.Random(seed)
        fault = rng.choice(FAULTS)
        hold = rng.uniform(1.0, 3.0)
        injected = time.monotonic()
        heal, target = self._inject(fault, rng)
        rnd = Round(index, seed, fault, target, injected)
        print(f"chaos round {index}: seed {seed} fault {fault} target {target} hold {hold:.1f} s",
              flush=True)  # fmt: skip
        try:
            time.sleep(hold)  # the fault lasts this long: it is the experiment, not a wait
        finally:
            heal()
        rnd.healed = time.monotonic()
        try:
            self._await_recovery(rnd)
            rnd.recovered = True
        except AssertionError as exc:
            rnd.note = str(exc)[:300]
        self._rtos(rnd)
        self.rounds.append(rnd)
        return rnd

    def _inject(self, fault: str, rng: random.Random) -> tuple[Callable[[], None], str]:
        mesh = self.mesh
        leader = mesh.leader()
        followers = [n for n in mesh.nodes if n is not leader]
        if fault in ("kill9_leader", "kill9_follower"):
            node = leader if fault == "kill9_leader" else rng.choice(followers)
            node.proc.kill()
            return (lambda: node.start(wait_ready=False)), node.name
        if fault in ("stop_leader", "stop_follower"):
            node = leader if fault == "stop_leader" else rng.choice(followers)
            node.proc.signal(signal.SIGSTOP)
            return (lambda: node.proc.signal(signal.SIGCONT)), node.name
        if fault in ("partition_cp", "partition_follower"):
            cut = leader if fault == "partition_cp" else rng.choice(followers)
            others = [n for n in mesh.nodes if n is not cut]
            for other in others:
                mesh.net.cut(cut.host, other.host)

            def rejoin() -> None:
                for other in others:
                    mesh.net.restore(cut.host, other.host)

            return rejoin, cut.name
        primary = self._primary()
        if fault == "partition_leader_replica":
            replica = rng.choice([f"r{i}" for i in range(REDIS) if f"r{i}" != primary])
            host = mesh.redis_host(replica)
            mesh.net.cut(leader.host, host)
            return (lambda: mesh.net.restore(leader.host, host)), f"{leader.name}-{replica}"
        mesh.kill_redis(primary)
        return (lambda: self._restart_old_primary(primary)), primary

    def _primary(self) -> str:
        found = wait_until(self.mesh.cache_primary, 30, 0.05, "the committed cache primary")
        primary = found[0]
        assert primary is not None, "cache has no primary"
        return str(primary)

    def _restart_old_primary(self, old: str) -> None:
        def moved() -> bool:
            found = self.mesh.cache_primary()
            return found is not None and found[0] not in (None, old)

        with contextlib.suppress(AssertionError):
            wait_until(moved, RECOVER_TIMEOUT, 0.05, f"a new cache primary after {old}")
        self.mesh.start_redis(old)  # empty, as a master: the control plane must repoint it

    def _await_recovery(self, rnd: Round) -> None:
        mesh = self.mesh
        deadline = rnd.healed + RECOVER_TIMEOUT
        mesh.leader(timeout=max(1.0, deadline - time.monotonic()))
        wait_until(self._redis_settled, max(1.0, deadline - time.monotonic()), 0.1,
                   "the cache primary is a master and every other member replicates it")  # fmt: skip
        wait_until(lambda: all(w.acked_after(rnd.healed) for w in self.data),
                   max(1.0, deadline - time.monotonic()), 0.05, "a write through every Envoy")  # fmt: skip
        wait_until(lambda: any(c.result.acked and c.result.acked[-1][0] >= rnd.healed for c in self.control),
                   max(1.0, deadline - time.monotonic()), 0.05, "a control write")  # fmt: skip

    def _redis_settled(self) -> bool:
        found = self.mesh.cache_primary()
        if found is None or found[0] is None:
            return False
        primary_address = self.mesh.redis_host(str(found[0])).address
        for i in range(REDIS):
            member = f"r{i}"
            try:
                info = redis.Redis(host=self.mesh.redis_host(member).address, port=6379,
                                   socket_timeout=0.5).info("replication")  # fmt: skip
            except redis.RedisError:
                return False
            if member == found[0]:
                if info.get("role") != "master":
                    return False
            elif info.get("role") != "slave" or info.get("master_host") != primary_address:
                return False
        return True

    def _rtos(self, rnd: Round) -> None:
        firsts = [w.acked_after(rnd.injected) for w in self.data]
        if all(firsts):
            rnd.data_rto = max(w.acked for w in firsts if w) - rnd.injected
        answered = [a for c in self.control for t, a in c.result.acked if t >= rnd.injected]
        if answered:
            rnd.control_rto = min(answered) - rnd.injected
