"""Issue 13, item 2, against real Envoys and a real `repstage-mesh serve`: xDS over mTLS, the
node id checked against the client certificate, a server certificate rotated on disk used by
the next connection without a restart, and plaintext refused from a non-loopback address
(inside a network namespace this test creates: its traffic never leaves it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.certs import CertAuthority

from .harness import (
    ControlPlaneNode,
    Envoy,
    NamedTcpBackend,
    ask_once,
    free_low_port,
    wait_until,
    workdir,
)


@dataclass
class Secured:
    wd: Path
    cp: ControlPlaneNode
    ca: CertAuthority
    server_cert: Path
    server_key: Path
    server_ca: Path  # what Envoys trust for the control plane
    port: int

    def envoy(self, node_id: str, cert_for: str, trust: Path | None = None, delta: bool = False) -> Envoy:
        client = self.ca.issue(cert_for, uris=(f"spiffe://repstage/envoy/{cert_for}",))
        cert, key = client.write(self.wd / "pki", f"envoy-{node_id}")
        args = ["--xds-tls-cert", str(cert), "--xds-tls-key", str(key), "--xds-tls-ca", str(trust or self.server_ca)]
        return Envoy(self.wd, node_id, [self.cp.xds_address], delta=delta, bootstrap_args=args)

    def proxies(self) -> list[str]:
        return [p["node_id"] for p in self.cp.get("/v1/proxies") if p["connected"]]

    def refusals(self) -> float:
        with urllib.request.urlopen(f"{self.cp.api}/metrics", timeout=2) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith('repstage_xds_streams_refused_total{reason="identity_mismatch"}'):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture
def secured() -> Iterator[Secured]:
    with workdir() as wd, NamedTcpBackend("a") as a, NamedTcpBackend("b") as b:
        pki = wd / "pki"
        ca = CertAuthority()
        cert, key = ca.issue("cp", ips=("127.0.0.1",), server=True).write(pki, "server")
        ca_file = pki / "ca.crt"
        ca_file.write_bytes(ca.pem)
        server_ca = pki / "server-ca.crt"
        server_ca.write_bytes(ca.pem)
        port = free_low_port()
        cfg = {
            "xds": {
                "listen": f"127.0.0.1:{free_low_port()}",
                "tls": {"cert_file": str(cert), "key_file": str(key), "ca_file": str(ca_file)},
            },
            "services": [{
                "name": "orders", "protocol": "tcp", "listen_port": port, "primary": "a",
                "members": [
                    {"name": "a", "address": "127.0.0.1", "port": a.port},
                    {"name": "b", "address": "127.0.0.1", "port": b.port},
                ],
            }],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        cp = ControlPlaneNode(wd, cfg)
        try:
            cp.start()
            yield Secured(wd, cp, ca, cert, key, server_ca, port)
        finally:
            cp.stop()


def test_right_certificate_gets_config_another_node_id_is_refused(secured: Secured) -> None:
    impostor = secured.envoy("edge-2", cert_for="edge-1")
    good = secured.envoy("edge-1", cert_for="edge-1")
    try:
        good.start()
        wait_until(lambda: ask_once(secured.port).startswith("a:"), 20, what="traffic through the mTLS-configured Envoy")
        impostor.proc.start()  # never "ready": it gets no config
        wait_until(lambda: impostor.admin("/server_info") is not None, 20, what="impostor admin")
        wait_until(lambda: secured.refusals() >= 1, 20, what="the impostor's stream refused")
        # Envoy logs the gRPC status (7 = PERMISSION_DENIED) and our message
        wait_until(lambda: "does not match the client certificate" in impostor.proc.log(), 20,
                   what="Envoy logs the refusal")
        assert "edge-2" not in secured.proxies() and "edge-1" in secured.proxies()
        assert impostor.versions().get("cds", "") == ""  # it got nothing
        print("\n" + next(line for line in impostor.proc.log().splitlines() if "does not match" in line))
    finally:
        impostor.stop()
        good.stop()


def test_a_rotated_server_certificate_is_used_by_the_next_stream(secured: Secured) -> None:
    new_ca = CertAuthority("rotated server CA")
    pki = secured.wd / "pki"
    fresh = new_ca.issue("cp", ips=("127.0.0.1",), server=True)
    for path, data in ((secured.server_key, fresh.key), (secured.server_cert, fresh.cert)):
        tmp = path.with_suffix(".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    new_trust = pki / "rotated-server-ca.crt"
    new_trust.write_bytes(new_ca.pem)
    # trusts only the new CA; Delta xDS this time (the same admission as SotW)
    envoy = secured.envoy("edge-3", cert_for="edge-3", trust=new_trust, delta=True)
    try:
        envoy.start()
        wait_until(lambda: "edge-3" in secured.proxies(), 20, what="an Envoy trusting only the new certificate connects")
        wait_until(lambda: envoy.versions().get("cds", "") != "", 10, what="it got its clusters")
    finally:
        envoy.stop()


NETNS_SCRIPT = Path(__file__).with_name("netns_plaintext.py")


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs unshare and root to create a network namespace")
def test_plaintext_from_a_non_loopback_address_is_refused_by_default(tmp_path: Path) -> None:
    """Inside a fresh network namespace (its own loopback plus 10.213.0.1 on it): serve listens
    on 0.0.0.0 without TLS; an Envoy pointed at 127.0.0.1 is served, one pointed at 10.213.0.1
    (so its stream comes from a non-loopback address) is refused."""
    result = subprocess.run(
        ["unshare", "--net", sys.executable, str(NETNS_SCRIPT), str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loopback_envoy_served"] is True
    assert report["non_loopback_envoy_served"] is False
    assert report["refused_plaintext_peer"] >= 1
