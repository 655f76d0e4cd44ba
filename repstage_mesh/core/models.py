"""The domain: services, members, roles and epochs, and the commands that change them.

Everything here is immutable and JSON-serialisable, because commands travel through the
Raft log and state is snapshotted to disk. Validation lives on the models (pydantic), so the
REST API, the config file and the Raft log all refuse the same bad input the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from repstage_mesh.core.addresses import check_host
from repstage_mesh.core.verification import SnapshotVerification, VerifySnapshot

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
# Validation context of entries and snapshots read back from the Raft journal: shapes this
# version refuses from a request but older versions wrote are read, without their unsafe part
# (an inline hook, a password variable name), instead of failing to load what was acknowledged.
FROM_LOG = {"from_log": True}


def _from_log(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("from_log"))

Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lower-case DNS label")]
Port = Annotated[int, Field(ge=1, le=65535)]


class ServiceProtocol(StrEnum):
    """How Envoy handles a service's traffic. redis and postgres are TCP with protocol-aware probes."""

    TCP = "tcp"
    HTTP = "http"
    REDIS = "redis"
    POSTGRES = "postgres"


class Role(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Member(Frozen):
    """One replica of a service, reachable at address:port."""

    name: Name
    address: str = Field(
        max_length=253, description="IP address (no IPv6 scope id) or DNS name the proxies connect to"
    )
    port: Port

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_host(value)


class LeadershipSource(StrEnum):
    """Where RepStage learns who the primary is."""

    ANNOUNCE = "announce"  # POST /v1/services/{name}/primary from an orchestrator or a script
    PROBE = "probe"  # RepStage asks every member (Redis ROLE, pg_is_in_recovery(), HTTP, TCP)
    CONSUL = "consul"  # Consul health with blocking queries; primary = passing + tag


class LeadershipMode(StrEnum):
    FOLLOW = "follow"  # someone else promotes; RepStage routes
    ORCHESTRATE = "orchestrate"  # RepStage promotes a replica when the primary fails


class ProbeKind(StrEnum):
    REDIS = "redis"
    POSTGRES = "postgres"
    HTTP = "http"
    TCP = "tcp"


class ProbeSpec(Frozen):
    """How each member is asked whether it is the primary. Defaults suit a LAN."""

    kind: ProbeKind | None = Field(default=None, description="default: from the service protocol (tcp for http services: use kind http with a path)")
    interval: float = Field(default=0.1, gt=0, le=60, description="seconds between probes of one member")
    timeout: float = Field(default=0.25, gt=0, le=60, description="seconds before a silent member counts as failed")
    fall: int = Field(default=3, ge=1, le=100, description="consecutive failures before a member is down")
    rise: int = Field(default=2, ge=1, le=100, description="consecutive successes before a member is up")
    refused_fall: int = Field(default=2, ge=1, le=100, description="consecutive refused connections (each confirmed on a fresh connection) before a member is down; at most fall counts")
    retry_interval: float = Field(default=0.02, gt=0, le=60, description="seconds before the probe that confirms a refused one (instead of interval)")
    path: str = Field(default="/primary", description="http: path that answers expect_status only on the primary")
    port: Port | None = Field(default=None, description="probe this port on each member's address instead of the member's port (e.g. Patroni's REST API, 8008)")
    expect_status: int = Field(default=200, ge=100, le=599)
    user: str | None = Field(default=None, description="postgres: user to connect as")
    database: str = Field(default="postgres")
    password_secret: Name | None = Field(
        default=None,
        description="name of an entry of the config file's `secrets:` section holding the password "
        "(an operator defines secrets; the API can only name them)",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_env_name(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, Mapping) and "password_env" in data:
            if _from_log(info):
                return {k: v for k, v in data.items() if k != "password_env"}
            raise ValueError(
                "password_env: not accepted (it could name any variable of the control plane); "
                "define the password under the config file's secrets: section and name it with "
                "password_secret"
            )
        return data


class ConsulSourceSpec(Frozen):
    service: str | None = Field(default=None, description="Consul service name; default: the RepStage service name")
    tag: str = Field(default="primary", description="tag the primary instance carries (Patroni: primary)")
    wait: float = Field(default=30.0, gt=0, le=600, description="blocking query wait, seconds")


class HookSpec(Frozen):
    """How to promote a member of a service RepStage has no built-in promotion for.

    Defined only by the operator, in the config file's `hooks:` section under a name; a
    service names it (`leadership.promote_hook: NAME`). Never part of an API request.
    """

    command: tuple[str, ...] | None = Field(default=None, min_length=1, description="argv (no shell); {service} {member} {address} {port} {epoch} {old_primary} are substituted")
    url: str | None = Field(default=None, description="POSTed JSON {action, service, member, address, port, epoch, old_primary}")
    timeout: float = Field(default=10.0, gt=0, le=300)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables of a command hook (the rest is the allow-list)")
    secret_env: dict[str, Name] = Field(default_factory=dict, description="environment variable -> name of a secret (secrets: section) given to a command hook")

    @model_validator(mode="after")
    def _one_kind(self) -> HookSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("command: give exactly one of command (argv) or url")
        return self


class LeadershipSpec(Frozen):
    @model_validator(mode="before")
    @classmethod
    def _hook_by_name(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("promote_hook"), Mapping):
            if _from_log(info):
                return {**data, "promote_hook": None}
            raise ValueError(
                "promote_hook: give the name of a hook defined in the config file's hooks: "
                "section; commands and URLs cannot be given here"
            )
        return data

    source: LeadershipSource = LeadershipSource.ANNOUNCE
    mode: LeadershipMode = LeadershipMode.FOLLOW
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    consul: ConsulSourceSpec = Field(default_factory=ConsulSourceSpec)
    promote_hook: Name | None = Field(
        default=None,
        description="name of a hook defined in the config file's hooks: section (the API can only name one)",
    )
    ack_deadline: float = Field(default=2.0, gt=0, le=60, description="break-before-make: longest wait for proxies to stop routing to the old primary")
    min_failover_interval: float = Field(default=5.0, ge=0, le=3600, description="hysteresis: no second automatic failover of this service within this many seconds")
    max_lag_bytes: int | None = Field(default=None, ge=0, description="orchestrate: refuse to promote a replica further behind than this")


class ServiceSpec(Frozen):
    """What an operator declares about a service (config file or PUT /v1/services/{name})."""

    name: Name
    protocol: ServiceProtocol = ServiceProtocol.TCP
    listen_port: Port = Field(description="Envoy listener whose traffic goes only to the primary")
    read_port: Port | None = Field(default=None, description="optional Envoy listener over all healthy members")
    members: tuple[Member, ...] = Field(min_length=1)
    primary: Name | None = Field(default=None, description="initial primary, when known")
    leadership: LeadershipSpec = Field(default_factory=LeadershipSpec)

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSpec:
        names = [m.name for m in self.members]
        problems = []  # every one at once, one per line
        if len(set(names)) != len(names):
            problems.append("members: member names must be unique")
        endpoints = [(m.address, m.port) for m in self.members]
        if len(set(endpoints)) != len(endpoints):
            problems.append("members: two members share one address:port")
        if self.read_port is not None and self.read_port == self.listen_port:
            problems.append("read_port: must differ from listen_port")
        if self.primary is not None and self.primary not in names:
            problems.append(f"primary: {self.primary!r} is not one of the members {names}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def member(self, name: str) -> Member | None:
        for m in self.members:
            if m.name == name:
                return m
        return None


class ServiceState(Frozen):
    """A service as the replicated state holds it: the spec plus who is primary at which epoch."""

    spec: ServiceSpec
    primary: Name | None = None
    epoch: int = Field(default=0, ge=0, description="Raft index that committed the current role; only grows")
    changed_at: int = Field(default=0, ge=0, description="Raft index of the last change to this service")
    promotions: tuple[tuple[str, int], ...] = Field(
        default=(),
        description="(member, how many times it became primary), sorted; the renderer uses it "
        "to give a newly promoted member a fresh Envoy host so it is routable at once",
    )
    claim: int = Field(
        default=0, ge=0,
        description="the highest fencing token an orchestrator claimed (Patroni's term, Sentinel's "
        "epoch...): a claim at or below it is refused; independent of `epoch` (our Raft index)",
    )

    def promotion_count(self, member: str) -> int:
        return dict(self.promotions).get(member, 0)

    def promoted(self, member: str | None) -> tuple[tuple[str, int], ...]:
        """`promotions` after `member` became primary (members no longer in the spec dropped)."""
        counts = {m: c for m, c in self.promotions if self.spec.member(m) is not None}
        if member is not None:
            counts[member] = counts.get(member, 0) + 1
        return tuple(sorted(counts.items()))

    @property
    def name(self) -> str:
        return self.spec.name

    def role_of(self, member: str) -> Role:
        return Role.PRIMARY if member == self.primary else Role.REPLICA


class NodeAddress(Frozen):
    """Where a control-plane node answers, so any node can carry a request to the leader."""

    node_id: str
    raft: str | None = None
    api: str = Field(description="HOST:PORT of its REST API")
    xds: str = Field(default="", description="HOST:PORT of its xDS server")


AUDIT_KEEP = 1000


class AuditEntry(Frozen):
    """One applied write that changed something, as the audit trail keeps it (GET /v1/audit)."""

    index: int = Field(ge=0, description="Raft index of the write")
    actor: str = Field(description="token name (api.tokens), 'loopback' without tokens, or 'control-plane' for the node's own writes")
    action: str = Field(description="put_service, delete_service or set_primary")
    service: str
    detail: str = Field(default="", max_length=300)


class FailoverEntry(Frozen):
    """One failover record as the replicated history holds it (`record` is the record's JSON;
    `rev` grows with every update, so a late update never overwrites a newer one)."""

    id: str = Field(min_length=1, max_length=200)
    rev: int = Field(ge=0)
    record: dict[str, Any]


SnapshotStatus = Literal["running", "completed", "failed", "aborted"]
PoolStatus = Literal["in", "draining", "out"]


class SnapshotStep(Frozen):
    """One step of a snapshot as the replicated state records it (wall-clock seconds)."""

    name: str = Field(min_length=1, max_length=64)
    at: float = Field(ge=0, description="when the step ended (Unix time, the leader's clock)")
    ok: bool
    detail: str = Field(default="", max_length=2000)


class SnapshotEntry(Frozen):
    """A snapshot of one member of a service, from its intent to its end.

    `role` and `epoch` are the member's role and the service's epoch at the intent (Raft index
    `intent_index`): the snapshot can only complete while both still hold. `pool` is where the
    member stands in the read pool (`draining`: still in the read cluster but excluded from load
    balancing, so Envoy's per-host counters stay visible; `out`: absent). `undo` lists what is
    still owed ("post_hook") by whichever node leads; `lease_holder`/`lease_until` say which
    leader runs the snapshot and until when it may still act (Unix time)."""

    id: str = Field(min_length=1, max_length=200)
    service: Name
    member: Name
    role: Role
    epoch: int = Field(ge=0)
    intent_index: int = Field(default=0, ge=0)
    kind: str = Field(default="tcp", max_length=32)
    requested: str = Field(default="replica", max_length=64, description="what the caller asked for")
    status: SnapshotStatus = "running"
    pool: PoolStatus = "in"
    steps: tuple[SnapshotStep, ...] = ()
    undo: tuple[str, ...] = ()
    lease_holder: str = ""
    lease_until: float = 0.0
    error: str = Field(default="", max_length=2000)
    artifact: str = Field(default="", max_length=2000)
    point: dict[str, str] = Field(default_factory=dict)
    size_bytes: int = Field(default=0, ge=0)
    trace: dict[str, str] | None = None
    verification: SnapshotVerification | None = Field(default=None, description="the last restore drill (VerifySnapshot)")
    group: str = Field(default="", max_length=200, description="the consistent point (HoldEntry id) it belongs to")

    @property
    def running(self) -> bool:
        return self.status == "running"


HoldStatus = Literal["intent", "holding", "released", "aborted"]


class HoldEntry(Frozen):
    """A cross-service consistent point: new writes of `services` held for at most `window_ms`.

    `intent` is committed before anything happens; `holding` carries `hold_until` (Unix time,
    the leader's clock), after which every node renders without the hold by itself and Redis
    ends its `CLIENT PAUSE` by itself; `released`/`aborted` end it. `points` holds each
    service's point taken while writes were held; `snapshots` the snapshot id per service."""

    id: str = Field(min_length=1, max_length=200)
    services: tuple[Name, ...] = Field(min_length=1, max_length=32)
    members: dict[str, str] = Field(default_factory=dict, description="service -> member whose point is taken")
    status: HoldStatus = "intent"
    window_ms: int = Field(ge=1, le=60_000)
    hold_until: float = Field(default=0.0, ge=0)
    intent_index: int = Field(default=0, ge=0)
    leader: str = ""
    steps: tuple[SnapshotStep, ...] = ()
    points: dict[str, dict[str, str]] = Field(default_factory=dict)
    snapshots: dict[str, str] = Field(default_factory=dict)
    held_ms: float = Field(default=0.0, ge=0, description="writes held this long (the leader's measure)")
    error: str = Field(default="", max_length=2000)
    trace: dict[str, str] | None = None

    @property
    def open(self) -> bool:
        return self.status in ("intent", "holding")

    def holding(self, now: float) -> bool:
        """Writes are held at `now` (by the committed deadline, whoever leads)."""
        return self.status == "holding" and now < self.hold_until


class MeshState(Frozen):
    """The whole replicated state. `index` is the Raft index of the last applied entry."""

    services: dict[str, ServiceState] = Field(default_factory=dict)
    nodes: dict[str, NodeAddress] = Field(default_factory=dict, description="control-plane nodes by id")
    failovers: tuple[FailoverEntry, ...] = Field(
        default=(), description="the failover history, oldest first (bounded by the commands' `keep`)"
    )
    request_keys: tuple[tuple[str, str], ...] = Field(
        default=(), description="(idempotency key, failover record id), oldest first (bounded)"
    )
    snapshots: tuple[SnapshotEntry, ...] = Field(
        default=(), description="snapshots, oldest first (bounded by StartSnapshot's `keep`; running ones stay)"
    )
    holds: tuple[HoldEntry, ...] = Field(default=(), description="consistent points, oldest first (bounded by StartHold's `keep`)")
    index: int = 0
    last_change: int = Field(default=0, description="Raft index of the last entry that changed anything")
    audit: tuple[AuditEntry, ...] = Field(default=(), description="the last applied writes, oldest first, at most audit_keep")
    audit_keep: int = Field(default=AUDIT_KEEP, ge=0, description="how many audit entries are kept (from the last write's api.audit_entries)")

    def snapshot(self, snapshot_id: str) -> SnapshotEntry | None:
        return next((s for s in self.snapshots if s.id == snapshot_id), None)

    def running_snapshot(self, service: str) -> SnapshotEntry | None:
        return next((s for s in self.snapshots if s.service == service and s.running), None)

    def pool_of(self, service: str, member: str) -> PoolStatus:
        """Where `member` stands in the read pool of `service` (a snapshot may have drained it)."""
        for entry in self.snapshots:
            if entry.service == service and entry.member == member and entry.pool != "in":
                return entry.pool
        return "in"

    def service(self, name: str) -> ServiceState | None:
        return self.services.get(name)

    def hold(self, hold_id: str) -> HoldEntry | None:
        return next((h for h in self.holds if h.id == hold_id), None)

    def held_services(self, now: float) -> frozenset[str]:
        """Services whose new writes are held at `now` (the renderer's 503 route)."""
        return frozenset(s for h in self.holds if h.holding(now) for s in h.services)

    def failover(self, record_id: str) -> FailoverEntry | None:
        for entry in self.failovers:
            if entry.id == record_id:
                return entry
        return None

    def request_key(self, key: str) -> str | None:
        """The failover record id an idempotency key was first used for."""
        for known, record_id in self.request_keys:
            if known == key:
                return record_id
        return None


# --- Commands: every change to MeshState is one of these, committed through the log. ------------


class AuditTag(Frozen):
    """Who asked for a write, carried in the command so that every replica records the same."""

    actor: str = Field(min_length=1, max_length=64)
    keep: int = Field(default=AUDIT_KEEP, ge=0, le=100_000, description="audit entries to keep")


class PutService(Frozen):
    """Define a service, or replace its spec. Keeps the current primary if it is still a member."""

    kind: Literal["put_service"] = "put_service"
    spec: ServiceSpec
    by: AuditTag | None = None


class DeleteService(Frozen):
    kind: Literal["delete_service"] = "delete_service"
    name: Name
    by: AuditTag | None = None


class SetPrimary(Frozen):
    """Claim that `member` is the primary of `service` (None: no primary is known, fail closed).

    `epoch`, when given, is the epoch the claimant asks for: it must be greater than the current
    epoch (for example current + 1), or the claim is stale and refused. The epoch actually
    committed is the Raft index of this entry, which is always greater than the current one.
    """

    kind: Literal["set_primary"] = "set_primary"
    service: Name
    member: Name | None
    epoch: int | None = Field(default=None, ge=1)
    cause: str = Field(default="announce", max_length=200)
    trace: dict[str, str] | None = Field(default=None, description="W3C trace context carried through the log")
    token: int | None = Field(
        default=None, ge=1,
        description="the orchestrator's fencing token (its own epoch/term): must be greater than "
        "the service's `claim`, which it then becomes",
    )
    by: AuditTag | None = None


class Noop(Frozen):
    """Committed by a new leader before it acts (see DESIGN: stale leaders)."""

    kind: Literal["noop"] = "noop"
    term: int = 0
    node: str = ""


class AnnounceNode(Frozen):
    """A control-plane node says where its API answers (committed at start-up)."""

    kind: Literal["announce_node"] = "announce_node"
    node: NodeAddress


class RecordFailover(Frozen):
    """Add or update one failover record in the replicated history (the leader commits each
    record when it starts, at its major steps and when it ends). Changes no routing.

    `keep`: how many records the history holds (the oldest drop out); `key`: an idempotency
    key the record answers (remembered with the newest `keep_keys` keys)."""

    kind: Literal["record_failover"] = "record_failover"
    entry: FailoverEntry
    keep: int = Field(default=100, ge=1, le=100_000)
    key: str | None = Field(default=None, min_length=1, max_length=200)
    keep_keys: int = Field(default=1000, ge=1, le=1_000_000)


class StartSnapshot(Frozen):
    """The intent of a snapshot, committed before anything happens. Refused unless `member` has
    `role` at `epoch` now and no other snapshot of the service runs. `keep`: how many finished
    snapshots the state holds (the oldest drop out)."""

    kind: Literal["start_snapshot"] = "start_snapshot"
    entry: SnapshotEntry
    keep: int = Field(default=100, ge=1, le=100_000)


class UpdateSnapshot(Frozen):
    """A step of a running (or, for its undo, finished) snapshot. Each given field replaces the
    entry's; `steps` are appended. A move to `completed` is refused unless the member still has
    the role and the service the epoch of the intent; a finished snapshot never leaves the pool
    again nor changes status."""

    kind: Literal["update_snapshot"] = "update_snapshot"
    id: str = Field(min_length=1, max_length=200)
    steps: tuple[SnapshotStep, ...] = ()
    status: SnapshotStatus | None = None
    pool: PoolStatus | None = None
    undo: tuple[str, ...] | None = None
    lease_holder: str | None = None
    lease_until: float | None = None
    error: str | None = Field(default=None, max_length=2000)
    artifact: str | None = Field(default=None, max_length=2000)
    point: dict[str, str] | None = None
    size_bytes: int | None = Field(default=None, ge=0)


class StartHold(Frozen):
    """The intent of a consistent point (status `intent`). Refused while another is open or if
    a service is unknown; `keep`: how many finished ones the state holds."""

    kind: Literal["start_hold"] = "start_hold"
    entry: HoldEntry
    keep: int = Field(default=100, ge=1, le=100_000)


class UpdateHold(Frozen):
    """A step of a consistent point: `holding` (with `hold_until`), then `released` or `aborted`
    (final: a finished one never holds again). Given fields replace, `steps` are appended."""

    kind: Literal["update_hold"] = "update_hold"
    id: str = Field(min_length=1, max_length=200)
    status: HoldStatus | None = None
    hold_until: float | None = Field(default=None, ge=0)
    leader: str | None = None
    steps: tuple[SnapshotStep, ...] = ()
    points: dict[str, dict[str, str]] | None = None
    snapshots: dict[str, str] | None = None
    held_ms: float | None = Field(default=None, ge=0)
    error: str | None = Field(default=None, max_length=2000)


Command = Annotated[
    PutService | DeleteService | SetPrimary | Noop | AnnounceNode | RecordFailover | StartSnapshot | UpdateSnapshot
    | VerifySnapshot
    | StartHold | UpdateHold,
    Field(discriminator="kind"),
]


class CommandEnvelope(Frozen):
    """What is written to the log: the command plus a request id for idempotent retries."""

    command: Command
    request_id: str = ""


class Announcement(Frozen):
    """What a caller announces about a service's primary (POST /v1/services/{name}/primary),
    as the node runs it: not a command, but the request for the plan that commits it."""

    member: Name | None
    token: int | None = Field(default=None, ge=1, description="the caller's fencing token (the API's epoch)")
    cause: str = Field(default="announce", max_length=200)
    fence: bool = Field(default=True, description="break-before-make; false routes at once")
    key: str | None = Field(default=None, min_length=1, max_length=200, description="idempotency key")
    trace: dict[str, str] | None = Field(default=None, description="the caller's W3C trace context")
    by: AuditTag | None = Field(default=None, description="who asked (the audit trail of its commits)")


class Rejection(Frozen):
    """Why a command changed nothing. `code` maps to an HTTP status in the API."""

    code: Literal["not_found", "stale_epoch", "conflict", "invalid"]
    message: str
    field: str | None = None


class Outcome(Frozen):
    """What applying one command produced: the result body, or a rejection."""

    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    rejection: Rejection | None = None
