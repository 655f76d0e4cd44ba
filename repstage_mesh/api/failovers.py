"""REST endpoints for failovers and planned switchovers (issue 4), added to the API with
`build_app(..., extra_operations=failover_operations())`.

Failover records are in the replicated state (issue 11): every node answers the reads from its
own copy. A follower carries a switchover (and an announce) to the leader (the node does that
behind `ControlPlane`), once at most: the forwarded request carries `X-Repstage-Forwarded-By`
and the caller's own Authorization header, and a node that receives a forwarded request but
does not lead answers 503 (`not_leader`) instead of forwarding it again. Domain errors (a
refused, failed or still running switchover, no leader) become HTTP answers in the error
middleware.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from repstage_mesh.api.auth import ACTOR
from repstage_mesh.api.errors import ApiError
from repstage_mesh.api.http import json_body, ok, parse, path_name, plane
from repstage_mesh.api.models import PrimaryChange
from repstage_mesh.api.openapi import Operation
from repstage_mesh.api.peers import FORWARDED_HEADER
from repstage_mesh.api.plane import Caller
from repstage_mesh.core.models import Name


class TimelineEventView(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    at: float = Field(description="the deciding node's monotonic clock, seconds")
    elapsed_ms: float = Field(description="since the record started")
    detail: dict[str, Any] = Field(default_factory=dict)


class FailoverView(BaseModel):
    """One failover, fail-closed period or switchover, as the node that ran it saw it."""

    model_config = ConfigDict(extra="allow")

    id: str
    service: str
    cause: str
    mode: str
    kind: str
    old_primary: str | None
    new_primary: str | None
    status: str = Field(description="running | done | failed")
    reason: str = ""
    epoch: int | None = None
    fence_epoch: int | None = None
    started_at: float
    started_unix: float | None = None
    timeline: list[TimelineEventView] = Field(default_factory=list)
    missed_fence: list[str] = Field(default_factory=list, description="proxies that had not stopped routing to the old primary by the deadline")
    missed_route: list[str] = Field(default_factory=list, description="proxies that had not ACKed the new primary by the deadline")
    needs_rejoin: list[str] = Field(default_factory=list)
    write_unavailable_ms: float | None = Field(default=None, description="fail-closed commit -> new primary ACKed by the proxies")
    duration_ms: float | None = None
    node: str = Field(default="", description="the control-plane node that ran it (the leader then)")
    attempts: int = Field(default=0, description="repoint: tries during this outage (one record per outage)")
    claim: int | None = Field(default=None, description="announce: the caller's fencing token")
    request_key: str | None = Field(default=None, description="announce: the caller's idempotency key")
    error_code: str | None = Field(default=None, description="failed: how its commit failed (a rejection code, commit_timeout, no_quorum)")


class AnnounceAnswer(PrimaryChange):
    """The answer to POST /v1/services/{name}/primary: the primary after the change, and the
    change's failover record (the same timeline as GET /v1/failovers/{id})."""

    failover: FailoverView | None = Field(default=None, description="the announce's failover record")


class FailoverList(BaseModel):
    failovers: list[FailoverView]
    node_id: str = Field(description="the node that answered (from its copy of the replicated history)")


class SwitchoverRequest(BaseModel):
    """POST /v1/services/{name}/switchover body."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra={"examples": [{"to": "b", "timeout": 30}]}
    )

    to: Name = Field(description="the member to promote")
    timeout: float | None = Field(default=None, gt=0, le=600, description="longest wait for the target to catch up, seconds")
    wait: float | None = Field(
        default=None, gt=0, le=3600,
        description="longest this request is held open, seconds (default and cap: the node's "
        "api.switchover_wait); a switchover still running then is answered 504 "
        "switchover_running with its record, and goes on",
    )


FAILOVER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_FAILOVER_ID = re.compile(FAILOVER_ID_PATTERN)


def caller(request: web.Request) -> Caller:
    """What the node needs to carry this request to the leader (one hop at most)."""
    forwarded_by = request.headers.get(FORWARDED_HEADER)
    return Caller(
        authorization=request.headers.get("Authorization"),
        forwarded_by=forwarded_by.strip() or "another node" if forwarded_by is not None else None,
        actor=request.get(ACTOR, ""),
    )


async def list_failovers(request: web.Request) -> web.Response:
    node_id, records = await plane(request).failovers(caller(request))
    return ok(FailoverList(node_id=node_id, failovers=[FailoverView.model_validate(r) for r in records]))


async def get_failover(request: web.Request) -> web.Response:
    record_id = request.match_info["id"]
    if not _FAILOVER_ID.match(record_id):
        raise ApiError(404, "not_found", f"no failover {record_id!r}: not a valid failover id "
                       f"({FAILOVER_ID_PATTERN}); GET /v1/failovers lists them", "id")
    record = await plane(request).failover(record_id, caller(request))
    if record is None:
        raise ApiError(404, "not_found", f"no failover {record_id!r} in the history; GET /v1/failovers lists them", "id")
    return ok(FailoverView.model_validate(record))


async def switchover(request: web.Request) -> web.Response:
    name = path_name(request)
    body = parse(SwitchoverRequest, await json_body(request))
    record = await plane(request).switchover(name, body.to, body.timeout, body.wait, caller(request))
    return ok(FailoverView.model_validate(record))


def failover_operations() -> list[Operation]:
    return [
        Operation("GET", "/v1/failovers", "listFailovers", "Recent failovers, switchovers, announces and re-points (the replicated history)",
                  list_failovers, {200: ("newest first", FailoverList)}, errors=(404, 503), tag="failovers"),
        Operation("GET", "/v1/failovers/{id}", "getFailover", "One failover with its timeline", get_failover,
                  {200: ("the record", FailoverView)}, errors=(404, 503), tag="failovers",
                  path_params={"id": "failover record id"}),
        Operation("POST", "/v1/services/{name}/switchover", "switchover",
                  "Planned switchover: wait for the target to catch up, then fence, promote and route",
                  switchover, {200: ("the finished switchover", FailoverView)}, request=SwitchoverRequest,
                  errors=(404, 409, 503, 504), path_params={"name": "service name (lower-case DNS label)"},
                  tag="failovers",
                  description="Only for services in orchestrate mode; a follow-mode service's own "
                  "orchestrator promotes (announce it with POST /v1/services/{name}/primary). The "
                  "answer reports write_unavailable_ms, the window in which writes were refused. "
                  "A switchover still running after `wait` is answered 504 switchover_running "
                  "with its record (follow it at GET /v1/failovers/{id}); a follower carries the "
                  "request to the leader once, and a forwarded request reaching a follower is "
                  "answered 503 not_leader."),
    ]
