"""xDS over mTLS: the node id must match the client certificate, plaintext only on loopback,
certificates reloaded from disk without a restart (xds/tls.py). Real grpcio on loopback;
the real-Envoy version is integration/test_xds_security.py."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from prometheus_client import CollectorRegistry

from repstage_mesh.telemetry.metrics import MeshMetrics
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot, SnapshotCache
from repstage_mesh.xds.server import AdsServer
from repstage_mesh.xds.tls import CertificateReloader, NodeIdentity, TlsFiles, XdsSecurity
from repstage_mesh.xds.tracker import ProxyTracker
from tests.certs import CertAuthority, Pem
from tests.xds_client import CLUSTERS, AdsClient, sotw_request

_LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]


def _snapshot() -> Snapshot:
    item = EncodedResource.from_bytes(res.CLUSTER, "db", b"c")
    return Snapshot("3", {res.CLUSTER: {"db": item}})


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = CertAuthority("clients and server CA")
        server = self.ca.issue("cp", dns=("localhost",), ips=("127.0.0.1",), server=True)
        self.cert, self.key = server.write(directory, "server")
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(self.ca.pem)
        self.files = TlsFiles(self.cert, self.key, self.ca_file)

    def client(self, node_id: str = "edge-1", ca: CertAuthority | None = None) -> Pem:
        return (ca or self.ca).issue(node_id, uris=(f"spiffe://repstage/envoy/{node_id}",), dns=(f"{node_id}.envoy",))

    def channel(self, port: int, client: Pem | None, trust: bytes | None = None) -> aio.Channel:
        creds = grpc.ssl_channel_credentials(
            trust or self.ca.pem, client.key if client else None, client.cert if client else None
        )
        return aio.secure_channel(f"127.0.0.1:{port}", creds, options=_LOCAL_POOL)

    def rotate(self, ca: CertAuthority) -> None:
        """Write a new server certificate and key (signed by `ca`) the way tools do: new files
        renamed over the old ones."""
        server = ca.issue("cp", dns=("localhost",), ips=("127.0.0.1",), server=True)
        for path, data in ((self.key, server.key), (self.cert, server.cert)):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)


@pytest.fixture(params=["h2", "grpc"])  # both transports (xds.transport)
async def tls_server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Pki, AdsServer, CollectorRegistry]]:
    pki = Pki(tmp_path)
    cache = SnapshotCache()
    cache.set_snapshot("", _snapshot())
    registry = CollectorRegistry()
    metrics = MeshMetrics(registry, "cp")
    server = AdsServer(cache, ProxyTracker(), "cp", security=XdsSecurity(tls=pki.files), guard=metrics,
                       transport=request.param)
    await server.start("127.0.0.1", 0)
    try:
        yield pki, server, registry
    finally:
        await server.stop(0)


async def ask(channel: aio.Channel, node_id: str) -> tuple[grpc.StatusCode, str]:
    client = AdsClient(channel)
    client.send(sotw_request(CLUSTERS, node_id=node_id))
    try:
        response = await client.receive()
        return grpc.StatusCode.OK, response.version_info
    except EOFError:
        return await client.status()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    finally:
        client.close()
        await channel.close()


async def test_the_right_certificate_gets_config_another_node_id_is_refused(tls_server) -> None:  # type: ignore[no-untyped-def]
    pki, server, registry = tls_server
    assert server.port is not None
    code, version = await ask(pki.channel(server.port, pki.client("edge-1")), "edge-1")
    assert code == grpc.StatusCode.OK and version.startswith("3-")
    code, details = await ask(pki.channel(server.port, pki.client("edge-1")), "edge-2")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "node id 'edge-2' does not match the client certificate" in details
    assert "spiffe://repstage/envoy/edge-1" in details
    refused = registry.get_sample_value("repstage_xds_streams_refused_total", {"reason": "identity_mismatch"})
    assert refused == 1


async def test_no_client_certificate_or_another_ca_is_refused(tls_server) -> None:  # type: ignore[no-untyped-def]
    pki, server, _ = tls_server
    assert server.port is not None
    code, _ = await ask(pki.channel(server.port, None), "edge-1")
    assert code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
    stranger = pki.client("edge-1", ca=CertAuthority("another CA"))
    code, _ = await ask(pki.channel(server.port, stranger), "edge-1")
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_a_rotated_server_certificate_is_used_by_the_next_connection(tls_server) -> None:  # type: ignore[no-untyped-def]
    pki, server, _ = tls_server
    assert server.port is not None
    new_ca = CertAuthority("the server's new CA")
    pki.rotate(new_ca)
    # A client that trusts only the new server CA connects: the new certificate is served.
    code, version = await ask(pki.channel(server.port, pki.client("edge-1"), trust=new_ca.pem), "edge-1")
    assert code == grpc.StatusCode.OK and version.startswith("3-")
    code, _ = await ask(pki.channel(server.port, pki.client("edge-1")), "edge-1")  # trusts the old one
    assert code == grpc.StatusCode.UNAVAILABLE
    assert server.reloader is not None and server.reloader.reloads == 1


def test_a_half_written_pair_is_not_loaded(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    reloader = CertificateReloader(pki.files)
    other = pki.ca.issue("cp", server=True)
    pki.key.write_bytes(other.key)  # key rotated, certificate not yet
    assert reloader.fetch() is None and reloader.reloads == 0
    pki.cert.write_bytes(other.cert)
    assert reloader.fetch() is not None and reloader.reloads == 1
    assert reloader.fetch() is None  # unchanged since


def test_dns_identity() -> None:
    identity = NodeIdentity.parse("dns:{node_id}.envoy")
    security = XdsSecurity(tls=TlsFiles(Path("c"), Path("k"), Path("a")), identity=identity)
    auth = {"peer_dns": [b"edge-1.envoy"], "peer_uri": [b"spiffe://repstage/envoy/edge-2"], "x509_pem_cert": [b"x"]}
    assert security.admit_peer("ipv4:10.0.0.1:1", auth) is None
    assert security.admit_node(auth, "edge-1") is None
    refusal = security.admit_node(auth, "edge-2")
    assert refusal is not None and refusal.code == "PERMISSION_DENIED"
    missing = security.admit_node(auth, None)
    assert missing is not None and missing.code == "UNAUTHENTICATED"


@pytest.mark.parametrize("text", ["uri:spiffe://x/{node}", "dns:{node_id}.{node_id}", "ip:{node_id}", "uri:{node_id}}"])
def test_bad_identity_patterns(text: str) -> None:
    with pytest.raises(ValueError):
        NodeIdentity.parse(text)


def test_plaintext_only_on_loopback_unless_insecure() -> None:
    plain = XdsSecurity()
    refusal = plain.admit_peer("ipv4:10.9.8.7:4000", {})
    assert refusal is not None and refusal.code == "PERMISSION_DENIED" and "xds.insecure" in refusal.message
    assert plain.admit_peer("ipv4:127.0.0.1:4000", {}) is None
    assert XdsSecurity(insecure=True).admit_peer("ipv4:10.9.8.7:4000", {}) is None


async def test_a_rotated_client_ca_is_used_by_the_next_connection(tls_server) -> None:  # type: ignore[no-untyped-def]
    pki, server, _ = tls_server
    assert server.port is not None
    new_clients_ca = CertAuthority("the Envoys' new CA")
    tmp = pki.ca_file.with_suffix(".new")
    tmp.write_bytes(new_clients_ca.pem)
    os.replace(tmp, pki.ca_file)
    code, version = await ask(pki.channel(server.port, pki.client("edge-1", ca=new_clients_ca)), "edge-1")
    assert code == grpc.StatusCode.OK and version.startswith("3-")
    code, _ = await ask(pki.channel(server.port, pki.client("edge-1")), "edge-1")  # signed by the old CA
    assert code == grpc.StatusCode.UNAVAILABLE
