"""Issue 4: a flapping primary does not cause a failover storm, and a single missed probe does
not cause a failover at all. Real Redis 7 (a primary and two replicas), a real
`repstage-mesh serve` deciding with probes in orchestrate mode, and a real Envoy.

- Flapping: whichever member is the committed primary is SIGSTOPped and SIGCONTed over and over
  (each pause is long enough to be seen as down). Hysteresis (`min_failover_interval`) allows at
  most one automatic failover per interval, and an independent observer polling the API sees
  exactly one primary per epoch, epochs only growing.
- A single missed probe: a small TCP proxy in front of the primary swallows exactly one ROLE
  request (the probe times out once) while everything else passes; with fall = 2 nothing
  happens. The control: two swallowed in a row do fail the primary over.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from .databases import RedisGroup, redis_group, redis_server_binary
from .harness import ControlPlaneNode, Envoy, free_low_port, http_json, wait_until, workdir

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

SERVICE = "cache"
MIN_INTERVAL = 4.0  # leadership.min_failover_interval, seconds
FLAP_SECONDS = 10.0
PAUSE, RUN = 0.8, 0.7  # each flap: the primary is stopped PAUSE s, then runs RUN s
ROLE_REQUEST = b"*1\r\n$4\r\nROLE\r\n"  # what the Redis probe sends


@dataclass
class Mesh:
    group: RedisGroup
    cp: ControlPlaneNode
    envoy: Envoy
    port: int

    def service(self) -> dict[str, Any]:
        return self.cp.get(f"/v1/services/{SERVICE}")

    def failovers(self) -> list[dict[str, Any]]:
        """Automatic failovers (and fail-closed periods) that committed something, oldest first."""
        records = self.cp.get("/v1/failovers")["failovers"]
        out = [
            r
            for r in records
            if r["kind"] in ("failover", "fail_closed")
            and any(e["name"] in ("fenced", "committed") for e in r["timeline"])
        ]
        return sorted(out, key=first_change)

    def write(self, key: str) -> bool:
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            return bool(client.set(key, 1))
        finally:
            client.close()


def first_change(record: dict[str, Any]) -> float:
    """When the record first changed the committed state (its fence, else its commit)."""
    return min(e["at"] for e in record["timeline"] if e["name"] in ("fenced", "committed"))


@contextlib.contextmanager
def mesh(group: RedisGroup, members: list[dict[str, Any]], probe: dict[str, Any]) -> Iterator[Mesh]:
    with workdir() as wd:
        port = free_low_port()
        cfg: dict[str, Any] = {
            "services": [
                {
                    "name": SERVICE,
                    "protocol": "redis",
                    "listen_port": port,
                    "members": members,
                    "primary": "r0",
                    "leadership": {
                        "source": "probe",
                        "mode": "orchestrate",
                        "min_failover_interval": MIN_INTERVAL,
                        "probe": probe,
                    },
                }
            ],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        cp = ControlPlaneNode(wd, cfg)
        envoy = Envoy(wd, "edge-1", [cp.xds_address])
        try:
            cp.start()
            envoy.start()
            m = Mesh(group, cp, envoy, port)
            wait_until(lambda: m.write("ready"), 20, what="writes through Envoy reach the primary")
            yield m
        finally:
            envoy.stop()
            cp.stop()


@pytest.fixture
def group() -> Iterator[RedisGroup]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (scripts/system-deps.sh)")
    with redis_group(replicas=2) as g:
        yield g


# --- flapping -------------------------------------------------------------------------------


@dataclass
class Observer:
    """Polls GET /v1/services/cache: every (epoch, primary) it saw, in order."""

    m: Mesh
    seen: list[tuple[int, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            status, body = http_json("GET", f"{self.m.cp.api}/v1/services/{SERVICE}", timeout=2)
            if status == 200:
                self.seen.append((int(body["epoch"]), body["primary"]))
            self.stop.wait(0.02)  # the polling interval

    def __enter__(self) -> Observer:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def test_flapping_primary_causes_at_most_one_failover_per_interval(group: RedisGroup) -> None:
    members = [{"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in group.names]
    probe = {"interval": 0.1, "timeout": 0.2, "fall": 2, "rise": 2}
    with mesh(group, members, probe) as m, Observer(m) as observer:
        paused: list[str] = []
        started = time.monotonic()
        target = "r0"
        while time.monotonic() - started < FLAP_SECONDS:
            target = m.service()["primary"] or target  # flap whoever is the primary now
            group.stop(target)
            paused.append(target)
            observer.stop.wait(PAUSE)  # fault injection: how long the primary is silent
            group.cont(target)
            observer.stop.wait(RUN)  # fault injection: how long it answers again
        flapped_for = time.monotonic() - started

        # Settled: one primary, every member up, the other two replicate from it.
        def settled() -> str | None:
            primary = m.service()["primary"]
            if primary is None or group.role(primary)[0] != "master":
                return None
            for other in (n for n in group.names if n != primary):
                role = group.role(other)
                if role[0] != "slave" or int(role[2]) != group.port(primary):
                    return None
            return str(primary)

        primary = wait_until(settled, 20, what="one primary, the others replicating from it")
        assert m.write("after-flapping")
        records = m.failovers()

    changes = [first_change(r) for r in records]
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    print(
        f"\nflapped {len(paused)} times in {flapped_for:.1f}s ({paused}); {len(records)} "
        f"failover(s): {[(r['old_primary'], r['new_primary'], r['kind']) for r in records]}; "
        f"gaps {[round(g, 2) for g in gaps]}; final primary {primary}"
    )
    assert records, "the flapping primary never failed over: the test injected nothing"
    assert all(g >= MIN_INTERVAL - 0.01 for g in gaps), (
        f"failovers closer than {MIN_INTERVAL}s: {gaps}"
    )
    assert len(records) <= int(flapped_for / MIN_INTERVAL) + 1, records
    assert len(records) < len(paused), "every pause caused a failover: no hysteresis"

    # One primary per epoch: in the failover records and as an outside observer saw it.
    committed: dict[int, set[str | None]] = {}
    for r in records:
        for e in r["timeline"]:
            if e["name"] == "committed":
                committed.setdefault(e["detail"]["epoch"], set()).add(e["detail"]["member"])
            elif e["name"] == "fenced":
                committed.setdefault(e["detail"]["epoch"], set()).add(None)
    assert all(len(who) == 1 for who in committed.values()), committed
    by_epoch: dict[int, set[str | None]] = {}
    for epoch, who in observer.seen:
        by_epoch.setdefault(epoch, set()).add(who)
    assert all(len(who) == 1 for who in by_epoch.values()), by_epoch
    epochs = [e for e, _ in observer.seen]
    assert epochs == sorted(epochs), "the committed epoch went backwards"
    for epoch, claimed in committed.items():
        if epoch in by_epoch:
            assert by_epoch[epoch] == claimed, (epoch, claimed, by_epoch[epoch])


# --- a single missed probe ---------------------------------------------------------------------


class RoleDroppingProxy:
    """A TCP proxy to 127.0.0.1:`upstream` that forwards everything, except that it swallows the
    next `drop(n)` ROLE requests (the probe's): the prober waits in vain and times out, exactly
    once per swallowed request. `roles` counts ROLE requests forwarded."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.to_drop = 0
        self.dropped = 0
        self.roles = 0
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def drop(self, n: int) -> None:
        with self.lock:
            self.to_drop += n

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and data == ROLE_REQUEST:
                    with self.lock:
                        swallow = self.to_drop > 0
                        if swallow:
                            self.to_drop -= 1
                            self.dropped += 1
                        else:
                            self.roles += 1
                    if swallow:
                        continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> RoleDroppingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.close()


def test_single_missed_probe_does_not_fail_over(group: RedisGroup) -> None:
    with RoleDroppingProxy(group.port("r0")) as proxy:
        # r0 is known by the proxy's address: probes and Envoy go through it, and so do the
        # replicas (so the mesh sees them replicating from the primary's address).
        for replica in ("r1", "r2"):
            group.command(replica, "REPLICAOF", "127.0.0.1", str(proxy.port))
        wait_until(
            lambda: all(
                group.role(r)[0] == "slave"
                and int(group.role(r)[2]) == proxy.port
                and group.role(r)[3] == "connected"
                for r in ("r1", "r2")
            ),
            15,
            what="the replicas replicating through the proxy",
        )
        members = [{"name": "r0", "address": "127.0.0.1", "port": proxy.port}] + [
            {"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in ("r1", "r2")
        ]
        probe = {"interval": 0.1, "timeout": 0.2, "fall": 2, "rise": 2}
        with mesh(group, members, probe) as m:
            before = m.service()
            assert before["primary"] == "r0"

            proxy.drop(1)  # one probe of r0 goes unanswered
            wait_until(lambda: proxy.dropped == 1, 5, what="a probe swallowed")
            roles = proxy.roles
            # 10 more answered probes (~1 s, five times fall x interval): time to have acted
            wait_until(lambda: proxy.roles >= roles + 10, 10, what="probing to go on")
            after = m.service()
            assert (after["primary"], after["epoch"]) == ("r0", before["epoch"]), after
            assert not m.failovers(), m.failovers()
            assert m.write("after-one-miss")

            # The control: two misses in a row (fall = 2) do fail r0 over.
            proxy.drop(2)
            wait_until(
                lambda: (p := m.service()["primary"]) not in (None, "r0") and p,
                10,
                what="a failover after fall consecutive misses",
            )
            records = m.failovers()
            assert len(records) == 1 and records[0]["old_primary"] == "r0", records
