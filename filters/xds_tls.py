"""The TLS transport socket of the bootstrap's `xds_cluster`: Envoy presents a client
certificate (whose SAN names its node id, see the control plane's `xds.tls.node_san`) and
checks the control plane's certificate against a CA.

Envoy reads these files at start; to rotate an Envoy's own certificate without a restart,
deliver it through SDS (outside this bootstrap). The control plane re-reads its own files.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy_data_plane.envoy.config.core.v3 import DataSource, TransportSocket
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher

from .type_urls import pack

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"


@dataclass(frozen=True)
class XdsTls:
    """Files on the Envoy's host. `server_name`: SNI, and (when set) the DNS SAN the control
    plane's certificate must carry; without it any certificate signed by `ca_file` is accepted."""

    cert_file: str
    key_file: str
    ca_file: str
    server_name: str = ""

    def __post_init__(self) -> None:
        for field in ("cert_file", "key_file", "ca_file"):
            if not getattr(self, field):
                raise ValueError(f"{field}: name a PEM file")


def xds_transport_socket(tls: XdsTls) -> TransportSocket:
    validation = CertificateValidationContext(
        trusted_ca=DataSource(filename=tls.ca_file),
        match_typed_subject_alt_names=[
            SubjectAltNameMatcher(
                san_type=SubjectAltNameMatcherSanType.DNS, matcher=StringMatcher(exact=tls.server_name)
            )
        ]
        if tls.server_name
        else [],
    )
    context = UpstreamTlsContext(
        common_tls_context=CommonTlsContext(
            tls_certificates=[
                TlsCertificate(
                    certificate_chain=DataSource(filename=tls.cert_file),
                    private_key=DataSource(filename=tls.key_file),
                )
            ],
            validation_context=validation,
            alpn_protocols=["h2"],  # gRPC over TLS
        ),
        sni=tls.server_name,
    )
    return TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(context))
