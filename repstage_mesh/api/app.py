"""The REST API of a control-plane node (aiohttp).

`build_app(plane, settings)` makes the application; `start_api(app, host, port)` binds it. The
API only talks to the `ControlPlane` protocol (plane.py). Every endpoint is declared once in
`operations()`: the router and the OpenAPI document (`/openapi.json`) are built from that table.

Writes validate first (pydantic models in api_models.py), then build one Command and call
`plane.submit` once: bad input never reaches the log. Rejections map to HTTP statuses
(not_found 404, stale_epoch/conflict 409, invalid 422); NoQuorum is 503; CommitTimeout is 504.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from repstage_mesh.api.auth import TokenChecker, auth_middleware
from repstage_mesh.api.errors import ApiError, error_middleware, invalid
from repstage_mesh.api.failovers import AnnounceAnswer, caller
from repstage_mesh.api.http import (
    CONSISTENT,
    OPENAPI,
    PLANE,
    READS,
    SETTINGS,
    audit_tag,
    commit_error,
    json_body,
    ok,
    parse,
    path_name,
    plane,
    read_state,
    require_service,
    service_view,
    submit,
)
from repstage_mesh.api.limits import CoalescedReads, limit_counter
from repstage_mesh.api.models import (
    ApiSettings,
    AuditView,
    ClusterView,
    DeleteResult,
    HealthView,
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
from repstage_mesh.api.progress import progress_operations
from repstage_mesh.core.errors import CommitTimeout, MeshError, NoQuorum
from repstage_mesh.core.models import (
    Announcement,
    DeleteService,
    PutService,
    ServiceSpec,
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

_NAME_PARAM = {"name": "service name (lower-case DNS label)"}


class InsecureBindError(MeshError):
    """start_api was asked to bind a non-loopback address while no API tokens are configured."""


def _package_version() -> str:
    try:
        return version("repstage-mesh")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


# --- handlers -------------------------------------------------------------------------------------


async def list_services(request: web.Request) -> web.Response:
    state = await read_state(request)
    views = [service_view(state, state.services[n]) for n in sorted(state.services)]
    return ok(ServiceList(services=views, applied_index=state.index))


async def get_service(request: web.Request) -> web.Response:
    name = path_name(request)
    state = await read_state(request)
    return ok(service_view(state, require_service(state, name)))


async def put_service(request: web.Request) -> web.Response:
    name = path_name(request, on_bad=422)
    body = parse(ServiceSpecBody, await json_body(request))
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
    _check_operator_names(request, spec)
    existed = plane(request).state().service(name) is not None
    outcome = await submit(request, PutService(spec=spec, by=audit_tag(request)))
    state = plane(request).state()
    svc = state.service(name)
    if svc is None:
        raise ApiError(
            409, "conflict", f"service {name!r} was deleted by a concurrent change; retry"
        )
    created = bool(outcome.result.get("created", not existed))
    return ok(service_view(state, svc), status=201 if created else 200)


def _check_operator_names(request: web.Request, spec: ServiceSpec) -> None:
    """A service may only name hooks and secrets the operator defined in the config file."""
    settings = request.app[SETTINGS]
    lead = spec.leadership
    for field, name, known, section in (
        ("leadership.promote_hook", lead.promote_hook, settings.hook_names, "hooks"),
        ("leadership.probe.password_secret", lead.probe.password_secret, settings.secret_hosts, "secrets"),
    ):
        if name is not None and name not in known:
            raise ApiError(
                422, "invalid",
                f"{field}: no {section[:-1]} named {name!r} in the config file's {section}: section "
                f"(known: {sorted(known)}); only the operator defines them",
                field,
            )
    secret = lead.probe.password_secret
    hosts = settings.secret_hosts.get(secret) if secret is not None else None
    for i, member in enumerate(spec.members):
        if hosts is not None and member.address not in hosts:
            raise ApiError(
                422, "invalid",
                f"leadership.probe.password_secret: secret {secret!r} may not be sent to "
                f"members.{i}.address {member.address!r} (its hosts: {sorted(hosts)})",
                "leadership.probe.password_secret",
            )


async def delete_service(request: web.Request) -> web.Response:
    name = path_name(request)
    outcome = await submit(request, DeleteService(name=name, by=audit_tag(request)))
    index = int(outcome.result.get("index", plane(request).state().index))
    return ok(DeleteResult(deleted=name, applied_index=index))


async def get_primary(request: web.Request) -> web.Response:
    name = path_name(request)
    state = await read_state(request)
    svc = require_service(state, name)
    return ok(
        PrimaryView(
            service=name,
            primary=svc.primary,
            epoch=svc.epoch,
            members=member_views(svc.spec, svc.primary),
            applied_index=state.index,
        )
    )


_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces
_TRACE_HEADERS = ("traceparent", "tracestate")


async def set_primary(request: web.Request) -> web.Response:
    """An announce: break-before-make by default, one failover record and one trace each."""
    name = path_name(request)
    body = parse(PrimaryRequest, await json_body(request))
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _KEY.match(key):
        raise ApiError(422, "invalid", "Idempotency-Key: 1 to 200 printable ASCII characters, no spaces", "Idempotency-Key")
    if key is not None and body.idempotency_key is not None and key != body.idempotency_key:
        raise ApiError(422, "invalid", "idempotency_key: the body and the Idempotency-Key header differ; "
                       "send one, or the same in both", "idempotency_key")
    trace = {h: request.headers[h][:512] for h in _TRACE_HEADERS if h in request.headers}
    announcement = Announcement(
        member=body.member, token=body.epoch, cause=body.cause, fence=body.fence,
        key=key if key is not None else body.idempotency_key, trace=trace or None,
        by=audit_tag(request),
    )
    try:
        answer = await plane(request).announce(name, announcement, caller(request))
    except (CommitTimeout, NoQuorum) as exc:
        raise commit_error(exc) from None
    return ok(AnnounceAnswer.model_validate(answer))


async def get_audit(request: web.Request) -> web.Response:
    state = await read_state(request)
    entries = list(reversed(state.audit))
    return ok(AuditView(entries=entries, keep=state.audit_keep, applied_index=state.index))


async def list_proxies(request: web.Request) -> web.Response:
    return ok([ProxyView.model_validate(p) for p in plane(request).proxies()])


async def get_cluster(request: web.Request) -> web.Response:
    node = plane(request)
    view = {"node_id": node.node_id, "applied_index": node.state().index, **node.cluster()}
    return ok(ClusterView.model_validate(view))


async def healthz(request: web.Request) -> web.Response:
    return ok(HealthView(node_id=plane(request).node_id))


async def readyz(request: web.Request) -> web.Response:
    node = plane(request)
    if not node.ready():
        raise ApiError(
            503,
            "not_ready",
            "this node has not yet applied the committed state or is not serving xDS",
        )
    return ok(ReadyView(ready=True, node_id=node.node_id, applied_index=node.state().index))


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(plane(request).registry)
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
        Operation("POST", svc + "/primary", "setPrimary", "Announce (or clear) the primary", set_primary,
                  {200: ("the primary after the change, with its failover record", AnnounceAnswer)},
                  request=PrimaryRequest, errors=(404, 409, 422, 503, 504), path_params=_NAME_PARAM,
                  description="Break-before-make by default: fail closed, wait until every proxy of every "
                  "node ACKed and closed its connections to the old primary, then route the new one, then "
                  "answer. member null means no primary is known (fail closed). A claimed epoch (the "
                  "caller's fencing token) at or below the highest one claimed before is refused (409). "
                  "Send an Idempotency-Key header (or idempotency_key) to make a retry safe, and a W3C "
                  "traceparent to make the change's trace a child of yours. A follower carries it to the leader."),
        Operation("GET", "/v1/audit", "getAudit", "The audit trail: who changed what, at which Raft index", get_audit,
                  {200: ("the last writes that changed something, newest first", AuditView)},
                  errors=(400, 503, 504), query_flags=CONSISTENT, tag="audit",
                  description="Replicated: every node answers the same trail. Kept: api.audit_entries."),
        Operation("GET", "/v1/proxies", "listProxies", "Envoy proxies and their xDS versions", list_proxies,
                  {200: ("one item per proxy", ListOf(ProxyView))}, tag="proxies"),
        *progress_operations(),
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
    app = web.Application(
        middlewares=[error_middleware, auth_middleware(checker)],
        client_max_size=settings.max_body_bytes,
    )
    app[PLANE] = plane
    app[SETTINGS] = settings
    limited = limit_counter(plane.registry).labels("consistent_read_interval")
    app[READS] = CoalescedReads(
        lambda: plane.read_state(consistent=True), settings.consistent_read_interval, limited.inc
    )
    ops = [*operations(), *extra_operations]
    app[OPENAPI] = build_openapi(ops, title="RepStage Mesh", version=_package_version())
    for op in ops:
        app.router.add_route(op.method, op.path, op.handler, name=op.operation_id)
    return app


async def start_api(
    app: web.Application, host: str | None = None, port: int | None = None
) -> web.AppRunner:
    """Bind `app` on host:port (defaults: the app's ApiSettings.listen) and start serving.

    Serves HTTPS when the settings have `tls`. Refuses a non-loopback host when no tokens are
    configured (InsecureBindError). Returns the
    runner: `await runner.cleanup()` stops it; `bound_port(runner)` tells the port (for port 0).
    """
    settings = app[SETTINGS]
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    if not settings.tokens.enabled:
        if not is_loopback(host):
            raise InsecureBindError(
                f"refusing to serve the API on {host}:{port} without authentication: configure "
                "api.tokens (named read_write and read_only tokens) in the config file, "
                "or listen on 127.0.0.1"
            )
        log.warning(
            "API auth is off (no api.tokens configured): listening on loopback %s:%d only",
            host,
            port,
        )
    context = settings.tls.server_context() if settings.tls is not None else None
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=context)
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
