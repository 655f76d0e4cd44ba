"""Request, response and settings models of the REST API.

These pydantic models are the single source of truth: the handlers validate request bodies with
them and serialise responses through them, and `api_openapi.py` generates the OpenAPI document
from the same classes. Change a model here and the document follows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from repstage_mesh.config import ApiTls, ApiTokens
from repstage_mesh.core.addresses import is_loopback
from repstage_mesh.core.models import AuditEntry, Name, Role, ServiceProtocol, ServiceSpec

# --- settings -----------------------------------------------------------------------------------


def split_host_port(listen: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:8080") into host and port; ValueError saying what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, for example 127.0.0.1:8080, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


class ApiSettings(BaseModel):
    """The `api:` section of the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = Field(default="127.0.0.1:8080", description="HOST:PORT the REST API binds")
    tokens: ApiTokens = Field(default_factory=ApiTokens)
    commit_timeout: float = Field(
        default=5.0, gt=0, le=120, description="seconds a write waits for its commit"
    )
    tls: ApiTls | None = None
    max_body_bytes: int = Field(default=1024 * 1024, ge=1, description="413 above")
    max_json_depth: int = Field(default=32, ge=1, description="400 deeper")
    audit_entries: int = Field(default=1000, ge=0, description="audit trail length (replicated)")
    consistent_read_interval: float = Field(default=0.005, ge=0, description="read barriers at most this often")
    hook_names: frozenset[str] = Field(default=frozenset(), description="hooks the config defines")
    secret_hosts: dict[str, frozenset[str] | None] = Field(
        default_factory=dict, description="secrets the config defines, with the addresses each may go to (None: any)"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_host_port(value)
        return value

    @classmethod
    def from_config(
        cls, api: Any, commit_timeout: float = 5.0, *, hooks: Any = (), secrets: Any = ()
    ) -> ApiSettings:
        """From config.ApiConfig, the names of the config's hooks and its secrets' allowed hosts
        (`Secrets.hosts()`), which a service body may name."""
        tokens = getattr(api, "tokens", None)
        return cls(
            listen=api.listen,
            tokens=tokens if tokens is not None else ApiTokens(),
            commit_timeout=commit_timeout,
            tls=api.tls,
            max_body_bytes=api.max_body_bytes,
            max_json_depth=api.max_json_depth,
            audit_entries=api.audit_entries,
            consistent_read_interval=api.consistent_read_interval,
            hook_names=frozenset(hooks),
            secret_hosts=dict(secrets),
        )

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]


# --- requests -------------------------------------------------------------------------------------


class ServiceSpecBody(ServiceSpec):
    """PUT /v1/services/{name} body: a ServiceSpec whose `name` may be left out (the path names it).

    When given, `name` must equal the name in the path.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "protocol": "tcp",
                    "listen_port": 15000,
                    "read_port": 15001,
                    "members": [
                        {"name": "a", "address": "127.0.0.1", "port": 9001},
                        {"name": "b", "address": "127.0.0.1", "port": 9002},
                    ],
                    "primary": "a",
                }
            ]
        }
    )

    name: Name | None = None  # type: ignore[assignment]


class PrimaryRequest(BaseModel):
    """POST /v1/services/{name}/primary body."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"examples": [{"member": "b", "cause": "planned switchover", "epoch": 7}]},
    )

    member: Name | None = Field(
        description="the member that is now primary, or null: no primary is known (fail closed)"
    )
    epoch: int | None = Field(
        default=None,
        ge=1,
        description="the caller's fencing token (Patroni's term, Sentinel's epoch...): it must be "
        "greater than every token claimed for this service before, or the claim is refused (409); "
        "kept per service, independent of our own epoch (the Raft index that committed the role)",
    )
    cause: str = Field(default="api", max_length=200, description="why, recorded with the change")
    fence: bool = Field(
        default=True,
        description="break-before-make (the default): fail closed, wait until every proxy ACKed and "
        "closed its connections to the old primary, then route the new one; false routes at once",
    )
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
        description="the same as the Idempotency-Key header: a retry with the same key answers the "
        "first request's change instead of making another",
    )


# --- responses ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """One problem with the request, when there are several."""

    field: str | None = Field(description="dotted path of the offending field, e.g. members.1.port")
    message: str
    type: str | None = Field(default=None, description="machine-readable kind of the problem")


class ErrorInfo(BaseModel):
    code: str = Field(
        description=(
            "stable code: malformed_json, too_large, too_deep, invalid, unauthorized, forbidden, "
            "misdirected, not_found, method_not_allowed, stale_epoch, conflict, no_quorum, "
            "commit_timeout, not_ready, internal"
        )
    )
    message: str = Field(description="what went wrong and what to do about it")
    field: str | None = Field(
        default=None, description="dotted path of the offending field, when there is one"
    )
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """Every error answer has this shape."""

    error: ErrorInfo


class MemberView(BaseModel):
    name: str
    address: str
    port: int
    role: Role


class ServiceView(BaseModel):
    """A service as this node's applied state holds it."""

    name: str
    protocol: ServiceProtocol
    listen_port: int
    read_port: int | None
    primary: str | None = Field(
        description="current primary, null when none is known (traffic is refused)"
    )
    epoch: int = Field(description="Raft index that committed the current role")
    changed_at: int = Field(description="Raft index of the last change to this service")
    members: list[MemberView]
    spec: ServiceSpec = Field(description="the spec as declared")
    applied_index: int = Field(
        description="Raft index this node has applied: how fresh this view is"
    )


class ServiceList(BaseModel):
    services: list[ServiceView]
    applied_index: int


class PrimaryView(BaseModel):
    service: str
    primary: str | None
    epoch: int
    members: list[MemberView]
    applied_index: int


class PrimaryChange(BaseModel):
    """The answer to POST /v1/services/{name}/primary."""

    service: str
    primary: str | None
    epoch: int
    previous_primary: str | None
    changed: bool = Field(
        description="false when the claim repeated the current primary and nothing changed"
    )
    applied_index: int
    replayed: bool = Field(
        default=False, description="true when this answers an earlier request with the same idempotency key"
    )


class DeleteResult(BaseModel):
    deleted: str
    applied_index: int


class ProxyTypeView(BaseModel):
    """What one proxy was sent, ACKed and NACKed for one resource type (times: Unix seconds)."""

    model_config = ConfigDict(extra="allow")

    type_url: str
    sent_version: str | None = None
    sent_at: float | None = None
    acked_version: str | None = None
    acked_at: float | None = None
    nacked_version: str | None = None
    nacked_at: float | None = None
    error: str | None = Field(default=None, description="Envoy's error text for the last NACK")
    last_ack_latency_seconds: float | None = None
    sync: str | None = Field(default=None, description="synced, behind, pending, nacked, ahead or idle")
    behind: bool = Field(
        default=False, description="the ACKed version differs from the committed one"
    )


class ProxyView(BaseModel):
    """One Envoy this node serves (or served recently), from the xDS proxy tracker."""

    model_config = ConfigDict(extra="allow")

    node_id: str
    cluster: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    user_agent: str | None = None
    stream_id: int | None = None
    stream_kind: str | None = Field(default=None, description="sotw or delta")
    control_plane: str | None = Field(
        default=None, description="the control-plane node serving the stream"
    )
    connected: bool = True
    connected_at: float | None = None
    disconnected_at: float | None = None
    snapshot_version: str | None = None
    synced: bool | None = None
    types: dict[str, ProxyTypeView] = Field(
        default_factory=dict, description="by short type name: cds, eds, lds, rds"
    )
    version_ahead: bool = Field(
        default=False,
        description="the proxy claims a version newer than this node's snapshot; not waited for",
    )
    claimed_version: str | None = Field(default=None, description="the claimed version, when ahead")
    never_acked: bool = Field(
        default=False,
        description="first sent config xds.never_acked_grace seconds ago, never ACKed: not waited for",
    )


class ConfigDriftView(BaseModel):
    service: str
    kind: Literal["changed", "missing", "unmanaged"] = Field(
        description="changed: fields differ; missing: in the file only; unmanaged: replicated only"
    )
    fields: list[str] = Field(default_factory=list, description="the spec fields that differ")


class ClusterView(BaseModel):
    """This node's Raft view. More fields may be present."""

    model_config = ConfigDict(extra="allow")

    node_id: str
    leader: str | None = None
    applied_index: int
    config_drift: list[ConfigDriftView] = Field(
        default_factory=list,
        description="services whose spec in this node's config file differs from the replicated "
        "one (the file only seeds; `repstage-mesh apply FILE` applies it)",
    )


class HealthView(BaseModel):
    status: Literal["ok"] = "ok"
    node_id: str


class AuditView(BaseModel):
    """The replicated audit trail: the last writes that changed something, newest first."""

    entries: list[AuditEntry]
    keep: int = Field(description="how many entries the trail keeps (api.audit_entries of the last write)")
    applied_index: int


class ReadyView(BaseModel):
    ready: bool
    node_id: str
    applied_index: int


def member_views(spec: ServiceSpec, primary: str | None) -> list[MemberView]:
    return [
        MemberView(
            name=m.name,
            address=m.address,
            port=m.port,
            role=Role.PRIMARY if m.name == primary else Role.REPLICA,
        )
        for m in spec.members
    ]


__all__ = [
    "ApiSettings",
    "ApiTokens",
    "AuditView",
    "ClusterView",
    "DeleteResult",
    "ErrorBody",
    "ErrorDetail",
    "ErrorInfo",
    "HealthView",
    "MemberView",
    "PrimaryChange",
    "PrimaryRequest",
    "PrimaryView",
    "ProxyTypeView",
    "ProxyView",
    "ReadyView",
    "ServiceList",
    "ServiceSpecBody",
    "ServiceView",
    "is_loopback",
    "member_views",
    "split_host_port",
]
