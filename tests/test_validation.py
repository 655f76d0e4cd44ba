"""The one semantic pass (config/checks.py): every problem at once, with its field, the same in
`validate`, `serve` (load_config) and `PUT /v1/services/{name}` (issue 15, item 3)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from fakes import FakePlane, LiveApi

from repstage_mesh.api.app import build_app
from repstage_mesh.api.models import ApiSettings
from repstage_mesh.cli import main as cli
from repstage_mesh.config import ConfigError, load_config
from repstage_mesh.core.models import Member, ServiceSpec
from repstage_mesh.core.state import encode_state

HEAD = """\
xds: {listen: "127.0.0.1:18000"}
api: {listen: "127.0.0.1:8080"}
envoy: {fence_port: 15990, admin_port: 9901}
"""


def service(name: str = "orders", listen: int = 15000, extra: str = "", members: int = 2) -> str:
    rows = "".join(f"      - {{name: m{i}, address: 127.0.0.1, port: {9001 + i}}}\n" for i in range(members))
    return f"  - name: {name}\n    listen_port: {listen}\n{extra}    members:\n{rows}"


def errors_of(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    path = tmp_path / "repstage.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})
    return raised.value.errors


FIVE = HEAD + "services:\n" + "".join([
    service("orders", 15990),                                          # the fence port
    service("legacy", 15002, "    leadership: {source: probe, mode: orchestrate}\n"),  # no way to promote
    service("cache", 15003, "    protocol: redis\n    read_port: 9901\n"),              # Envoy's admin port
    service("billing", 15003),                                         # another service's port
    service("events", 15004, "    leadership: {source: consul}\n"),   # consul without consul.address
])
FIVE_FIELDS = [
    "services[0].listen_port",
    "services[1].leadership.mode",
    "services[2].read_port",
    "services[3].listen_port",
    "services[4].leadership.source",
]


def test_validate_lists_five_semantic_errors_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "five.yaml"
    path.write_text(FIVE, encoding="utf-8")
    assert cli.main(["validate", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert sorted(e["field"] for e in report["errors"]) == sorted(FIVE_FIELDS)
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "(5 problem(s))" in err
    for field in FIVE_FIELDS:
        assert f"(field: {field})" in err


def test_type_errors_and_semantic_errors_come_in_one_report(tmp_path: Path) -> None:
    text = FIVE.replace("port: 9001}", 'port: "nope"}', 1)  # services[0].members[0].port
    fields = [field for field, _ in errors_of(tmp_path, text)]
    assert "services[0].members[0].port" in fields
    # services[0] failed pydantic, yet its port collision is still reported, and the others'
    assert sorted(set(fields) - {"services[0].members[0].port"}) == sorted(FIVE_FIELDS)


def test_a_broken_section_skips_only_the_checks_that_need_it(tmp_path: Path) -> None:
    text = HEAD.replace("fence_port: 15990", "fence_port: x") + "services:\n" + service("a", 15990) + service("b", 15990)
    fields = [field for field, _ in errors_of(tmp_path, text)]
    # the fence port is unknown, so no fence collision; the collision between services stays
    assert fields == ["envoy.fence_port", "services[1].listen_port"]


def test_a_model_reports_all_its_own_problems_at_once(tmp_path: Path) -> None:
    text = "services:\n" + service(extra="    read_port: 15000\n    primary: z\n").replace("m1,", "m0,")
    fields = sorted(field for field, _ in errors_of(tmp_path, text))
    assert fields == ["services[0].members", "services[0].primary", "services[0].read_port"]


COLLISIONS = [
    # (what, config text, field, fragment)
    ("fence", HEAD + "services:\n" + service(listen=15990), "services[0].listen_port", "envoy.fence_port"),
    ("fence+1", HEAD + "services:\n" + service(listen=15991), "services[0].listen_port", "fence_port + 1"),
    ("admin", HEAD + "services:\n" + service(extra="    read_port: 9901\n"), "services[0].read_port", "envoy.admin_port"),
    ("xds", HEAD + "services:\n" + service(listen=18000), "services[0].listen_port", "xds.listen"),
    ("api", HEAD + "services:\n" + service(listen=8080), "services[0].listen_port", "api.listen"),
    (
        "raft",
        HEAD + 'raft: {bind: "127.0.0.1:7001", peers: ["127.0.0.1:7002"], password: p0123456789abcdef}\nservices:\n' + service(listen=7001),
        "services[0].listen_port", "raft.bind",
    ),
    ("service", HEAD + "services:\n" + service() + service("b", 15000), "services[1].listen_port", "services[0].listen_port"),
    ("api on fence", HEAD.replace("8080", "15990"), "api.listen", "envoy.fence_port"),
    ("admin on fence", HEAD.replace("admin_port: 9901", "admin_port: 15991"), "envoy.admin_port", "fence_port + 1"),
]


@pytest.mark.parametrize(("text", "field", "fragment"), [c[1:] for c in COLLISIONS], ids=[c[0] for c in COLLISIONS])
def test_each_collision_is_refused_by_validate(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    errors = errors_of(tmp_path, text)
    assert [f for f, _ in errors] == [field], errors
    assert fragment in errors[0][1]


def test_the_control_planes_ports_are_free_for_services_when_envoys_run_elsewhere(tmp_path: Path) -> None:
    # xDS on a routable address: the Envoys need not share this host
    text = HEAD.replace('127.0.0.1:18000"}', '10.0.0.1:18000", insecure: true}') + "services:\n" + service(listen=18000) + service("b", 8080)
    path = tmp_path / "ok.yaml"
    path.write_text(text, encoding="utf-8")
    assert [s.listen_port for s in load_config(path, env={}).specs()] == [18000, 8080]


def test_no_fence_ports_are_reserved_without_the_health_fence(tmp_path: Path) -> None:
    text = HEAD.replace("envoy: {", "envoy: {primary_strategy: eds_only, ") + "services:\n" + service(listen=15990)
    path = tmp_path / "ok.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path, env={}).specs()[0].listen_port == 15990


def test_orchestrate_needs_a_way_to_promote(tmp_path: Path) -> None:
    orchestrate = "    leadership: {source: probe, mode: orchestrate%s}\n"
    bad = HEAD + "services:\n" + service(extra=orchestrate % "")
    assert [f for f, _ in errors_of(tmp_path, bad)] == ["services[0].leadership.mode"]
    single = HEAD + "services:\n" + service(extra="    protocol: redis\n" + orchestrate % "", members=1)
    assert "single member" in errors_of(tmp_path, single)[0][1]
    hooked = HEAD + "hooks: {promote: {command: [/bin/true]}}\nservices:\n" + service(extra=orchestrate % ", promote_hook: promote")
    path = tmp_path / "ok.yaml"
    path.write_text(hooked, encoding="utf-8")
    assert load_config(path, env={}).specs()[0].leadership.promote_hook == "promote"


# --- PUT /v1/services/{name} --------------------------------------------------------------------

SETTINGS = ApiSettings(
    listen="127.0.0.1:0",
    hook_names=frozenset({"promote"}),
    reserved_ports={15990: "envoy.fence_port (the fence listener on every Envoy)",
                    15991: "envoy.fence_port + 1", 9901: "envoy.admin_port",
                    18000: "xds.listen (this control-plane node, on the Envoys' host)"},
    consul=False,
)
MakeClient = Callable[[FakePlane], Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[TestClient[Any, Any]] = []

    async def make(plane: FakePlane) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(build_app(plane, SETTINGS)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def body(listen: int = 16000, **extra: Any) -> dict[str, Any]:
    return {"listen_port": listen, "members": [{"name": "a", "address": "127.0.0.1", "port": 9001},
                                               {"name": "b", "address": "127.0.0.1", "port": 9002}], **extra}


def existing() -> ServiceSpec:
    return ServiceSpec(name="orders", listen_port=15000, read_port=15001,
                       members=(Member(name="a", address="127.0.0.1", port=7001),))


@pytest.mark.parametrize(("payload", "field", "fragment"), [
    (body(15990), "listen_port", "envoy.fence_port"),
    (body(15991), "listen_port", "fence_port + 1"),
    (body(read_port=9901), "read_port", "envoy.admin_port"),
    (body(18000), "listen_port", "xds.listen"),
    (body(15001), "listen_port", "read_port of service 'orders'"),
    (body(read_port=15000), "read_port", "listen_port of service 'orders'"),
], ids=["fence", "fence+1", "admin", "xds", "read_port", "listen_port"])
async def test_each_collision_is_a_409_and_changes_nothing(
    make_client: MakeClient, payload: dict[str, Any], field: str, fragment: str
) -> None:
    plane = FakePlane(services=[existing()])
    client = await make_client(plane)
    before, submitted = encode_state(plane.state()), list(plane.submitted)
    resp = await client.put("/v1/services/clash", json=payload)
    error = (await resp.json())["error"]
    assert resp.status == 409, error
    assert (error["code"], error["field"]) == ("conflict", field)
    assert fragment in error["message"]
    assert encode_state(plane.state()) == before and plane.submitted == submitted


async def test_a_put_reports_type_and_semantic_problems_in_one_answer(make_client: MakeClient) -> None:
    plane = FakePlane(services=[existing()])
    client = await make_client(plane)
    payload = body(15990, read_port=9901, leadership={"source": "consul", "mode": "orchestrate", "probe": {"fall": 0}})
    payload["members"][1]["port"] = "x"
    resp = await client.put("/v1/services/clash", json=payload)
    error = (await resp.json())["error"]
    assert resp.status == 422, error
    fields = [d["field"] for d in error["details"]]
    assert "members.1.port" in fields and "leadership.probe.fall" in fields
    assert {"listen_port", "read_port"} <= set(fields)
    assert plane.state().service("clash") is None


async def test_a_put_in_orchestrate_mode_needs_a_way_to_promote(make_client: MakeClient) -> None:
    plane = FakePlane()
    client = await make_client(plane)
    resp = await client.put("/v1/services/legacy", json=body(leadership={"source": "probe", "mode": "orchestrate"}))
    error = (await resp.json())["error"]
    assert (resp.status, error["field"]) == (422, "leadership.mode"), error
    assert "promote_hook" in error["message"]
    hooked = body(leadership={"source": "probe", "mode": "orchestrate", "promote_hook": "promote"})
    resp = await client.put("/v1/services/legacy", json=hooked)
    assert resp.status == 201, await resp.text()


async def test_replacing_a_service_keeps_its_own_ports(make_client: MakeClient) -> None:
    plane = FakePlane(services=[existing()])
    client = await make_client(plane)
    resp = await client.put("/v1/services/orders", json=body(15000, read_port=15001))
    assert resp.status == 200, await resp.text()


async def test_no_primary_is_member_null_and_a_bare_null_body_says_so(make_client: MakeClient) -> None:
    plane = FakePlane(services=[existing()])
    client = await make_client(plane)
    resp = await client.post("/v1/services/orders/primary", data="null", headers={"Content-Type": "application/json"})
    error = (await resp.json())["error"]
    assert (resp.status, error["field"]) == (422, "member"), error
    assert '{"member": null}' in error["message"]
    resp = await client.post("/v1/services/orders/primary", json={"member": "a"})
    assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/services/orders/primary", json={"member": None})
    assert resp.status == 200 and (await resp.json())["primary"] is None


def test_a_services_own_model_errors_do_not_hide_its_collisions(tmp_path: Path) -> None:
    text = HEAD + "services:\n" + service(listen=15990).replace("m1,", "m0,")
    fields = sorted(field for field, _ in errors_of(tmp_path, text))
    assert fields == ["services[0].listen_port", "services[0].members"]


def test_an_advertised_loopback_xds_means_the_envoys_share_this_host(tmp_path: Path) -> None:
    head = HEAD.replace('127.0.0.1:18000"}', '0.0.0.0:18000", advertise: "127.0.0.1:18000", insecure: true}')
    errors = errors_of(tmp_path, head + "services:\n" + service(listen=8080))
    assert errors == [("services[0].listen_port", errors[0][1])] and "api.listen" in errors[0][1]


def test_the_api_checks_against_what_the_config_reserves(tmp_path: Path) -> None:
    raft = 'raft: {bind: "127.0.0.1:7001", peers: ["127.0.0.1:7002"], password: p0123456789abcdef}\n'
    path = tmp_path / "cluster.yaml"
    path.write_text(HEAD + raft, encoding="utf-8")
    settings = load_config(path, env={})
    api = ApiSettings.from_config(settings.api, deployment=settings.deployment())
    assert sorted(api.reserved_ports) == [7001, 8080, 9901, 15990, 15991, 18000]
    assert api.consul is False


def test_the_cli_prints_every_problem_of_a_refused_put(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "apply.yaml"
    # valid as a file, but both ports belong to the replicated service `orders`
    path.write_text("services:\n" + service("clash", 15000, "    read_port: 15001\n"), encoding="utf-8")
    with LiveApi(FakePlane(services=[existing()]), SETTINGS) as api:
        assert cli.main(["apply", str(path), "--api", api.url]) == 1
    err = capsys.readouterr().err
    assert "error: listen_port: port 15000 is also listen_port of service 'orders'" in err
    assert "  read_port: port 15001 is also read_port of service 'orders'" in err
