"""The config file's sections and their field types (one pydantic model per section)."""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from repstage_mesh.config.snapshot_sections import SnapshotActionFields
from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.models import NAME_PATTERN, Name, ServiceSpec

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
RAFT_PASSWORD_MIN_LENGTH = 16


def _long_enough(value: SecretStr) -> SecretStr:
    if len(value.get_secret_value()) < RAFT_PASSWORD_MIN_LENGTH:
        raise ValueError(
            f"must be at least {RAFT_PASSWORD_MIN_LENGTH} characters (it keys the encryption and "
            "authentication of every Raft peer)"
        )
    return value


RaftPassword = Annotated[SecretStr, AfterValidator(_long_enough)]


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


_ADVERTISE = (
    "HOST:PORT the other nodes (and Envoys, for xDS) reach this one at; default: the listen "
    "address, or 127.0.0.1 for a wildcard bind on a single node. Required in a multi-node "
    "cluster when the listen address is a wildcard (0.0.0.0, ::)"
)


def is_wildcard(host: str) -> bool:
    return host in _WILDCARDS


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and "localhost" (a DNS name is otherwise taken as not loopback)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _advertised(listen: str, advertise: str | None, bound_port: int | None = None) -> str:
    """HOST:PORT to announce: `advertise` if set, else the listen address (a wildcard host
    becomes 127.0.0.1: only right for a single node, which the settings check)."""
    if advertise is not None:
        return advertise
    host, port = parse_host_port(listen)
    if is_wildcard(host):
        host = "127.0.0.1"
    port = bound_port if bound_port is not None else port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


TokenRole = Literal["read_write", "read_only"]


def _check_token(value: SecretStr) -> SecretStr:
    secret = value.get_secret_value()
    if not secret or any(c.isspace() or not c.isprintable() for c in secret):
        raise ValueError("a token must be non-empty and contain no whitespace or control characters")
    return value


Token = Annotated[Secret, AfterValidator(_check_token)]


class NamedToken(Section):
    """One entry of `api.tokens` (list shape): who holds it (audit trail) and what it may do."""

    name: Name = Field(description="shown in the audit trail (GET /v1/audit) for this token's writes")
    role: TokenRole
    token: Token


class ApiTokens(Section):
    """Bearer tokens for the REST API. No tokens section: the API needs no token.

    Two shapes: a list of named tokens (`[{name, role, token}]`), or the older mapping
    (`{read_write: [...], read_only: [...]}`), whose tokens are named read-write-1,
    read-only-1, ... in the audit trail. A token may be listed only once.
    """

    read_write: tuple[Token, ...] = ()
    read_only: tuple[Token, ...] = ()
    named: tuple[NamedToken, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _list_shape(cls, data: Any) -> Any:
        if isinstance(data, (list, tuple)):
            return {"named": data}
        return data

    @property
    def enabled(self) -> bool:
        return bool(self.read_write or self.read_only or self.named)

    def entries(self) -> tuple[NamedToken, ...]:
        """Every token with its name and role (the older shape's tokens named by position)."""
        legacy = [
            NamedToken(name=f"{role.replace('_', '-')}-{i + 1}", role=role, token=token)
            for role in ("read_write", "read_only")
            for i, token in enumerate(getattr(self, role))
        ]
        return (*legacy, *self.named)

    @model_validator(mode="after")
    def _disjoint(self) -> ApiTokens:
        writers = {t.get_secret_value() for t in self.read_write}
        problems = [
            f"read_only[{i}]: this token is also in read_write; list it once"
            for i, token in enumerate(self.read_only)
            if token.get_secret_value() in writers
        ]
        names: dict[str, int] = {}
        values: dict[str, int] = {}
        for i, entry in enumerate(self.named):
            if entry.name in names:
                problems.append(f"named[{i}].name: {entry.name!r} is also named[{names[entry.name]}]")
            value = entry.token.get_secret_value()
            if value in values or value in writers or any(value == t.get_secret_value() for t in self.read_only):
                problems.append(f"named[{i}].token: this token is listed twice; each token once")
            names.setdefault(entry.name, i)
            values.setdefault(value, i)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def role_of(self, token: str) -> str | None:
        """ "read_write", "read_only" or None for an unknown token."""
        for entry in self.entries():
            if entry.token.get_secret_value() == token:
                return entry.role
        return None

    def first(self, role: TokenRole) -> str | None:
        """The first token of `role` (what this node shows another node's API)."""
        for entry in self.entries():
            if entry.role == role:
                return entry.token.get_secret_value()
        return None


class ApiTls(Section):
    """Serve the REST API over HTTPS. Files are read when the API starts."""

    cert_file: Path = Field(description="PEM certificate chain")
    key_file: Path = Field(description="PEM private key")
    ca_file: Path | None = Field(
        default=None, description="CA this node trusts when it calls another node's API (default: system CAs)"
    )

    def server_context(self) -> ssl.SSLContext:
        """The API's TLS context (TLS 1.2 or later). Raises OSError / ssl.SSLError."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """What this node uses to call another node's API: ca_file, else the system CAs."""
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)


class ApiConfig(Section):
    listen: HostPort = Field(default="127.0.0.1:8080", description="HOST:PORT the REST API binds")
    advertise: HostPort | None = Field(default=None, description=_ADVERTISE)
    tokens: ApiTokens | None = None
    # seconds a cluster-wide view (GET /v1/proxies?scope=cluster, `status`) waits for each other
    # node; a node that does not answer in time is shown as unreachable
    peer_timeout: float = Field(default=1.0, gt=0, le=60)
    switchover_wait: float = Field(
        default=120.0, gt=0, le=3600,
        description="longest a POST .../switchover is held open (default and cap of the request's "
        "`wait`); a switchover still running then is answered 504 with its record",
    )
    tls: ApiTls | None = Field(default=None, description="HTTPS for the API; omitted: plain HTTP")
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, le=64 * 1024 * 1024,
        description="largest request body accepted (413 above; metric repstage_api_limit_hits_total)",
    )
    max_json_depth: int = Field(
        default=32, ge=2, le=512,
        description="deepest nesting of a JSON request body (400 deeper; metric repstage_api_limit_hits_total)",
    )
    audit_entries: int = Field(
        default=1000, ge=0, le=100_000,
        description="writes kept in the replicated audit trail (GET /v1/audit), oldest dropped first",
    )
    consistent_read_interval: float = Field(
        default=0.005, ge=0, le=10,
        description="?consistent=true: at most one Raft read barrier per this many seconds; "
        "concurrent and following reads share it (see README)",
    )

    def advertised(self, bound_port: int | None = None) -> str:
        return _advertised(self.listen, self.advertise, bound_port)


class FailoversConfig(Section):
    """The failover history every node holds (replicated through Raft)."""

    history: int = Field(
        default=100, ge=1, le=10_000,
        description="failover records kept in the replicated history; the oldest drop out "
        "(metric repstage_failover_history_total{event=\"dropped\"})",
    )
    idempotency_keys: int = Field(
        default=1000, ge=1, le=100_000,
        description="announce idempotency keys remembered in the replicated state; the oldest are forgotten",
    )


class SnapshotSettings(SnapshotActionFields):
    """Snapshots the leader coordinates (`POST /v1/services/{name}/snapshots`).

    `pre_hook`/`post_hook` name hooks of the operator's `hooks:` section (each with its own
    timeout); the post-hook is owed (leased in Raft) as soon as the pre-hook started."""

    storage: str = Field(
        default="file://<data_dir>/snapshots",
        description="where artifacts go: file:///dir or s3://bucket/prefix; <data_dir> is node.data_dir",
    )
    lag_bound_bytes: int = Field(
        default=16 * 1024 * 1024, ge=0,
        description="a replica further behind the primary than this is not chosen "
        "(metric repstage_snapshot_choices_total{choice=\"primary_fallback\"} when none qualifies)",
    )
    take_timeout: float = Field(default=600.0, gt=0, le=86_400, description="seconds the action may take")
    drain_timeout: float = Field(
        default=30.0, gt=0, le=3600,
        description="seconds to wait for every proxy's ACK and for the member's connections to reach 0",
    )
    pre_hook: str | None = Field(default=None, description="name of a hook run after the drain, before the action")
    post_hook: str | None = Field(default=None, description="name of a hook run after the action, whatever happened")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (default: AWS)")
    envoy_admins: tuple[HostPort, ...] = Field(
        default=(),
        description="Envoy admin addresses (HOST:PORT) whose /clusters counters prove a drained "
        "member has no connections left; empty: only the proxies' ACKs are waited for",
    )
    keep: int = Field(default=100, ge=1, le=10_000, description="finished snapshots kept in the replicated state")
    consistent_hold_ms: int = Field(default=200, ge=10, le=10_000, description="a consistent point holds new writes at most this long (metric repstage_snapshot_limits_total{limit=\"consistent_hold\"} when hit)")

    def storage_uri(self, data_dir: str | Path) -> str:
        return self.storage.replace("<data_dir>", str(Path(data_dir).resolve()))


class RaftConfig(Section):
    """Omit `peers` for a single node. With peers, `password` is required: pysyncobj peers
    exchange pickles, so without it anyone reaching the Raft port can run code.

    `bind` is where the Raft port listens; `advertise` (default: `bind`) is this node's Raft
    identity, the exact string the other nodes list in their `peers`."""

    bind: HostPort = Field(default="127.0.0.1:7001", description="HOST:PORT the Raft port binds")
    advertise: HostPort | None = Field(
        default=None,
        description="HOST:PORT the other nodes reach this one at, spelt exactly as in their "
        "raft.peers; default: bind. Required when bind is a wildcard (0.0.0.0, ::)",
    )
    peers: tuple[HostPort, ...] = ()
    password: RaftPassword | None = None
    durable_journal: bool = Field(
        default=True,
        description="msync the journal and fsync term and vote before acknowledging; false is "
        "faster, logs a warning, and a power loss of a majority can lose acknowledged writes",
    )
    unauthenticated_frame_limit: Annotated[int, Field(ge=1024, le=2**31 - 1)] = Field(
        default=65536,
        description="largest frame (bytes) accepted from a Raft peer before it proved the "
        "password; a bigger one drops the connection (metric repstage_raft_frames_refused_total)",
    )

    @property
    def identity(self) -> str:
        """This node's Raft address as the peers know it."""
        return self.advertise if self.advertise is not None else self.bind

    @model_validator(mode="after")
    def _cluster(self) -> RaftConfig:
        problems = []
        seen: dict[str, int] = {}
        own = "raft.advertise" if self.advertise is not None else "raft.bind"
        for i, peer in enumerate(self.peers):
            if peer == self.identity:
                problems.append(
                    f"peers[{i}]: {peer!r} is this node's own {own}; list only the others"
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


class LogConfig(Section):
    """The server's log (telemetry/logs.py). `serve --log-format` overrides `format`."""

    format: Literal["text", "json"] = Field(
        default="text", description="text: readable lines with key=value fields; json: one JSON object per line"
    )
    level: Literal["debug", "info", "warning", "error"] = "info"


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
    register_address: HostPort | None = Field(
        default=None,
        description="HOST:PORT registered in Consul for this node's API and checked by Consul "
        "(the address other hosts reach it at); default: api.listen unless it is a wildcard, "
        "else the Consul agent's node address",
    )
    check_interval: float = Field(
        default=1.0, gt=0, le=3600, description="seconds between Consul's checks of /healthz"
    )
    deregister_after: float = Field(
        default=60.0,
        ge=60,
        le=86400,
        description="Consul removes this node's registration after its check is critical this "
        "long (DeregisterCriticalServiceAfter; Consul's minimum is 1 min)",
    )
    resync_interval: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="seconds between checks that the registration is still in Consul "
        "(re-registered when it is gone)",
    )

    max_query_rate: float = Field(
        default=20.0,
        gt=0,
        le=1000,
        description="blocking health queries per second and service at most, after "
        "query_burst (Consul's advice: a churning answer degrades into polling, not a busy loop)",
    )
    query_burst: int = Field(
        default=5, ge=1, le=1000, description="health queries sent at once before pacing"
    )

    @field_validator("register_address")
    @classmethod
    def _reachable(cls, value: str | None) -> str | None:
        if value is not None and parse_host_port(value)[0] in ("0.0.0.0", "::", "*"):
            raise ValueError(
                "a wildcard is no address Consul can check: give the address other hosts reach "
                "this node's API at"
            )
        return value


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


