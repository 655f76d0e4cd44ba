"""Who may open an xDS stream: TLS with client certificates, and plaintext on loopback only.

- With TLS (`TlsFiles`), the server asks every client for a certificate signed by the CA in
  `ca_file`, and the node id an Envoy announces must match its certificate (`NodeIdentity`:
  a SPIFFE/URI SAN or a DNS SAN built from the node id). `CertificateReloader` is grpcio's
  certificate-configuration fetcher: grpcio calls it before every TLS handshake, it looks at
  the three files' stat and reloads them when one changed, so a certificate, key or CA
  rotated on disk is used by the next connection without a restart.
- Without TLS, only loopback peers are served unless `insecure` is set (the same rule as the
  REST API without tokens: no authentication, loopback only).

`XdsSecurity.admit_peer` / `admit_node` are plain decisions (a `Refusal` or None); the server
turns a refusal into the gRPC status that ends the stream.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .limits import is_loopback_peer, peer_host, shown

log = logging.getLogger(__name__)

AuthContext = Mapping[str, Iterable[bytes]]
REFUSAL_REASONS = ("plaintext_peer", "no_client_certificate", "no_node_id", "identity_mismatch")


@dataclass(frozen=True)
class Refusal:
    code: str  # gRPC status name
    reason: str  # one of REFUSAL_REASONS (a metric label)
    message: str


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path
    key_file: Path
    ca_file: Path  # the CA that signs the clients' (Envoys') certificates


@dataclass(frozen=True)
class NodeIdentity:
    """Which SAN of a client certificate names the node: `uri:<pattern>` or `dns:<pattern>`,
    where the pattern holds `{node_id}` once (e.g. `uri:spiffe://mesh.example/envoy/{node_id}`)."""

    kind: str
    pattern: str

    @classmethod
    def parse(cls, text: str) -> NodeIdentity:
        kind, sep, pattern = text.partition(":")
        if not sep or kind not in ("uri", "dns"):
            raise ValueError(f"expected uri:<pattern> or dns:<pattern>, got {text!r}")
        if pattern.count("{node_id}") != 1 or pattern.replace("{node_id}", "").count("{") or "}" in pattern.replace(
            "{node_id}", ""
        ):
            raise ValueError(f"the pattern must hold {{node_id}} exactly once and no other braces, got {pattern!r}")
        return cls(kind, pattern)

    def expected(self, node_id: str) -> str:
        return self.pattern.replace("{node_id}", node_id)

    def names(self, auth: AuthContext) -> list[str]:
        key = "peer_uri" if self.kind == "uri" else "peer_dns"
        return [value.decode(errors="replace") for value in auth.get(key, ())]

    def __str__(self) -> str:
        return f"{self.kind}:{self.pattern}"


DEFAULT_IDENTITY = NodeIdentity.parse("uri:spiffe://repstage/envoy/{node_id}")


@dataclass(frozen=True)
class XdsSecurity:
    tls: TlsFiles | None = None
    identity: NodeIdentity = DEFAULT_IDENTITY
    insecure: bool = False

    def admit_peer(self, peer: str, auth: AuthContext) -> Refusal | None:
        """At a stream's start: a plaintext stream from a non-loopback peer is refused unless
        `insecure`; with TLS a client certificate is required (grpcio's handshake already
        insists; this guards a misconfiguration)."""
        if self.tls is None:
            if self.insecure or is_loopback_peer(peer):
                return None
            return Refusal(
                "PERMISSION_DENIED",
                "plaintext_peer",
                f"plaintext xDS is served to loopback peers only, and {peer_host(peer)} is not one: "
                "configure xds.tls (mTLS), or set xds.insecure: true",
            )
        if not list(auth.get("x509_pem_cert", ())):
            return Refusal("UNAUTHENTICATED", "no_client_certificate", "xDS needs a client certificate (mTLS)")
        return None

    def admit_node(self, auth: AuthContext, node_id: str | None) -> Refusal | None:
        """At the first request: with TLS, the announced node id must match the certificate."""
        if self.tls is None:
            return None
        if not node_id:
            return Refusal("UNAUTHENTICATED", "no_node_id", "the first xDS request must carry node.id")
        expected = self.identity.expected(node_id)
        names = self.identity.names(auth)
        if expected in names:
            return None
        return Refusal(
            "PERMISSION_DENIED",
            "identity_mismatch",
            f"node id {shown(node_id)} does not match the client certificate: expected the "
            f"{self.identity.kind.upper()} SAN {shown(expected)}, the certificate has "
            f"{', '.join(shown(n) for n in names[:4]) or 'none'}",
        )


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


class CertificateReloader:
    """grpcio's `certificate_configuration_fetcher`: the server certificate, key and client CA,
    reloaded when one of the files changes (checked before every handshake)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.reloads = 0
        self._stamps = self._current_stamps()
        self.initial = self._load()
        self._ssl: ssl.SSLContext | None = None

    def _current_stamps(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(_stamp(p) for p in (self.files.cert_file, self.files.key_file, self.files.ca_file))

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert = self.files.cert_file.read_bytes()
        key = self.files.key_file.read_bytes()
        ca = self.files.ca_file.read_bytes()
        check_pair(cert, key, self.files)
        x509.load_pem_x509_certificates(ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """None: keep the current configuration (nothing changed, or the new files are not
        a usable set yet, e.g. the key was written but not the certificate)."""
        try:
            stamps = self._current_stamps()
            if stamps == self._stamps:
                return None
            config = self._load()
        except (OSError, ValueError) as exc:
            log.warning("xDS TLS: keeping the current certificate: %s", exc)
            return None
        self._stamps = stamps
        self.reloads += 1
        log.info("xDS TLS: reloaded %s, %s and %s", *(str(p) for p in (self.files.cert_file, self.files.key_file, self.files.ca_file)))
        return config

    def ssl_context(self) -> ssl.SSLContext:
        """The h2 transport's context for the next handshake (http2.py), built again when
        `fetch` saw a new usable set of files."""
        if self.fetch() is not None or self._ssl is None:
            try:
                self._ssl = _server_context(self.files)
            except (OSError, ssl.SSLError) as exc:
                if self._ssl is None:
                    raise
                log.warning("xDS TLS: keeping the current certificate: %s", exc)
        return self._ssl

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch, require_client_authentication=True)


def check_pair(cert_pem: bytes, key_pem: bytes, files: TlsFiles) -> None:
    """ValueError unless the key is the certificate's (a half-rotated pair is not loaded)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if public != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError(f"{files.key_file} is not the key of {files.cert_file}")


def _server_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert_file, files.key_file)
    context.load_verify_locations(cafile=str(files.ca_file))
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


def auth_context_of(der: bytes | None) -> dict[str, list[bytes]]:
    """grpcio's auth context (the keys `XdsSecurity` reads) for a verified client certificate."""
    if not der:
        return {"transport_security_type": [b"ssl"]}
    cert = x509.load_der_x509_certificate(der)
    auth: dict[str, list[bytes]] = {
        "transport_security_type": [b"ssl"],
        "x509_pem_cert": [cert.public_bytes(serialization.Encoding.PEM)],
    }
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return auth
    auth["peer_uri"] = [str(v).encode() for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    auth["peer_dns"] = [str(v).encode() for v in san.get_values_for_type(x509.DNSName)]
    return auth
