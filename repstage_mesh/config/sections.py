"""The config file's sections and their field types (one pydantic model per section)."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.models import NAME_PATTERN, Name, ServiceSpec
from repstage_mesh.render.options import PrimaryStrategy, RenderOptions

ENV_PREFIX = "REPSTAGE_"
ENV_DELIMITER = "__"

ErrorList = list[tuple[str, str]]


# --- field types ------------------------------------------------------------------------------

_WILDCARDS = {"0.0.0.0", "::", ""}


def _host_port(value: str) -> str:
    parse_host_port(value)
    return value


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"expected an IP address, got {value!r}") from None
    return value


def _consul_address(value: str) -> str:
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected HOST:PORT or an http(s):// URL, got {value!r}")
        return value
    try:
        parse_host_port(value)
    except ValueError:
        raise ValueError(f"expected HOST:PORT or an http(s):// URL, got {value!r}") from None
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]
IPAddress = Annotated[str, AfterValidator(_ip_address)]
Secret = Annotated[SecretStr, Field(min_length=1)]


def default_node_id() -> str:
    """The host name's first label made a valid node id, or "cp-1" when it cannot be."""
    try:
        label = socket.gethostname().split(".")[0].lower()
    except OSError:
        label = ""
    label = re.sub(r"[^a-z0-9-]+", "-", label).strip("-")[:63].strip("-")
    return label if re.fullmatch(NAME_PATTERN, label) else "cp-1"


# --- sections ---------------------------------------------------------------------------------


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeConfig(Section):
    id: Name = Field(default_factory=default_node_id, description="this control-plane node's name")
    data_dir: Path = Field(description="Raft journal and snapshots; default ./.repstage/<id>")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            if data.get("id") in (None, ""):
                data["id"] = default_node_id()
            if data.get("data_dir") in (None, ""):
                data["data_dir"] = Path(".repstage") / str(data["id"])
        return data


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


class XdsConfig(Section):
    listen: HostPort = "127.0.0.1:18000"
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

    @model_validator(mode="after")
    def _plaintext_on_loopback(self) -> XdsConfig:
        """The API's rule: no authentication, loopback only. A wildcard address is allowed
        (streams from non-loopback peers are refused); a concrete non-loopback one is not."""
        host = parse_host_port(self.listen)[0]
        if self.tls is None and not self.insecure and host not in _WILDCARDS and not _is_loopback(host):
            raise ValueError(
                f"listen: plaintext xDS on {host} would refuse every peer (plaintext is served to "
                "loopback peers only): configure xds.tls, listen on 127.0.0.1, or set xds.insecure: true"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiTokens(Section):
    """Bearer tokens for the REST API. No tokens section: the API needs no token."""

    read_write: tuple[Secret, ...] = ()
    read_only: tuple[Secret, ...] = ()

    @field_validator("read_write", "read_only")
    @classmethod
    def _no_whitespace(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for token in value:
            secret = token.get_secret_value()
            if not secret or any(c.isspace() for c in secret):
                raise ValueError("a token must be non-empty and contain no whitespace")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.read_write or self.read_only)

    @model_validator(mode="after")
    def _disjoint(self) -> ApiTokens:
        writers = {t.get_secret_value() for t in self.read_write}
        problems = [
            f"read_only[{i}]: this token is also in read_write; list it once"
            for i, token in enumerate(self.read_only)
            if token.get_secret_value() in writers
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def role_of(self, token: str) -> str | None:
        """ "read_write", "read_only" or None for an unknown token."""
        if any(t.get_secret_value() == token for t in self.read_write):
            return "read_write"
        if any(t.get_secret_value() == token for t in self.read_only):
            return "read_only"
        return None


class ApiConfig(Section):
    listen: HostPort = "127.0.0.1:8080"
    tokens: ApiTokens | None = None


class RaftConfig(Section):
    """Omit `peers` for a single node. With peers, `password` is required: pysyncobj peers
    exchange pickles, so without it anyone reaching the Raft port can run code."""

    bind: HostPort = "127.0.0.1:7001"
    peers: tuple[HostPort, ...] = ()
    password: Secret | None = None

    @model_validator(mode="after")
    def _cluster(self) -> RaftConfig:
        problems = []
        seen: dict[str, int] = {}
        for i, peer in enumerate(self.peers):
            if peer == self.bind:
                problems.append(
                    f"peers[{i}]: {peer!r} is this node's own raft.bind; list only the others"
                )
            elif peer in seen:
                problems.append(
                    f"peers[{i}]: {peer!r} is listed twice (also raft.peers[{seen[peer]}])"
                )
            seen.setdefault(peer, i)
        if self.peers and self.password is None:
            problems.append(
                "password: required when raft.peers is set (a multi-node cluster); "
                "set raft.password or REPSTAGE_RAFT__PASSWORD"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def multi_node(self) -> bool:
        return bool(self.peers)


class EnvoyConfig(Section):
    """How replicated state is rendered for Envoy. Identical on every control-plane node."""

    listen_address: IPAddress = Field(
        default="0.0.0.0", description="where rendered listeners bind"
    )
    primary_strategy: PrimaryStrategy = Field(
        default=PrimaryStrategy.HEALTH_FENCE,
        description="how open connections to a demoted primary are closed (see bench/close_on_switch.md)",
    )
    fence_port: Annotated[int, Field(ge=1, le=65534)] = Field(
        default=15990,
        description="health_fence: two loopback ports on each Envoy, fence_port and fence_port + 1, for the fence listeners",
    )
    fence_interval_ms: int = Field(
        default=100, ge=10, le=10_000,
        description="health_fence: how often Envoy re-checks who the primary is; bounds how long an open connection to a demoted primary survives",
    )

    def render_options(self, telemetry: TelemetryConfig | None = None) -> RenderOptions:
        """`telemetry` with envoy_tracing on adds Envoy's OpenTelemetry tracer to HTTP listeners
        and the collector's cluster."""
        interval = timedelta(milliseconds=self.fence_interval_ms)
        collector = telemetry.envoy_collector() if telemetry is not None else None
        return RenderOptions(
            bind_address=self.listen_address,
            primary_strategy=self.primary_strategy,
            fence_port=self.fence_port,
            fence_interval=interval,
            fence_timeout=min(timedelta(seconds=1), interval * 10),
            tracing_collector_cluster=ENVOY_COLLECTOR_CLUSTER if collector is not None else None,
            tracing_collector_address=collector,
            tracing_sampling_percent=telemetry.envoy_sampling_percent if telemetry is not None else 100.0,
        )


ENVOY_COLLECTOR_CLUSTER = "repstage-otel-collector"


def _collector_host_port(value: str) -> tuple[str, int]:
    """HOST:PORT or http://HOST:PORT of a plaintext OTLP/gRPC collector, as Envoy reaches it."""
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme != "http" or parts.path not in ("", "/") or parts.query:
            raise ValueError(
                f"Envoy exports spans over plaintext gRPC: give HOST:PORT or http://HOST:PORT, got {value!r}"
            )
        value = parts.netloc
    return parse_host_port(value)


class TelemetryConfig(Section):
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP gRPC endpoint; None: no export"
    )
    service_name: str = Field(default="repstage-mesh", min_length=1)
    envoy_tracing: bool = Field(
        default=False,
        description="HTTP services: Envoy's own OpenTelemetry tracer in the rendered "
        "http_connection_manager, exporting to envoy_otlp_endpoint (default otlp_endpoint); the "
        "collector's cluster is sent to Envoy over CDS",
    )
    envoy_otlp_endpoint: str | None = Field(
        default=None,
        description="HOST:PORT (or http://HOST:PORT) where Envoy reaches the collector, if not otlp_endpoint",
    )
    envoy_sampling_percent: float = Field(
        default=100.0, ge=0.0, le=100.0,
        description="share of requests without an incoming sampling decision that Envoy traces",
    )

    @model_validator(mode="after")
    def _envoy(self) -> TelemetryConfig:
        self.envoy_collector()
        return self

    def envoy_collector(self) -> tuple[str, int] | None:
        """(host, port) of the collector Envoy exports to; None when envoy_tracing is off.
        Only the config file counts (not OTEL_* variables): every node must render the same."""
        if not self.envoy_tracing:
            return None
        field, value = (
            ("envoy_otlp_endpoint", self.envoy_otlp_endpoint)
            if self.envoy_otlp_endpoint is not None
            else ("otlp_endpoint", self.otlp_endpoint)
        )
        if value is None:
            raise ValueError(
                "envoy_tracing: needs telemetry.otlp_endpoint or telemetry.envoy_otlp_endpoint "
                "(the collector Envoy exports spans to)"
            )
        try:
            return _collector_host_port(value.strip())
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None


class ConsulConfig(Section):
    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)

    address: Annotated[str, AfterValidator(_consul_address)] | None = None
    token: Secret | None = None
    # `register` in the file; a field of that name would shadow BaseModel.register (ABCMeta).
    register_service: bool = Field(default=True, alias="register")


class ServiceConfig(Section):
    """One entry of `services:`: the domain's ServiceSpec plus per-service config sections.

    In the file the spec's fields sit flat at the entry's top level, next to sections that are
    not part of the spec (a `leadership:` section is to come). Add such sections as fields here;
    every other key goes to the spec.
    """

    spec: ServiceSpec

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "spec" not in data:
            own = {k: v for k, v in data.items() if k in cls.model_fields}
            spec = {k: v for k, v in data.items() if k not in cls.model_fields}
            return {**own, "spec": spec}
        return data

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = dict(handler(self))
        return {**data.pop("spec"), **data}

    @property
    def name(self) -> str:
        return self.spec.name


