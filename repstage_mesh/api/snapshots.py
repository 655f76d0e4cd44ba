"""REST endpoints for snapshots (issue 16), added with `build_app(..., extra_operations=...)`.

A snapshot runs on the Raft leader (a follower carries the request there); every node answers
the reads from its copy of the replicated state, where every step of a snapshot is committed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field

from repstage_mesh.api.errors import ApiError
from repstage_mesh.api.failovers import caller
from repstage_mesh.api.http import json_body, ok, parse, path_name
from repstage_mesh.api.openapi import Operation
from repstage_mesh.api.plane import Caller
from repstage_mesh.core.models import Name


class SnapshotStepView(BaseModel):
    name: str = Field(description="intent, proxies_acked_draining, connections_closed, proxies_acked_removed, pre_hook, take, post_hook, aborted, complete, takeover")
    at: float = Field(description="when the step ended (Unix time, the leader's clock)")
    ok: bool
    detail: str = ""


class SnapshotVerificationView(BaseModel):
    """The last restore drill of a snapshot (`POST .../snapshots/{id}/verify` or the schedule)."""

    model_config = ConfigDict(extra="allow")

    drill: str = Field(description="this attempt's id")
    status: str = Field(description="running | ok | failed | interrupted (the leader running it stopped)")
    node: str = Field(default="", description="the leader that ran it")
    requested: str = Field(default="request", description="request | schedule")
    started_at: float = 0.0
    finished_at: float = 0.0
    duration_s: float = 0.0
    restored: bool = Field(default=False, description="a scratch server came up on the snapshot")
    compared: bool = Field(default=False, description="compared with the service's ledger (snapshots.verify.ledgers)")
    expected: int = Field(default=0, description="ledger keys written at or before the snapshot point")
    matched: int = 0
    counts: dict[str, int] = Field(default_factory=dict, description="missing, extra, unexplained")
    missing: list[str] = Field(default_factory=list, description="first 20 keys acknowledged before the point and absent")
    extra: list[str] = Field(default_factory=list, description="first 20 keys holding a write from after the point")
    unexplained: list[str] = Field(default_factory=list, description="first 20 keys with a value no ledger write produced")
    error: str = ""


class SnapshotView(BaseModel):
    """One snapshot as the replicated state holds it."""

    model_config = ConfigDict(extra="allow")

    id: str
    service: str
    member: str
    role: str = Field(description="the member's role at the intent: primary | replica")
    epoch: int = Field(description="the service's epoch at the intent; a change aborts the snapshot")
    intent_index: int = Field(description="the Raft index that committed the intent")
    kind: str = Field(description="redis | postgres | tcp: which action takes it")
    requested: str = Field(description="what was asked for and why this member was chosen")
    status: str = Field(description="running | completed | failed | aborted")
    pool: str = Field(description="in | draining | out: the member in the read pool")
    steps: list[SnapshotStepView] = Field(default_factory=list)
    undo: list[str] = Field(default_factory=list, description="what is still owed by the leader (post_hook)")
    lease_holder: str = Field(default="", description="the leader running the snapshot")
    lease_until: float = Field(default=0.0, description="until when (Unix time) it may still act; a new leader waits for it before the owed post-hook")
    error: str = ""
    artifact: str = Field(default="", description="URI of what was stored")
    point: dict[str, str] = Field(default_factory=dict, description="the snapshot point (Redis replid/offset, PostgreSQL LSNs)")
    size_bytes: int = 0
    verification: SnapshotVerificationView | None = Field(
        default=None, description="the last restore drill (POST .../snapshots/{id}/verify); null: never verified")
    group: str = Field(default="", description="the consistent point (GET /v1/consistent-points/{id}) this snapshot belongs to, if any")


class SnapshotList(BaseModel):
    snapshots: list[SnapshotView]


class SnapshotRequest(BaseModel):
    """POST /v1/services/{name}/snapshots body."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [{"member": "replica"}]})

    member: Name = Field(
        default="replica",
        description="replica (default: the most caught-up replica within snapshots.lag_bound_bytes, "
        "the primary when none qualifies), primary, or a member's name",
    )


class VerifyRequest(BaseModel):
    """POST /v1/services/{name}/snapshots/{id}/verify body: empty. The ledger a drill compares
    with is the operator's (`snapshots.verify.ledgers`), never named by a request."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [{}]})


SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class PointRequest(BaseModel):
    """POST /v1/consistent-points body."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "examples": [{"services": ["cache", "sessions"], "consistent": True}]})

    services: list[Name] = Field(min_length=1, max_length=32, description="the services (redis or http) held at one point")
    consistent: bool = Field(default=True, description="must be true: several services are only snapshotted at one consistent point")
    member: Name = Field(default="replica", description="each redis service's member whose fork is the point: replica (default: a caught-up one) or primary")


class PointView(BaseModel):
    """One consistent point as the replicated state holds it."""

    model_config = ConfigDict(extra="allow")

    id: str
    services: list[str]
    members: dict[str, str] = Field(default_factory=dict, description="service -> member whose point is taken")
    status: str = Field(description="intent | holding | released | aborted")
    window_ms: int = Field(description="the longest writes are held (snapshots.consistent_hold_ms)")
    hold_until: float = Field(default=0.0, description="Unix time the hold ends at the latest, whoever leads")
    intent_index: int = 0
    leader: str = ""
    steps: list[SnapshotStepView] = Field(default_factory=list)
    points: dict[str, dict[str, str]] = Field(default_factory=dict, description="each service's point, taken while writes were held")
    snapshots: dict[str, str] = Field(default_factory=dict, description="service -> snapshot id (its entry has group = this id)")
    held_ms: float = Field(default=0.0, description="how long writes were held (the leader's measure)")
    error: str = ""


class PointList(BaseModel):
    points: list[PointView]


class Snapshots(Protocol):
    """What the endpoints need (snapshots/desk.SnapshotDesk on a node; a double in tests)."""

    async def start(self, service: str, member: str, caller: Caller) -> dict[str, Any]: ...
    def list(self, service: str) -> list[dict[str, Any]] | None: ...
    def get(self, service: str, snapshot_id: str) -> dict[str, Any] | None: ...
    async def verify(self, service: str, snapshot_id: str, caller: Caller) -> dict[str, Any]: ...
    async def start_point(self, services: Sequence[str], member: str, caller: Caller) -> dict[str, Any]: ...
    def points_list(self) -> Sequence[dict[str, Any]]: ...
    def point(self, hold_id: str) -> dict[str, Any] | None: ...


def _point_handlers(desk: Snapshots) -> tuple[Handler, Handler, Handler]:
    async def start_point(request: web.Request) -> web.Response:
        body = parse(PointRequest, await json_body(request))
        if not body.consistent:
            raise ApiError(422, "invalid", "consistent: must be true (one service: POST /v1/services/{name}/snapshots)", "consistent")
        if body.member not in ("replica", "primary"):
            raise ApiError(422, "invalid", "member: replica or primary (a consistent point names no member)", "member")
        entry = await desk.start_point(list(body.services), body.member, caller(request))
        return ok(PointView.model_validate(entry), status=202)

    async def list_points(request: web.Request) -> web.Response:
        return ok(PointList(points=[PointView.model_validate(e) for e in desk.points_list()]))

    async def get_point(request: web.Request) -> web.Response:
        hold_id = request.match_info["id"]
        entry = desk.point(hold_id)
        if entry is None:
            raise ApiError(404, "not_found", f"no consistent point {hold_id!r}; GET /v1/consistent-points lists them", "id")
        return ok(PointView.model_validate(entry))

    return start_point, list_points, get_point


def point_operations(desk: Snapshots) -> list[Operation]:
    start_point, list_points, get_point = _point_handlers(desk)
    return [
        Operation("POST", "/v1/consistent-points", "startConsistentPoint",
                  "Snapshot several services at one consistent point: new writes held for at most snapshots.consistent_hold_ms",
                  start_point, {202: ("the committed intent; follow it with GET /v1/consistent-points/{id}", PointView)},
                  request=PointRequest, errors=(404, 409, 422, 503, 504), tag="snapshots",
                  description="Runs on the Raft leader. Redis: CLIENT PAUSE WRITE on each primary, a fork at the held "
                  "offset, CLIENT UNPAUSE; HTTP: writes answered 503 with Retry-After at the Envoy route until the "
                  "committed deadline."),
        Operation("GET", "/v1/consistent-points", "listConsistentPoints", "Consistent points, newest first",
                  list_points, {200: ("newest first", PointList)}, errors=(503,), tag="snapshots"),
        Operation("GET", "/v1/consistent-points/{id}", "getConsistentPoint", "One consistent point with its steps and points",
                  get_point, {200: ("the consistent point", PointView)}, errors=(404, 503), tag="snapshots",
                  path_params={"id": "consistent point id"}),
    ]


def _handlers(desk: Snapshots) -> tuple[Handler, Handler, Handler]:
    async def start_snapshot(request: web.Request) -> web.Response:
        name = path_name(request)
        raw = await request.read()
        body = parse(SnapshotRequest, await json_body(request)) if raw.strip() else SnapshotRequest()
        entry = await desk.start(name, body.member, caller(request))
        return ok(SnapshotView.model_validate(entry), status=202)

    async def list_snapshots(request: web.Request) -> web.Response:
        name = path_name(request)
        entries = desk.list(name)
        if entries is None:
            raise ApiError(404, "not_found", f"no service named {name!r}", "name")
        return ok(SnapshotList(snapshots=[SnapshotView.model_validate(e) for e in entries]))

    async def get_snapshot(request: web.Request) -> web.Response:
        name = path_name(request)
        snapshot_id = request.match_info["id"]
        entry = desk.get(name, snapshot_id)
        if entry is None:
            raise ApiError(404, "not_found", f"no snapshot {snapshot_id!r} of {name!r}; GET /v1/services/{name}/snapshots lists them", "id")
        return ok(SnapshotView.model_validate(entry))

    return start_snapshot, list_snapshots, get_snapshot


def snapshot_operations(desk: Snapshots) -> list[Operation]:
    return [*_snapshot_operations(desk), *point_operations(desk)]


def _snapshot_operations(desk: Snapshots) -> list[Operation]:
    start_snapshot, list_snapshots, get_snapshot = _handlers(desk)
    service = {"name": "service name (lower-case DNS label)"}
    return [
        Operation("POST", "/v1/services/{name}/snapshots", "startSnapshot",
                  "Start a snapshot: drain the member from the read pool, wait for every proxy's ACK, run the hooks and the action",
                  start_snapshot, {202: ("the committed intent; follow it with GET .../snapshots/{id}", SnapshotView)},
                  request=SnapshotRequest, errors=(404, 409, 422, 503, 504), path_params=service, tag="snapshots",
                  description="Runs on the Raft leader; every step is committed to the replicated state. "
                  "A failover of the service aborts it in the same Raft entry."),
        Operation("GET", "/v1/services/{name}/snapshots", "listSnapshots", "The service's snapshots, newest first",
                  list_snapshots, {200: ("newest first", SnapshotList)}, errors=(404, 503), path_params=service, tag="snapshots"),
        Operation("GET", "/v1/services/{name}/snapshots/{id}", "getSnapshot", "One snapshot with its steps",
                  get_snapshot, {200: ("the snapshot", SnapshotView)}, errors=(404, 503), tag="snapshots",
                  path_params={**service, "id": "snapshot id"}),
        verify_operation(desk),
    ]


def verify_operation(desk: Snapshots) -> Operation:
    """`POST /v1/services/{name}/snapshots/{id}/verify`: a restore drill on the leader."""

    async def verify_snapshot(request: web.Request) -> web.Response:
        name = path_name(request)
        snapshot_id = request.match_info["id"]
        if not SNAPSHOT_ID.match(snapshot_id):
            raise ApiError(422, "invalid", f"id: {snapshot_id!r} is not a snapshot id "
                           "(letters, digits, '.', '_', '-'; at most 200)", "id")
        raw = await request.read()
        if raw.strip():
            parse(VerifyRequest, await json_body(request))
        entry = await desk.verify(name, snapshot_id, caller(request))
        return ok(SnapshotView.model_validate(entry), status=202)

    return Operation(
        "POST", "/v1/services/{name}/snapshots/{id}/verify", "verifySnapshot",
        "Verify a completed snapshot: restore it into a scratch server and compare it with the service's ledger",
        verify_snapshot, {202: ("the snapshot with its running `verification`; follow it with GET .../snapshots/{id}",
                                SnapshotView)},
        request=VerifyRequest, errors=(404, 409, 422, 503, 504), tag="snapshots",
        path_params={"name": "service name (lower-case DNS label)", "id": "snapshot id"},
        description="Runs on the Raft leader (a follower carries it there); the drill's start and result are "
        "committed with the snapshot. The ledger is snapshots.verify.ledgers[service] from the leader's config "
        "(none: the drill proves the snapshot restores). 409 while a drill of it runs or if it did not complete.",
    )
