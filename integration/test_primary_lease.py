"""Issue 11: with `xds.primary_lease_ms`, an Envoy cut off from every live control-plane node
fails closed for the primary after the lease instead of routing to a demoted primary.

Three `repstage-mesh serve` nodes on loopback with a 1.5 s lease, a real Envoy bootstrapped
with ONE node's xDS address (so when that node freezes the Envoy has no live node to go to).

1. The Envoy's node is SIGSTOPped; a switch a -> b is committed by the other two (an announce:
   the fence commit, then a proxy wait that covers the frozen node by the lease, as its record
   says). A writer opens a fresh connection through the Envoy every 10 ms: no write reaches
   the demoted primary `a` after the fence commit plus the lease's bound (counted), the Envoy
   refuses instead; thawed, the node renews and the Envoy routes `b`.
2. The Envoy's node alive but alone (the two others SIGSTOPped): it cannot prove it is current,
   stops renewing, and the Envoy fails closed; the node renders the primary failed closed
   itself, whose fence closes a connection held open through the Envoy; when the others come
   back, it routes again.

Timings go to bench/primary_lease.py (bench/RESULTS.md); the deadlines here are generous.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from .cluster3 import Cluster3, cluster3, two_tcp_members
from .harness import ControlPlaneNode, LineClient, ask_once, cluster_leader, http_json, wait_until

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

SERVICE = "orders"
PRIMARY = f"/v1/services/{SERVICE}/primary"
LEASE_MS = 1500
BOUND = LEASE_MS / 1000 * 7 / 6  # xds/lease.py: ttl + max_age (half a period, ttl / 6)
MARGIN = 0.3  # seconds: Envoy's timer and a connection through it
GENEROUS = 30.0


def routed_to(port: int) -> str:
    """Who answered a write on a fresh connection; "-" refused or closed by the Envoy,
    "timeout" no answer within 1 s (a loaded machine: neither routed nor refused)."""
    try:
        return ask_once(port, "write", timeout=1.0).split(":", 1)[0]
    except TimeoutError:
        return "timeout"
    except OSError:
        return "-"


class Writer:
    """A fresh connection through the Envoy every 10 ms; remembers (time, who answered)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.append((time.monotonic(), routed_to(self.port)))
            self._stop.wait(0.01)  # the write rate of this test, not synchronisation

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def after(self, t: float, who: str) -> int:
        return sum(1 for at, name in list(self.seen) if at > t and name == who)


def metrics(node: ControlPlaneNode) -> str:
    with urllib.request.urlopen(f"{node.api}/metrics", timeout=2.0) as answer:
        return str(answer.read().decode())


def steady(port: int, member: str) -> None:
    """Three leases of writes, every one to `member`."""
    with Writer(port) as writer:
        start = time.monotonic()
        wait_until(lambda: time.monotonic() > start + 3 * LEASE_MS / 1000, GENEROUS, 0.05, "three leases")
    assert writer.after(start, member) > 50 and writer.after(start, "-") == 0, writer.seen


@pytest.fixture
def cluster() -> Iterator[tuple[Cluster3, int]]:
    with two_tcp_members(SERVICE) as service, cluster3([service.spec], {"xds": {"primary_lease_ms": LEASE_MS}}) as c:
        yield c, service.port


@pytest.mark.parametrize("kind", ["sotw", "delta"])
def test_an_envoy_cut_off_from_every_live_node_fails_closed_after_the_lease(cluster: Any, kind: str) -> None:
    c, port = cluster
    nodes = c.nodes
    leader = cluster_leader(nodes, timeout=GENEROUS)
    on = next(n for n in nodes if n is not leader)  # a switch then needs no election
    others = [n for n in nodes if n is not on]
    c.envoy("edge-1", [on], delta=kind == "delta")
    wait_until(lambda: routed_to(port) == "a", GENEROUS, 0.01, "traffic reaches a")
    steady(port, "a")  # while the node renews, the lease never runs out

    # 1. The Envoy's node freezes; the other two commit a -> b.
    with Writer(port) as writer:
        on.proc.signal(signal.SIGSTOP)
        status, body = http_json("POST", f"{leader.api}{PRIMARY}", {"member": "b"}, timeout=15.0)
        assert status == 200, body
        # The announce is break-before-make: the fence commit, then a proxy wait in which the
        # frozen node's Envoys are covered by the lease (the wait lasts at least its bound).
        timeline = {event["name"]: event for event in body["failover"]["timeline"]}
        committed = timeline["fenced"]["at"]  # the leader's CLOCK_MONOTONIC: this host's too
        assert timeline["proxies_fenced"]["detail"]["covered_by_lease"] == [on.name], timeline
        assert timeline["proxies_fenced"]["at"] - committed >= BOUND, timeline
        wait_until(lambda: time.monotonic() > committed + BOUND + MARGIN + 1.0, GENEROUS, 0.05,
                   "a second of writes after the lease")
        late = writer.after(committed + BOUND + MARGIN, "a")
        total = writer.after(committed + BOUND + MARGIN, "-")
    refused = min((at for at, who in writer.seen if at > committed and who == "-"), default=None)
    assert late == 0, f"{late} writes reached the demoted primary after the lease"
    assert total > 10, "the writer kept trying (and was refused) after the lease"
    assert refused is not None and refused - committed < BOUND + MARGIN
    print(f"\nfrozen node: fence commit -> refused {refused - committed:.2f} s (lease {LEASE_MS} ms)")

    on.proc.signal(signal.SIGCONT)
    wait_until(lambda: routed_to(port) == "b", GENEROUS, 0.02, "thawed, the node renews: traffic reaches b")
    steady(port, "b")

    # 2. The Envoy's node alive but alone: it stops renewing, the Envoy fails closed.
    held = LineClient(port)
    assert held.ask("hold").startswith("b:")
    for node in others:
        node.proc.signal(signal.SIGSTOP)
    alone = time.monotonic()
    wait_until(lambda: routed_to(port) == "-", GENEROUS, 0.01, "a node without a majority fails closed")
    print(f"minority node: others stopped -> refused {time.monotonic() - alone:.2f} s")
    wait_until(lambda: "repstage_xds_lease_fresh 0.0" in metrics(on), GENEROUS, 0.05,
               "the node says it serves the primary failed closed")
    # Failing closed itself, the node pushes the fence, which closes the open connection too.
    wait_until(held.closed_by_peer, GENEROUS, 0.05, "the fence closes the connection open to b")
    held.close()
    for node in others:
        node.proc.signal(signal.SIGCONT)
    wait_until(lambda: routed_to(port) == "b", GENEROUS, 0.02, "majority back: traffic reaches b again")
