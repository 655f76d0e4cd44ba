"""Issue 11: an Envoy leaves a frozen control-plane node, and proxy progress is long-polled.

Three `repstage-mesh serve` nodes on loopback, a real Envoy bootstrapped with all three xDS
addresses (the default keepalive of `filters/bootstrap.py`). The node the Envoy is attached to
is SIGSTOPped (a paused VM); a switch is committed through another node; the Envoy must move to
a live node and route to the new primary. The time it takes is measured by
`bench/frozen_node.py` (bench/RESULTS.md), not asserted here: the deadline is generous.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest

from .cluster3 import Cluster3, cluster3, two_tcp_members
from .harness import ControlPlaneNode, Envoy, ask_once, cluster_leader, http_json, wait_until

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

SERVICE = "orders"
PRIMARY = f"/v1/services/{SERVICE}/primary"
GENEROUS = 30.0  # seconds: correctness, not speed (the keepalive bound is ~1 s)


def serving(nodes: list[ControlPlaneNode], envoy: Envoy) -> list[ControlPlaneNode]:
    out = []
    for node in nodes:
        status, proxies = http_json("GET", f"{node.api}/v1/proxies", timeout=1.0)
        if status == 200 and any(p["node_id"] == envoy.node_id and p["connected"] for p in proxies):
            out.append(node)
    return out


def routed_to(port: int) -> str:
    try:
        return ask_once(port, "probe", timeout=0.5).split(":", 1)[0]
    except OSError:
        return "-"


@pytest.fixture
def cluster() -> Iterator[tuple[Cluster3, int]]:
    with two_tcp_members(SERVICE) as service, cluster3([service.spec]) as c:
        yield c, service.port


def test_envoy_leaves_a_frozen_node_and_routes_the_switch_committed_by_the_others(cluster: Any) -> None:
    c, port = cluster
    nodes = c.nodes
    envoy = c.envoy("edge-1")
    [frozen] = wait_until(lambda: serving(nodes, envoy), 20, 0.05, "the Envoy on one node")
    wait_until(lambda: routed_to(port) == "a", 20, 0.01, "traffic reaches a")
    live = [n for n in nodes if n is not frozen]

    frozen.proc.signal(signal.SIGSTOP)

    def switch() -> dict[str, Any] | None:
        # If the frozen node led Raft, the first tries time out (504) until a new leader is
        # elected; setting the same primary again is idempotent.
        status, body = http_json("POST", f"{live[0].api}{PRIMARY}", {"member": "b"}, timeout=15.0)
        return dict(body) if status == 200 else None

    epoch = int(wait_until(switch, GENEROUS, 0.2, "the switch commits through a live node")["epoch"])

    wait_until(lambda: routed_to(port) == "b", GENEROUS, 0.01, "the Envoy routes the new primary")
    now_on = wait_until(lambda: serving(live, envoy), GENEROUS, 0.05, "the Envoy on a live node")
    assert len(now_on) == 1 and now_on[0] is not frozen

    # The live node's long-poll says its proxies hold the switch, naming the Envoy.
    status, progress = http_json(
        "GET", f"{now_on[0].api}/v1/proxies/progress?min_index={epoch}&wait=10", timeout=15.0
    )
    assert status == 200, progress
    assert progress["satisfied"] and progress["low_water"] >= epoch, progress
    assert [key.split("#")[0] for key in progress["acked"]] == ["edge-1"], progress

    # Thawed, the frozen node catches up; the cluster still has one leader.
    frozen.proc.signal(signal.SIGCONT)
    frozen.wait_ready(GENEROUS)
    cluster_leader(nodes, timeout=GENEROUS)
