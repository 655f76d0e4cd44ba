"""RepStage following a real Patroni 4 cluster (etcd + three PostgreSQL 15), two ways:

(a) `pg-probe`: an HTTP probe of Patroni's REST `/primary` (200 on the leader, 503 elsewhere),
    `probe.port` = Patroni's REST port on each member's address, follow mode;
(b) `pg-announce`: Patroni's `on_role_change` callback runs `repstage-mesh announce pg-announce
    <member> --api ...` (Patroni appends ACTION ROLE SCOPE; only a primary role is announced).

One cluster, one `serve` node and one Envoy are shared by the module (Patroni + etcd + 3 PG start
in ~5 s). Each test waits for a healthy cluster (a leader, two streaming replicas), kills the
leader's postgres (SIGKILL of the postmaster and its backends; Patroni keeps running and, with
primary_start_timeout 0, fails over at once) and checks that RepStage routes the service's
listener to the new leader: a write through Envoy lands on it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from .harness import ControlPlaneNode, Envoy, free_low_port, wait_until, workdir
from .patroni import PATRONI_VENV, PatroniCluster, host_of, missing, patroni_cluster

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial


@dataclass
class PatroniMesh:
    cluster: PatroniCluster
    cp: ControlPlaneNode
    envoy: Envoy
    ports: dict[str, int]  # service -> Envoy listener

    def primary(self, service: str) -> str | None:
        primary = self.cp.get(f"/v1/services/{service}")["primary"]
        return None if primary is None else str(primary)

    def write_through(self, service: str) -> str:
        """INSERT through Envoy's listener for `service`; the member that acknowledged it."""
        dsn = (f"host=127.0.0.1 port={self.ports[service]} user=postgres password=postgres "
               "dbname=postgres connect_timeout=2 options='-c statement_timeout=1000'")  # fmt: skip
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS w (id serial PRIMARY KEY, at timestamptz DEFAULT now())")
            conn.execute("INSERT INTO w DEFAULT VALUES")
            row = conn.execute("SELECT host(inet_server_addr())").fetchone()
        assert row is not None
        return next(n for n in ("pg0", "pg1", "pg2") if host_of(n) == row[0])


def _service(name: str, port: int, members: list[dict[str, Any]], leadership: dict[str, Any],
             primary: str) -> dict[str, Any]:
    return {"name": name, "protocol": "postgres", "listen_port": port, "members": members,
            "primary": primary, "leadership": leadership}  # fmt: skip


@pytest.fixture(scope="module")
def patroni_mesh() -> Iterator[PatroniMesh]:
    why = missing()
    if why is not None:
        pytest.skip(why)
    api_port = free_low_port()
    api = f"http://127.0.0.1:{api_port}"
    callback = [str(PATRONI_VENV / "bin" / "repstage-mesh"), "announce", "pg-announce", "{name}",
                "--api", api, "--retry-for", "10"]  # fmt: skip
    with workdir() as wd, patroni_cluster(on_role_change=callback) as cluster:
        leader = cluster.wait_healthy()
        ports = {"pg-probe": free_low_port(), "pg-announce": free_low_port()}
        members = cluster.members()
        probe = {"kind": "http", "port": cluster.rest_port, "path": "/primary", "expect_status": 200,
                 "interval": 0.1, "timeout": 0.25}  # fmt: skip
        cfg: dict[str, Any] = {
            "api": {"listen": f"127.0.0.1:{api_port}"},
            "services": [
                _service("pg-probe", ports["pg-probe"], members,
                         {"source": "probe", "mode": "follow", "probe": probe}, leader),
                _service("pg-announce", ports["pg-announce"], members,
                         {"source": "announce", "mode": "follow"}, leader),
            ],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        cp = ControlPlaneNode(wd, cfg)
        envoy = Envoy(wd, "edge-1", [cp.xds_address])
        try:
            cp.start()
            envoy.start()
            mesh = PatroniMesh(cluster, cp, envoy, ports)
            for service in ports:

                def reaches_leader(s: str = service) -> bool:
                    return mesh.write_through(s) == leader

                wait_until(reaches_leader, 20, what=f"writes through Envoy reach the Patroni leader ({service})")
            yield mesh
        finally:
            envoy.stop()
            cp.stop()


def _kill_the_leader(mesh: PatroniMesh) -> tuple[str, str, float]:
    old = mesh.cluster.wait_healthy()
    for service in mesh.ports:

        def routed(s: str = service) -> bool:
            return mesh.primary(s) == old

        wait_until(routed, 20, what=f"{service} routes to {old}")
    killed = mesh.cluster.kill_postgres(old)
    new = mesh.cluster.wait_leader(other_than=old, timeout=60)
    return old, new, killed


def test_http_probe_of_patroni_primary_follows_a_failover(patroni_mesh: PatroniMesh) -> None:
    mesh = patroni_mesh
    old, new, killed = _kill_the_leader(mesh)
    wait_until(lambda: mesh.primary("pg-probe") == new, 30, what=f"pg-probe follows Patroni to {new}")
    routed = time.monotonic() - killed
    assert wait_until(lambda: mesh.write_through("pg-probe") == new, 20, what=f"a write lands on {new}")
    records = [r for r in mesh.cp.get("/v1/failovers")["failovers"] if r["service"] == "pg-probe"]
    assert any(r["new_primary"] == new and r["mode"] == "follow" for r in records), records
    print(f"\nPatroni {old} -> {new}; pg-probe routed to {new} {routed:.2f} s after the kill")


def test_patroni_on_role_change_callback_announces_the_new_leader(patroni_mesh: PatroniMesh) -> None:
    mesh = patroni_mesh
    old, new, killed = _kill_the_leader(mesh)
    wait_until(lambda: mesh.primary("pg-announce") == new, 30,
               what=f"the on_role_change callback announced {new}")  # fmt: skip
    routed = time.monotonic() - killed
    assert wait_until(lambda: mesh.write_through("pg-announce") == new, 20, what=f"a write lands on {new}")
    # The old leader comes back as a replica: its callback (role replica) announces nothing.
    mesh.cluster.wait_healthy()
    assert mesh.primary("pg-announce") == new
    print(f"\nPatroni {old} -> {new}; pg-announce routed to {new} {routed:.2f} s after the kill")
