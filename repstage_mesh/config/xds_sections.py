"""The `xds:` section: where the xDS server listens and is reached, its mTLS files, and the
limits one client may cost."""

from __future__ import annotations

from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import Field, FilePath, model_validator

from repstage_mesh.config.sections import (
    _ADVERTISE,
    _WILDCARDS,
    HostPort,
    Section,
    _advertised,
    is_loopback,
)
from repstage_mesh.core.addresses import parse_host_port


class XdsTlsConfig(Section):
    """mTLS for xDS. The three files are re-read when they change (no restart)."""

    cert_file: FilePath = Field(description="the server's certificate chain (PEM)")
    key_file: FilePath = Field(description="the server's private key (PEM)")
    ca_file: FilePath = Field(description="the CA that signs the Envoys' client certificates (PEM)")
    node_san: str = Field(
        default="uri:spiffe://repstage/envoy/{node_id}",
        pattern=r"^(uri|dns):[^{}]*\{node_id\}[^{}]*$",
        description="the client certificate SAN an Envoy's node id must match: uri:<pattern> "
        "(a SPIFFE id) or dns:<pattern>, with {node_id} once",
    )

    @model_validator(mode="after")
    def _usable(self) -> XdsTlsConfig:
        """What serve would find when it loads the files: PEM that parses, a key that is the
        certificate's (the same check xds/tls.py makes before every reload)."""
        try:
            cert = x509.load_pem_x509_certificates(self.cert_file.read_bytes())[0]
        except (OSError, ValueError) as exc:
            raise ValueError(f"cert_file: not a PEM certificate chain ({exc})") from None
        try:
            key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"key_file: not an unencrypted PEM private key ({exc})") from None
        try:
            x509.load_pem_x509_certificates(self.ca_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"ca_file: not PEM certificates ({exc})") from None
        der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
            raise ValueError("key_file: is not the private key of cert_file")
        return self


class XdsLimitsConfig(Section):
    """What one xDS client may cost (README: "xDS limits"); each hit counts in
    repstage_xds_limit_hits_total{limit}."""

    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_resource_names: int = Field(default=10_000, ge=1, description="per stream, all types")
    max_resource_name_bytes: int = Field(default=1024, ge=64, description="one resource name")
    max_initial_resource_versions: int = Field(default=10_000, ge=1, description="per Delta request")
    max_node_id_bytes: int = Field(default=256, ge=16, le=65536, description="node.id and node.cluster")
    max_node_metadata_bytes: int = Field(default=16 * 1024, ge=0, description="larger metadata is dropped")
    max_streams_per_peer: int = Field(default=1_000, ge=1, description="open streams per client IP")
    max_streams: int = Field(default=20_000, ge=1, description="open streams on this node")
    max_outgoing_queue: int = Field(default=256, ge=8, description="responses waiting per stream")
    max_unacked_delta: int = Field(default=16, ge=1, description="Delta responses of one type awaiting ACK")
    max_error_detail_bytes: int = Field(default=4096, ge=64, description="a NACK's error text is cut to it")
    max_disconnected_proxies: int = Field(
        default=1_000, ge=0, description="disconnected proxies /v1/proxies remembers (10 minutes at most)"
    )
    admission_rate: float = Field(
        default=2_000.0, gt=0, le=1_000_000, description="new streams served per second once the burst is used"
    )
    admission_burst: int = Field(default=500, ge=1, le=1_000_000, description="new streams served at once")
    max_connection_buffer_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024 * 1024,
        description="bytes waiting to be written to one connection, and responses framed for it that wait "
        "for the peer's flow-control windows (h2 transport): a peer that sends but reads nothing (its PING "
        "and SETTINGS answers, re-asked responses pile up), or keeps its windows shut, is disconnected",
    )
    max_early_resets: int = Field(
        default=100, ge=1, le=1_000_000,
        description="streams one connection's client may reset before their first response (h2 transport; "
        "HEADERS then RST_STREAM floods, CVE-2023-44487): over it the connection is closed (GOAWAY)",
    )
    max_settings_per_second: float = Field(
        default=10.0, gt=0, le=1_000_000,
        description="SETTINGS frames one connection's client may send a second, averaged over 10 s (h2 "
        "transport; each that changes the initial window makes h2 walk every stream): over it the "
        "connection is closed (GOAWAY)",
    )


class XdsConfig(Section):
    listen: HostPort = Field(default="127.0.0.1:18000", description="HOST:PORT the xDS server binds")
    advertise: HostPort | None = Field(default=None, description=_ADVERTISE)
    tls: XdsTlsConfig | None = None
    insecure: bool = Field(
        default=False,
        description="serve plaintext xDS to any peer (without tls, only loopback peers are served)",
    )
    never_acked_grace: float = Field(
        default=10.0, gt=0, le=3600,
        description="a proxy sent config this long ago that never ACKed anything is not waited for",
    )
    limits: XdsLimitsConfig = Field(default_factory=XdsLimitsConfig)
    workers: int | None = Field(
        default=None, ge=0, le=256,
        description="xDS worker processes sharing xds.listen (SO_REUSEPORT); unset: one per core; "
        "0: xDS is served in the node process. README, 'xDS workers'",
    )
    transport: Literal["h2", "grpc"] = Field(
        default="h2",
        description="how xDS speaks gRPC: h2 (python-hyper's h2 on asyncio, ~3x less CPU and memory "
        "per stream) or grpc (grpcio's asyncio server). README, 'xDS workers'",
    )
    primary_lease_ms: int | None = Field(
        default=None, ge=300, le=3_600_000,
        description="lease each service's primary cluster for this long (an xDS resource TTL), "
        "renewed every third of it only while this node commits a read barrier through a Raft "
        "majority: an Envoy cut off from every live node drops the primary route (fails closed) "
        "at most ~1.17 leases after a switch. Unset (the default): Envoy keeps its last config "
        "(static stability). README, 'Primary lease'",
    )

    @model_validator(mode="after")
    def _plaintext_on_loopback(self) -> XdsConfig:
        """The API's rule: no authentication, loopback only. A wildcard address is allowed
        (streams from non-loopback peers are refused); a concrete non-loopback one is not."""
        host = parse_host_port(self.listen)[0]
        if self.tls is None and not self.insecure and host not in _WILDCARDS and not is_loopback(host):
            raise ValueError(
                f"listen: plaintext xDS on {host} would refuse every peer (plaintext is served to "
                "loopback peers only): configure xds.tls, listen on 127.0.0.1, or set xds.insecure: true"
            )
        return self

    def advertised(self, bound_port: int | None = None) -> str:
        return _advertised(self.listen, self.advertise, bound_port)
