"""What every REST handler shares: the application's typed keys, reading a request (path
names, JSON bodies, strict models, consistent reads) and writing an answer, and committing a
command with its failures turned into the API's error answers."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from repstage_mesh.api.auth import ACTOR, LOOPBACK_ACTOR
from repstage_mesh.api.errors import ApiError, invalid
from repstage_mesh.api.limits import CoalescedReads, json_depth, limit_counter
from repstage_mesh.api.models import ApiSettings, ServiceView, member_views
from repstage_mesh.api.plane import ControlPlane
from repstage_mesh.core.errors import CommitTimeout, NoQuorum, Rejected
from repstage_mesh.core.models import (
    NAME_PATTERN,
    AuditTag,
    Command,
    MeshState,
    Outcome,
    ServiceState,
)

PLANE: web.AppKey[ControlPlane] = web.AppKey("plane")
SETTINGS: web.AppKey[ApiSettings] = web.AppKey("settings", ApiSettings)
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
READS: web.AppKey[CoalescedReads] = web.AppKey("reads", CoalescedReads)

M = TypeVar("M", bound=BaseModel)
_NAME = re.compile(NAME_PATTERN)

def plane(request: web.Request) -> ControlPlane:
    return request.app[PLANE]


def ok(model: BaseModel | list[Any], status: int = 200) -> web.Response:
    if isinstance(model, list):
        return web.json_response([m.model_dump(mode="json") for m in model], status=status)
    return web.json_response(model.model_dump(mode="json"), status=status)


def path_name(request: web.Request, *, on_bad: int = 404) -> str:
    name = request.match_info["name"]
    if not _NAME.match(name):
        if on_bad == 404:
            raise ApiError(
                404, "not_found", f"service {name!r} not found (not a valid service name)", "name"
            )
        raise ApiError(
            422,
            "invalid",
            f"name: {name!r} is not a valid service name; use a lower-case DNS label (a-z, 0-9, '-')",
            "name",
        )
    return name


async def json_body(request: web.Request) -> bytes:
    """The body, checked: within api.max_body_bytes (413), api.max_json_depth (400), valid
    UTF-8 JSON (400)."""
    settings = request.app[SETTINGS]
    try:
        if (request.content_length or 0) > settings.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(settings.max_body_bytes, request.content_length or 0)
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit_counter(plane(request).registry).labels("body_bytes").inc()
        raise ApiError(
            413, "too_large", f"the request body is over {settings.max_body_bytes} bytes (api.max_body_bytes)"
        ) from None
    if json_depth(raw, settings.max_json_depth) > settings.max_json_depth:
        limit_counter(plane(request).registry).labels("json_depth").inc()
        raise ApiError(
            400, "too_deep",
            f"the request body nests deeper than {settings.max_json_depth} levels (api.max_json_depth)",
        )
    if not raw.strip():
        raise ApiError(400, "malformed_json", "the request body is empty; send a JSON object")
    try:
        json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(
            400, "malformed_json", "the request body is not UTF-8 text; send a JSON object"
        ) from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            "malformed_json",
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    return raw


def _number(text: str) -> int | float:
    """JSON Schema counts 2.0 as an integer: read integral numbers as int (strict models refuse
    a float for an int field; a float field takes an int)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def parse(model: type[M], raw: bytes) -> M:
    """`raw` (checked JSON) as `model`, strictly (no "5" for 5), with integral floats as ints."""
    raw = json.dumps(json.loads(raw, parse_float=_number)).encode()
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise invalid(exc) from None


def audit_tag(request: web.Request) -> AuditTag:
    """Who is writing (the token's name) and how long the audit trail is, for the command."""
    actor = request.get(ACTOR) or LOOPBACK_ACTOR
    return AuditTag(actor=str(actor)[:64], keep=request.app[SETTINGS].audit_entries)


def commit_error(exc: CommitTimeout | NoQuorum) -> ApiError:
    """The answer to a write that did not commit, or whose outcome is unknown."""
    if isinstance(exc, CommitTimeout):
        # Before NoQuorum: NoQuorumOutcomeUnknown is both (no majority now, but the write
        # reached a leader and may still commit), and must not be reported as "nothing changed".
        return ApiError(
            504,
            "commit_timeout",
            f"the write was not confirmed in time ({exc}); it may or may not have been applied: "
            "read the resource back before retrying",
        )
    return ApiError(
        503,
        "no_quorum",
        f"the write was not committed: no Raft leader or no majority ({exc}); nothing changed, retry later",
    )


async def submit(request: web.Request, command: Command) -> Outcome:
    settings = request.app[SETTINGS]
    try:
        outcome = await plane(request).submit(command, timeout=settings.commit_timeout)
    except (CommitTimeout, NoQuorum) as exc:
        raise commit_error(exc) from None
    except Rejected as exc:
        raise ApiError.from_rejection(exc.rejection) from None
    if not outcome.ok:
        if outcome.rejection is None:
            raise ApiError(409, "conflict", "the command was refused")
        raise ApiError.from_rejection(outcome.rejection)
    return outcome


def service_view(state: MeshState, svc: ServiceState) -> ServiceView:
    spec = svc.spec
    return ServiceView(
        name=spec.name,
        protocol=spec.protocol,
        listen_port=spec.listen_port,
        read_port=spec.read_port,
        primary=svc.primary,
        epoch=svc.epoch,
        changed_at=svc.changed_at,
        members=member_views(spec, svc.primary),
        spec=spec,
        applied_index=state.index,
    )


def require_service(state: MeshState, name: str) -> ServiceState:
    svc = state.service(name)
    if svc is None:
        raise ApiError(
            404, "not_found", f"service {name!r} not found; GET /v1/services lists them", "name"
        )
    return svc


CONSISTENT = {
    "consistent": "true: answer only after a Raft read barrier (a linearizable read; 503 without "
    "quorum). Default: this node's applied copy, which a follower may hold slightly behind."
}


async def read_state(request: web.Request) -> MeshState:
    unknown = sorted(set(request.query) - set(CONSISTENT))
    if unknown:
        raise ApiError(400, "invalid", f"{unknown[0]}: unknown query parameter (known: consistent)", unknown[0])
    flag = request.query.get("consistent", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise ApiError(400, "invalid", f"consistent: expected true or false, got {flag!r}", "consistent")
    node = plane(request)
    if flag in ("true", "1"):
        try:
            return await request.app[READS].read()
        except CommitTimeout as exc:
            raise ApiError(504, "commit_timeout", f"read barrier timed out: {exc}") from None
        except NoQuorum as exc:
            raise ApiError(503, "no_quorum", f"no quorum for a consistent read: {exc}") from None
    return node.state()
