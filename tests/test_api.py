"""REST API against an in-memory ControlPlane: endpoints, errors, auth, OpenAPI, schemathesis."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fakes import PROXY, FakePlane, LiveApi, orders_spec
from openapi_spec_validator import validate as validate_openapi

from repstage_mesh.api.app import (
    PLANE,
    InsecureBindError,
    Operation,
    bound_port,
    build_app,
    start_api,
)
from repstage_mesh.api.models import ApiSettings, ErrorBody, HealthView
from repstage_mesh.core.errors import CommitTimeout, NoQuorum

RW = "rw-token-0123456789"
RO = "ro-token-0123456789"
TOKENS = ApiSettings.model_validate({"tokens": {"read_write": [RW], "read_only": [RO]}})

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]

ORDERS_BODY: dict[str, Any] = {
    "protocol": "tcp",
    "listen_port": 15000,
    "members": [
        {"name": "a", "address": "127.0.0.1", "port": 9001},
        {"name": "b", "address": "127.0.0.1", "port": 9002},
    ],
    "primary": "a",
}


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[TestClient[Any, Any]] = []

    async def make(plane: FakePlane, settings: ApiSettings | None = None) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(build_app(plane, settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def plane() -> FakePlane:
    return FakePlane(services=[orders_spec()])


async def error_of(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    ErrorBody.model_validate(body)
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return dict(body["error"])


# --- reads ----------------------------------------------------------------------------------------


async def test_list_and_get_service(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    resp = await client.get("/v1/services")
    assert resp.status == 200
    body = await resp.json()
    assert body["applied_index"] == plane.state().index == 1
    assert [s["name"] for s in body["services"]] == ["orders"]

    resp = await client.get("/v1/services/orders")
    assert resp.status == 200
    view = await resp.json()
    assert view["primary"] == "a"
    assert view["epoch"] == 1
    assert view["applied_index"] == 1
    assert view["spec"]["listen_port"] == 15000
    assert {m["name"]: m["role"] for m in view["members"]} == {"a": "primary", "b": "replica"}


async def test_get_unknown_service_is_404(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    err = await error_of(await client.get("/v1/services/nope"), 404, "not_found")
    assert err["field"] == "name"
    await error_of(await client.get("/v1/services/Not_A_Name"), 404, "not_found")
    await error_of(await client.get("/v1/services/nope/primary"), 404, "not_found")


async def test_get_primary(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    resp = await client.get("/v1/services/orders/primary")
    assert resp.status == 200
    body = await resp.json()
    assert (body["service"], body["primary"], body["epoch"]) == ("orders", "a", 1)


async def test_proxies_cluster_probes_metrics(make_client: MakeClient, plane: FakePlane) -> None:
    plane.proxy_list = [PROXY]
    client = await make_client(plane)
    resp = await client.get("/v1/proxies")
    assert resp.status == 200
    proxies = await resp.json()
    assert [p["node_id"] for p in proxies] == ["envoy-1"]
    assert proxies[0]["types"]["lds"]["error"] == "duplicate listener port"
    assert proxies[0]["types"]["lds"]["nacked_version"] == "7"

    resp = await client.get("/v1/cluster")
    body = await resp.json()
    assert body["node_id"] == "node-1" and body["leader"] == "node-1" and body["applied_index"] == 1

    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["ready"] is True
    plane.is_ready = False
    await error_of(await client.get("/readyz"), 503, "not_ready")

    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert "repstage_fake_commits_total 1.0" in await resp.text()


# --- writes ---------------------------------------------------------------------------------------


async def test_put_creates_then_replaces(make_client: MakeClient) -> None:
    plane = FakePlane()
    client = await make_client(plane)
    resp = await client.put("/v1/services/orders", json=ORDERS_BODY)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["name"] == "orders" and body["primary"] == "a"

    replaced = {**ORDERS_BODY, "name": "orders", "listen_port": 15010}
    resp = await client.put("/v1/services/orders", json=replaced)
    assert resp.status == 200
    body = await resp.json()
    assert body["listen_port"] == 15010
    assert body["primary"] == "a"
    assert plane.state().service("orders").spec.listen_port == 15010  # type: ignore[union-attr]


async def test_delete(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    resp = await client.delete("/v1/services/orders")
    assert resp.status == 200
    assert (await resp.json())["deleted"] == "orders"
    assert plane.state().service("orders") is None
    await error_of(await client.delete("/v1/services/orders"), 404, "not_found")


async def test_switchover_and_fail_closed(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    resp = await client.post("/v1/services/orders/primary", json={"member": "b", "cause": "test"})
    assert resp.status == 200
    body = await resp.json()
    assert body["service"] == "orders"
    assert (body["primary"], body["previous_primary"], body["changed"]) == ("b", "a", True)
    assert body["epoch"] > 1

    again = await (await client.post("/v1/services/orders/primary", json={"member": "b"})).json()
    assert again["changed"] is False and again["epoch"] == body["epoch"]

    resp = await client.post("/v1/services/orders/primary", json={"member": None})
    body = await resp.json()
    assert body["primary"] is None and body["previous_primary"] == "b"
    assert plane.state().service("orders").primary is None  # type: ignore[union-attr]

    current = plane.state().service("orders").epoch  # type: ignore[union-attr]
    resp = await client.post(
        "/v1/services/orders/primary", json={"member": "a", "epoch": current + 5}
    )
    assert resp.status == 200 and (await resp.json())["primary"] == "a"


async def test_stale_epoch_is_409_and_changes_nothing(
    make_client: MakeClient, plane: FakePlane
) -> None:
    client = await make_client(plane)
    # The claimed epoch is the caller's fencing token: kept per service, monotonic (issue 14).
    resp = await client.post("/v1/services/orders/primary", json={"member": "a", "epoch": 100})
    assert resp.status == 200, await resp.text()
    assert plane.state().service("orders").claim == 100  # type: ignore[union-attr]
    before = plane.state().service("orders")
    for claim in (50, 100):
        err = await error_of(
            await client.post("/v1/services/orders/primary", json={"member": "b", "epoch": claim}),
            409,
            "stale_epoch",
        )
        assert err["field"] == "epoch" and "100" in err["message"]
    assert plane.state().service("orders") == before
    resp = await client.post("/v1/services/orders/primary", json={"member": "b", "epoch": 101})
    assert resp.status == 200 and (await resp.json())["primary"] == "b"


async def test_announce_carries_key_trace_and_fence_to_the_plane(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    resp = await client.post("/v1/services/orders/primary", json={"member": "b", "fence": False, "epoch": 3},
                             headers={"Idempotency-Key": "k-1", "traceparent": traceparent})
    assert resp.status == 200, await resp.text()
    service, announcement = plane.announcements[-1]
    assert service == "orders" and announcement.member == "b" and announcement.token == 3
    assert announcement.key == "k-1" and announcement.fence is False
    assert announcement.trace == {"traceparent": traceparent}
    resp = await client.post("/v1/services/orders/primary", json={"member": "a", "idempotency_key": "k-2"})
    assert resp.status == 200 and plane.announcements[-1][1].key == "k-2"


async def test_bad_idempotency_keys_are_422_and_change_nothing(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    before = plane.state()
    err = await error_of(await client.post("/v1/services/orders/primary", json={"member": "b"},
                                           headers={"Idempotency-Key": "has space"}), 422, "invalid")
    assert err["field"] == "Idempotency-Key"
    err = await error_of(await client.post("/v1/services/orders/primary", json={"member": "b", "idempotency_key": "a"},
                                           headers={"Idempotency-Key": "b"}), 422, "invalid")
    assert err["field"] == "idempotency_key"
    err = await error_of(await client.post("/v1/services/orders/primary",
                                           json={"member": "b", "idempotency_key": "x" * 201}), 422, "invalid")
    assert "idempotency_key" in (err["field"] or "")
    assert plane.state() == before and plane.announcements == []


async def test_unknown_member_or_service_is_404(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    before = plane.state().services
    err = await error_of(
        await client.post("/v1/services/orders/primary", json={"member": "zz"}), 404, "not_found"
    )
    assert err["field"] == "member"
    await error_of(
        await client.post("/v1/services/nope/primary", json={"member": "a"}), 404, "not_found"
    )
    assert plane.state().services == before


# --- validation: 400 / 422, and nothing reaches the log --------------------------------------------


@pytest.mark.parametrize(
    ("path", "method", "payload", "field"),
    [
        (
            "/v1/services/orders",
            "PUT",
            {
                **ORDERS_BODY,
                "members": [
                    ORDERS_BODY["members"][0],
                    {"name": "b", "address": "127.0.0.1", "port": 70000},
                ],
            },
            "members.1.port",
        ),
        ("/v1/services/orders", "PUT", {**ORDERS_BODY, "name": "other"}, "name"),
        ("/v1/services/orders", "PUT", {**ORDERS_BODY, "read_port": 15000}, "read_port"),
        ("/v1/services/orders", "PUT", {**ORDERS_BODY, "primary": "zz"}, "primary"),
        (
            "/v1/services/orders",
            "PUT",
            {**ORDERS_BODY, "members": [{"name": "a", "address": "not an address!", "port": 1}]},
            "members.0.address",
        ),
        ("/v1/services/orders", "PUT", {**ORDERS_BODY, "listen_port": "15000"}, "listen_port"),
        ("/v1/services/orders", "PUT", {**ORDERS_BODY, "colour": "red"}, "colour"),
        ("/v1/services/Bad_Name", "PUT", ORDERS_BODY, "name"),
        ("/v1/services/orders/primary", "POST", {"member": "b", "epoch": 0}, "epoch"),
        ("/v1/services/orders/primary", "POST", {"epoch": 3}, "member"),
        ("/v1/services/orders/primary", "POST", {"member": "b", "cause": "x" * 201}, "cause"),
    ],
)
async def test_invalid_input_is_422_naming_the_field(
    make_client: MakeClient, plane: FakePlane, path: str, method: str, payload: Any, field: str
) -> None:
    client = await make_client(plane)
    before = plane.state()
    err = await error_of(await client.request(method, path, json=payload), 422, "invalid")
    assert err["field"] == field, err
    assert field in err["message"]
    assert plane.submitted == []
    assert plane.state() == before


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1,"])
async def test_malformed_json_is_400(make_client: MakeClient, plane: FakePlane, raw: bytes) -> None:
    client = await make_client(plane)
    for method, path in (("PUT", "/v1/services/orders"), ("POST", "/v1/services/orders/primary")):
        resp = await client.request(
            method, path, data=raw, headers={"Content-Type": "application/json"}
        )
        await error_of(resp, 400, "malformed_json")
    assert plane.submitted == []


async def test_json_that_is_not_an_object_is_422(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    await error_of(await client.put("/v1/services/orders", json=[1, 2]), 422, "invalid")
    assert plane.submitted == []


# --- replication failures -------------------------------------------------------------------------


async def test_no_quorum_is_503(make_client: MakeClient, plane: FakePlane) -> None:
    plane.fail = NoQuorum("no leader for 5 s")
    client = await make_client(plane)
    err = await error_of(
        await client.post("/v1/services/orders/primary", json={"member": "b"}), 503, "no_quorum"
    )
    assert "no leader" in err["message"]
    assert plane.state().service("orders").primary == "a"  # type: ignore[union-attr]
    await error_of(await client.put("/v1/services/orders", json=ORDERS_BODY), 503, "no_quorum")
    await error_of(await client.delete("/v1/services/orders"), 503, "no_quorum")


async def test_commit_timeout_is_504(make_client: MakeClient, plane: FakePlane) -> None:
    plane.fail = CommitTimeout("5 s")
    client = await make_client(plane)
    err = await error_of(
        await client.post("/v1/services/orders/primary", json={"member": "b"}),
        504,
        "commit_timeout",
    )
    assert "may or may not" in err["message"]


async def test_no_quorum_with_an_unknown_outcome_is_504_not_503(make_client: MakeClient, plane: FakePlane) -> None:
    """A write that reached a leader may still commit: never answer "nothing changed" (503)."""
    from repstage_mesh.core.errors import NoQuorumOutcomeUnknown

    plane.fail = NoQuorumOutcomeUnknown("reached a leader, then lost the majority")
    client = await make_client(plane)
    err = await error_of(
        await client.post("/v1/services/orders/primary", json={"member": "b"}), 504, "commit_timeout"
    )
    assert "may or may not" in err["message"]


# --- router errors and bugs -----------------------------------------------------------------------


async def test_unknown_route_and_wrong_method(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane)
    await error_of(await client.get("/v2/nothing"), 404, "not_found")
    resp = await client.patch("/v1/services/orders")
    await error_of(resp, 405, "method_not_allowed")
    assert "PUT" in resp.headers["Allow"]


async def test_unexpected_exception_is_500_json_and_logged(
    make_client: MakeClient, plane: FakePlane, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> list[dict[str, Any]]:
        raise RuntimeError("tracker exploded")

    plane.proxies = boom  # type: ignore[method-assign]
    client = await make_client(plane)
    with caplog.at_level(logging.ERROR, logger="repstage_mesh.api.errors"):
        err = await error_of(await client.get("/v1/proxies"), 500, "internal")
    assert "tracker exploded" not in err["message"]
    assert any("tracker exploded" in (r.exc_text or "") for r in caplog.records)


# --- auth -----------------------------------------------------------------------------------------


async def test_auth_roles(make_client: MakeClient, plane: FakePlane) -> None:
    client = await make_client(plane, TOKENS)
    before = plane.state()

    resp = await client.get("/v1/services")
    await error_of(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.get("/v1/services", headers={"Authorization": "Bearer wrong-token-xyz"})
    await error_of(resp, 401, "unauthorized")
    assert "invalid_token" in resp.headers["WWW-Authenticate"]

    ro = {"Authorization": f"Bearer {RO}"}
    rw = {"Authorization": f"Bearer {RW}"}
    assert (await client.get("/v1/services", headers=ro)).status == 200
    assert (await client.get("/v1/services/orders", headers=rw)).status == 200

    # writes without a token or with a read-only token are refused and change nothing
    for headers, status, code in (({}, 401, "unauthorized"), (ro, 403, "forbidden")):
        await error_of(
            await client.post("/v1/services/orders/primary", json={"member": "b"}, headers=headers),
            status,
            code,
        )
        await error_of(
            await client.put("/v1/services/orders", json=ORDERS_BODY, headers=headers), status, code
        )
        await error_of(await client.delete("/v1/services/orders", headers=headers), status, code)
    assert plane.submitted == []
    assert plane.state() == before

    resp = await client.post("/v1/services/orders/primary", json={"member": "b"}, headers=rw)
    assert resp.status == 200
    assert plane.state().service("orders").primary == "b"  # type: ignore[union-attr]

    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status == 200, path


async def test_extra_operations_are_served_documented_and_guarded(plane: FakePlane) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node_id": request.app[PLANE].node_id})

    op = Operation(
        "GET", "/v1/hello", "hello", "Say hello", hello, {200: ("hi", HealthView)}, tag="x"
    )
    async with TestClient(TestServer(build_app(plane, TOKENS, [op]))) as client:
        await error_of(await client.get("/v1/hello"), 401, "unauthorized")
        resp = await client.get("/v1/hello", headers={"Authorization": f"Bearer {RO}"})
        assert (await resp.json())["node_id"] == "node-1"
        doc = await (await client.get("/openapi.json")).json()
        assert "401" in doc["paths"]["/v1/hello"]["get"]["responses"]


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="whitespace"):
        ApiSettings.model_validate({"tokens": {"read_write": ["two words"]}})
    with pytest.raises(ValueError, match="HOST:PORT"):
        ApiSettings(listen="8080")
    s = ApiSettings(listen="[::1]:9000")
    assert (s.host, s.port) == ("::1", 9000)
    assert "rw-token" not in repr(TOKENS)


def test_settings_from_config() -> None:
    from repstage_mesh.config import load_config

    cfg = load_config(None, env={"REPSTAGE_API__TOKENS": '{"read_write": ["abc-token"]}'})
    settings = ApiSettings.from_config(cfg.api)
    assert settings.tokens.enabled and settings.listen == "127.0.0.1:8080"
    assert not ApiSettings.from_config(load_config(None, env={}).api).tokens.enabled


# --- binding --------------------------------------------------------------------------------------


async def test_start_api_refuses_public_bind_without_tokens(plane: FakePlane) -> None:
    app = build_app(plane)
    with pytest.raises(InsecureBindError, match=r"api\.tokens"):
        await start_api(app, "0.0.0.0", 0)


async def test_start_api_loopback_warns_and_serves(
    plane: FakePlane, caplog: pytest.LogCaptureFixture
) -> None:
    from aiohttp import ClientSession

    with caplog.at_level(logging.WARNING, logger="repstage_mesh.api.app"):
        runner = await start_api(build_app(plane), "127.0.0.1", 0)
    try:
        assert any("auth is off" in r.getMessage() for r in caplog.records)
        async with (
            ClientSession() as session,
            session.get(f"http://127.0.0.1:{bound_port(runner)}/healthz") as resp,
        ):
            assert resp.status == 200
    finally:
        await runner.cleanup()


# --- OpenAPI --------------------------------------------------------------------------------------


async def test_openapi_is_valid_31_and_covers_every_route(
    make_client: MakeClient, plane: FakePlane
) -> None:
    client = await make_client(plane, TOKENS)
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    validate_openapi(doc)

    app = client.app
    assert app is not None
    routes = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert routes == documented

    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            assert responses["500"]["content"]["application/json"]["schema"] == error_ref, (
                path,
                method,
            )
            if path.startswith("/v1/"):
                assert "401" in responses
            if method in ("put", "post", "delete"):
                assert {"401", "403", "503", "504"} <= set(responses), (path, method)
            if "requestBody" in op:
                assert {"400", "422"} <= set(responses)
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert "ServiceSpecBody" in doc["components"]["schemas"]


def schemathesis_failures(plane: FakePlane, only_path: str | None = None) -> list[str]:
    """Run schemathesis (positive and negative cases, 25 each per operation) against a live API."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        ignored_auth,
        missing_required_header,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
        unsupported_method,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        response_headers_conformance,
        negative_data_rejection,
        missing_required_header,
        unsupported_method,
        ignored_auth,
    ]
    from repstage_mesh.api.failovers import failover_operations

    # the whole document: the core endpoints and the failover ones, as a node serves them
    api_settings = TOKENS.model_copy(update={"listen": "127.0.0.1:0"})
    with LiveApi(plane, api_settings, extra_operations=failover_operations()) as live:
        schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
        # The token is sent by `call_and_validate` below: a negative case that "breaks" the
        # Authorization header would be made valid again and then flagged as accepted.
        schema.config.generation.update(with_security_parameters=False)
        failures: list[str] = []
        for result in schema.get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]
            if only_path is not None and operation.path != only_path:
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=25,
                    deadline=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                    database=None,
                )
                def run(case: Any) -> None:
                    case.call_and_validate(headers={"Authorization": f"Bearer {RW}"}, checks=checks)

                try:
                    run()
                except Unsatisfiable:
                    # nothing to negate: the operation has no parameters and no body
                    assert mode is GenerationMode.NEGATIVE
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises FailureGroup
                    failures.append(f"{operation.label} ({mode}): {exc}")
    return failures


def test_schemathesis_finds_no_5xx_and_no_schema_violation() -> None:
    plane = FakePlane(services=[orders_spec()])
    plane.proxy_list = [PROXY]
    failures = schemathesis_failures(plane)
    assert not failures, "\n\n".join(failures)


def test_schemathesis_run_would_catch_a_broken_server() -> None:
    plane = FakePlane(services=[orders_spec()])
    plane.proxy_list = [{"cluster": "no node_id here"}]  # ProxyView refuses it: the API answers 500
    failures = schemathesis_failures(plane, only_path="/v1/proxies")
    assert any("/v1/proxies" in f and "Server error" in f for f in failures), failures
