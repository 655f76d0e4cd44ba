"""The REST API of a control-plane node (aiohttp).

`build_app(plane, settings)` makes the application; `start_api(app, host, port)` binds it. The
API only talks to the `ControlPlane` protocol (plane.py). Every endpoint is declared once in
`operations()`: the router and the OpenAPI document (`/openapi.json`) are built from that table.

Writes validate first (pydantic models in api_models.py), then build one Command and call
`plane.submit` once: bad input never reaches the log. Rejections map to HTTP statuses
(not_found 404, stale_epoch/conflict 409, invalid 422); NoQuorum is 503; CommitTimeout is 504.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from repstage_mesh.api.auth import TokenChecker, auth_middleware
from repstage_mesh.api.errors import ApiError, error_middleware, invalid
from repstage_mesh.api.models import (
    ApiSettings,
    ClusterView,
    DeleteResult,
    HealthView,
    PrimaryChange,
    PrimaryRequest,
    PrimaryView,
    ProxyView,
    ReadyView,
    ServiceList,
    ServiceSpecBody,
    ServiceView,
    is_loopback,
    member_views,
)
from repstage_mesh.api.openapi import AnyObject, ListOf, Operation, Text, build_openapi
from repstage_mesh.api.plane import ControlPlane
from repstage_mesh.core.errors import CommitTimeout, MeshError, NoQuorum, Rejected
from repstage_mesh.core.models import (
    NAME_PATTERN,
    Command,
    DeleteService,
    MeshState,
    Outcome,
    PutService,
    ServiceSpec,
    ServiceState,
    SetPrimary,
)

__all__ = [
    "OPENAPI",
    "PLANE",
    "SETTINGS",
    "ApiError",
    "ApiSettings",
    "InsecureBindError",
    "Operation",
    "bound_port",
    "build_app",
    "operations",
    "start_api",
]

log = logging.getLogger(__name__)

PLANE: web.AppKey[ControlPlane] = web.AppKey("plane")
SETTINGS: web.AppKey[ApiSettings] = web.AppKey("settings", ApiSettings)
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")

M = TypeVar("M", bound=BaseModel)
_NAME = re.compile(NAME_PATTERN)
_NAME_PARAM = {"name": "service name (lower-case DNS label)"}


class InsecureBindError(MeshError):
    """start_api was asked to bind a non-loopback address while no API tokens are configured."""


def _package_version() -> str:
    try:
        return version("repstage-mesh")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


# --- helpers --------------------------------------------------------------------------------------


def _plane(request: web.Request) -> ControlPlane:
    return request.app[PLANE]


def _ok(model: BaseModel | list[Any], status: int = 200) -> web.Response:
    if isinstance(model, list):
        return web.json_response([m.model_dump(mode="json") for m in model], status=status)
    return web.json_response(model.model_dump(mode="json"), status=status)


def _path_name(request: web.Request, *, on_bad: int = 404) -> str:
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


async def _json_body(request: web.Request) -> bytes:
    raw = await request.read()
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


def _parse(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise invalid(exc) from None


async def _submit(request: web.Request, command: Command) -> Outcome:
    settings = request.app[SETTINGS]
    try:
        outcome = await _plane(request).submit(command, timeout=settings.commit_timeout)
    except CommitTimeout as exc:
        # Before NoQuorum: NoQuorumOutcomeUnknown is both (no majority now, but the write
        # reached a leader and may still commit), and must not be reported as "nothing changed".
        raise ApiError(
            504,
            "commit_timeout",
            f"the write was not confirmed in time ({exc}); it may or may not have been applied: "
            "read the resource back before retrying",
        ) from None
    except NoQuorum as exc:
        raise ApiError(
            503,
            "no_quorum",
            f"the write was not committed: no Raft leader or no majority ({exc}); nothing changed, retry later",
        ) from None
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


def _require_service(state: MeshState, name: str) -> ServiceState:
    svc = state.service(name)
    if svc is None:
        raise ApiError(
            404, "not_found", f"service {name!r} not found; GET /v1/services lists them", "name"
        )
    return svc


# --- handlers -------------------------------------------------------------------------------------


CONSISTENT = {
    "consistent": "true: answer only after a Raft read barrier (a linearizable read; 503 without "
    "quorum). Default: this node's applied copy, which a follower may hold slightly behind."
}


async def _read_state(request: web.Request) -> MeshState:
    unknown = sorted(set(request.query) - set(CONSISTENT))
    if unknown:
        raise ApiError(400, "invalid", f"{unknown[0]}: unknown query parameter (known: consistent)", unknown[0])
    flag = request.query.get("consistent", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise ApiError(400, "invalid", f"consistent: expected true or false, got {flag!r}", "consistent")
    plane = _plane(request)
    if flag in ("true", "1"):
        try:
            return await plane.read_state(consistent=True)
        except CommitTimeout as exc:
            raise ApiError(504, "commit_timeout", f"read barrier timed out: {exc}") from None
        except NoQuorum as exc:
            raise ApiError(503, "no_quorum", f"no quorum for a consistent read: {exc}") from None
    return plane.state()


async def list_services(request: web.Request) -> web.Response:
    state = await _read_state(request)
    views = [service_view(state, state.services[n]) for n in sorted(state.services)]
    return _ok(ServiceList(services=views, applied_index=state.index))


async def get_service(request: web.Request) -> web.Response:
    name = _path_name(request)
    state = await _read_state(request)
    return _ok(service_view(state, _require_service(state, name)))


async def put_service(request: web.Request) -> web.Response:
    name = _path_name(request, on_bad=422)
    body = _parse(ServiceSpecBody, await _json_body(request))
    if body.name is not None and body.name != name:
        raise ApiError(
            422,
            "invalid",
            f"name: the body says {body.name!r} but the path says {name!r}; leave name out or make them equal",
            "name",
        )
    # ServiceSpecBody already checked the same rules; this only fills in the name.
    try:
        spec = ServiceSpec.model_validate({**dict(body), "name": name})
    except ValidationError as exc:  # pragma: no cover
        raise invalid(exc) from None
    existed = _plane(request).state().service(name) is not None
    outcome = await _submit(request, PutService(spec=spec))
    state = _plane(request).state()
    svc = state.service(name)
    if svc is None:
        raise ApiError(
            409, "conflict", f"service {name!r} was deleted by a concurrent change; retry"
        )
    created = bool(outcome.result.get("created", not existed))
    return _ok(service_view(state, svc), status=201 if created else 200)


async def delete_service(request: web.Request) -> web.Response:
    name = _path_name(request)
    outcome = await _submit(request, DeleteService(name=name))
    index = int(outcome.result.get("index", _plane(request).state().index))
    return _ok(DeleteResult(deleted=name, applied_index=index))


async def get_primary(request: web.Request) -> web.Response:
    name = _path_name(request)
    state = await _read_state(request)
    svc = _require_service(state, name)
    return _ok(
        PrimaryView(
            service=name,
            primary=svc.primary,
            epoch=svc.epoch,
            members=member_views(svc.spec, svc.primary),
            applied_index=state.index,
        )
    )


async def set_primary(request: web.Request) -> web.Response:
    name = _path_name(request)
    body = _parse(PrimaryRequest, await _json_body(request))
    before = _plane(request).state().service(name)
    command = SetPrimary(service=name, member=body.member, epoch=body.epoch, cause=body.cause)
    outcome = await _submit(request, command)
    state = _plane(request).state()
    svc = _require_service(state, name)
    result = outcome.result
    previous = result.get("previous_primary", before.primary if before else None)
    primary = result.get("primary", svc.primary)
    epoch = int(result.get("epoch", svc.epoch))
    before_epoch = before.epoch if before else 0
    changed = bool(result.get("changed", primary != previous or epoch != before_epoch))
    return _ok(
        PrimaryChange(
            service=name,
            primary=primary,
            epoch=epoch,
            previous_primary=previous,
            changed=changed,
            applied_index=state.index,
        )
    )


async def list_proxies(request: web.Request) -> web.Response:
    return _ok([ProxyView.model_validate(p) for p in _plane(request).proxies()])


async def get_cluster(request: web.Request) -> web.Response:
    plane = _plane(request)
    view = {"node_id": plane.node_id, "applied_index": plane.state().index, **plane.cluster()}
    return _ok(ClusterView.model_validate(view))


async def healthz(request: web.Request) -> web.Response:
    return _ok(HealthView(node_id=_plane(request).node_id))


async def readyz(request: web.Request) -> web.Response:
    plane = _plane(request)
    if not plane.ready():
        raise ApiError(
            503,
            "not_ready",
            "this node has not yet applied the committed state or is not serving xDS",
        )
    return _ok(ReadyView(ready=True, node_id=plane.node_id, applied_index=plane.state().index))


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(_plane(request).registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


def operations() -> list[Operation]:
    """Every endpoint, once. The router and /openapi.json are both built from this list."""
    svc = "/v1/services/{name}"
    return [
        Operation("GET", "/v1/services", "listServices", "List services", list_services,
                  {200: ("services, sorted by name", ServiceList)}, errors=(400, 503, 504), query_flags=CONSISTENT),
        Operation("GET", svc, "getService", "Get a service: spec, primary, epoch, member roles", get_service,
                  {200: ("the service", ServiceView)}, errors=(400, 404, 503, 504), path_params=_NAME_PARAM,
                  query_flags=CONSISTENT),
        Operation("PUT", svc, "putService", "Define a service or replace its spec", put_service,
                  {200: ("replaced", ServiceView), 201: ("created", ServiceView)},
                  request=ServiceSpecBody, errors=(409, 503, 504), path_params=_NAME_PARAM,
                  description="The current primary is kept while it is still a member."),
        Operation("DELETE", svc, "deleteService", "Delete a service", delete_service,
                  {200: ("deleted", DeleteResult)}, errors=(404, 409, 503, 504), path_params=_NAME_PARAM),
        Operation("GET", svc + "/primary", "getPrimary", "Who is primary, at which epoch", get_primary,
                  {200: ("the primary", PrimaryView)}, errors=(400, 404, 503, 504), path_params=_NAME_PARAM,
                  query_flags=CONSISTENT),
        Operation("POST", svc + "/primary", "setPrimary", "Set (or clear) the primary: a switchover", set_primary,
                  {200: ("the primary after the change", PrimaryChange)}, request=PrimaryRequest,
                  errors=(404, 409, 503, 504), path_params=_NAME_PARAM,
                  description="member null means no primary is known: the primary listener refuses "
                  "connections (fail closed). A claimed epoch at or below the current one is refused (409)."),
        Operation("GET", "/v1/proxies", "listProxies", "Envoy proxies and their xDS versions", list_proxies,
                  {200: ("one item per proxy", ListOf(ProxyView))}, tag="proxies"),
        Operation("GET", "/v1/cluster", "getCluster", "This node's Raft view", get_cluster,
                  {200: ("Raft view", ClusterView)}, tag="cluster"),
        Operation("GET", "/healthz", "healthz", "The process is alive", healthz,
                  {200: ("alive", HealthView)}, open=True, tag="probes"),
        Operation("GET", "/readyz", "readyz", "The node has applied the committed state and serves xDS", readyz,
                  {200: ("ready", ReadyView)}, errors=(503,), open=True, tag="probes"),
        Operation("GET", "/metrics", "metrics", "Prometheus metrics", metrics,
                  {200: ("Prometheus text exposition", Text())}, open=True, tag="probes"),
        Operation("GET", "/openapi.json", "openapi", "This document", openapi,
                  {200: ("OpenAPI 3.1", AnyObject())}, open=True, tag="probes"),
    ]  # fmt: skip


# --- application and binding ----------------------------------------------------------------------


def build_app(
    plane: ControlPlane,
    settings: ApiSettings | None = None,
    extra_operations: Sequence[Operation] = (),
) -> web.Application:
    """The REST application for `plane`. Bind it with `start_api` (or aiohttp's test utilities).

    `extra_operations` adds endpoints defined elsewhere (e.g. /v1/failovers, snapshots): they
    get the same error handling and auth, and appear in /openapi.json. Their handlers reach the
    plane with `request.app[PLANE]`.
    """
    settings = settings or ApiSettings()
    checker = TokenChecker(settings.tokens)
    app = web.Application(middlewares=[error_middleware, auth_middleware(checker)])
    app[PLANE] = plane
    app[SETTINGS] = settings
    ops = [*operations(), *extra_operations]
    app[OPENAPI] = build_openapi(ops, title="RepStage Mesh", version=_package_version())
    for op in ops:
        app.router.add_route(op.method, op.path, op.handler, name=op.operation_id)
    return app


async def start_api(
    app: web.Application, host: str | None = None, port: int | None = None
) -> web.AppRunner:
    """Bind `app` on host:port (defaults: the app's ApiSettings.listen) and start serving.

    Refuses a non-loopback host when no tokens are configured (InsecureBindError). Returns the
    runner: `await runner.cleanup()` stops it; `bound_port(runner)` tells the port (for port 0).
    """
    settings = app[SETTINGS]
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    if not settings.tokens.enabled:
        if not is_loopback(host):
            raise InsecureBindError(
                f"refusing to serve the API on {host}:{port} without authentication: configure "
                "api.tokens.read_write (and optionally api.tokens.read_only) in the config file, "
                "or listen on 127.0.0.1"
            )
        log.warning(
            "API auth is off (no api.tokens configured): listening on loopback %s:%d only",
            host,
            port,
        )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("REST API listening on %s", ", ".join(str(a) for a in runner.addresses))
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port the runner's first site is bound to (useful after binding port 0)."""
    address = runner.addresses[0]
    return int(address[1])
