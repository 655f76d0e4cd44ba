"""The CLI against a live API (FakePlane on a free loopback port), in table and JSON form."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from fakes import PROXY, FakePlane, LiveApi, orders_spec, self_signed_cert
from pydantic import BaseModel

from repstage_mesh.api.app import Operation
from repstage_mesh.api.models import ApiSettings
from repstage_mesh.api.openapi import ListOf
from repstage_mesh.cli import main as cli
from repstage_mesh.config import ConfigError, load_config

RW = "cli-rw-token-123"
RO = "cli-ro-token-456"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPSTAGE_API", raising=False)
    monkeypatch.delenv("REPSTAGE_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def plane() -> FakePlane:
    p = FakePlane(services=[orders_spec()])
    p.proxy_list = [PROXY]
    return p


@pytest.fixture
def live(plane: FakePlane) -> Iterator[LiveApi]:
    with LiveApi(plane) as server:
        yield server


@pytest.fixture
def secured(plane: FakePlane) -> Iterator[LiveApi]:
    settings = ApiSettings.model_validate(
        {"listen": "127.0.0.1:0", "tokens": {"read_write": [RW], "read_only": [RO]}}
    )
    with LiveApi(plane, settings) as server:
        yield server


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- status / services / proxies ------------------------------------------------------------------


def test_status_table_and_json(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "status", "--api", live.url)
    assert code == 0, err
    for text in (
        "Cluster",
        "node-1",
        "orders",
        "a*",
        "envoy-1",
        "duplicate listener port",
        "nacked",
    ):
        assert text in out, text

    code, out, _ = run(capsys, "--json", "status", "--api", live.url)
    assert code == 0
    data = json.loads(out)
    assert data["cluster"]["leader"] == "node-1"
    assert [s["name"] for s in data["services"]] == ["orders"]
    assert data["proxies"][0]["types"]["lds"]["error"] == "duplicate listener port"
    assert data["applied_index"] == live.plane.state().index


def test_services_list_and_get(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "services", "--api", live.url)
    assert code == 0
    assert "orders" in out and "15000 (read 15001)" in out

    code, out, _ = run(capsys, "services", "list", "--json", "--api", live.url)
    assert json.loads(out)["services"][0]["primary"] == "a"

    code, out, _ = run(capsys, "services", "get", "orders", "--api", live.url)
    assert code == 0
    assert "Members" in out and "primary" in out and "replica" in out and "9002" in out

    code, out, _ = run(capsys, "services", "get", "orders", "--json", "--api", live.url)
    view = json.loads(out)
    assert {m["name"]: m["role"] for m in view["members"]} == {"a": "primary", "b": "replica"}


def test_services_get_unknown_prints_error_with_field(
    live: LiveApi, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "services", "get", "nope", "--api", live.url)
    assert code == 1
    assert out == ""
    assert err.startswith("error: service 'nope' not found")
    assert "(field: name)" in err


def test_proxies_table_and_json(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "proxies", "--api", live.url)
    assert code == 0
    assert "envoy-1" in out and "cds 7, lds 6" in out and "lds 7: duplicate listener port" in out

    code, out, _ = run(capsys, "proxies", "--json", "--api", live.url)
    gathered = json.loads(out)
    assert gathered["scope"] == "cluster" and gathered["proxies"][0]["node_id"] == "envoy-1"


def test_proxies_empty(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    live.call(lambda: setattr(live.plane, "proxy_list", []))
    code, out, _ = run(capsys, "proxies", "--api", live.url)
    assert code == 0 and "no proxies connected" in out


# --- switchover -----------------------------------------------------------------------------------


def test_switchover_table_and_json(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "switchover", "orders", "--to", "b", "--api", live.url)
    assert code == 0, err
    assert "primary a → b at epoch" in out
    assert live.call(lambda: live.plane.state().service("orders").primary) == "b"  # type: ignore[union-attr]

    code, out, _ = run(capsys, "switchover", "orders", "--to", "b", "--api", live.url)
    assert "already b" in out and "nothing changed" in out

    code, out, _ = run(capsys, "switchover", "orders", "--no-primary", "--json", "--api", live.url)
    change = json.loads(out)
    assert (change["primary"], change["previous_primary"], change["changed"]) == (None, "b", True)


def test_switchover_stale_epoch_is_refused(
    live: LiveApi, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run(capsys, "switchover", "orders", "--to", "a", "--epoch", "5", "--api", live.url)
    assert code == 0  # the orchestrator's fencing token is now 5
    code, _, err = run(
        capsys, "switchover", "orders", "--to", "b", "--epoch", "1", "--api", live.url
    )
    assert code == 1
    assert "not greater than" in err or "stale" in err, err
    assert "(field: epoch)" in err
    assert live.call(lambda: live.plane.state().service("orders").primary) == "a"  # type: ignore[union-attr]


def test_switchover_unknown_member(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "switchover", "orders", "--to", "zz", "--api", live.url)
    assert code == 1 and "(field: member)" in err


def test_switchover_usage_error_is_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "switchover", "orders")
    assert code == 2 and "--to" in err
    code, _, _ = run(capsys, "--help")
    assert code == 0


# --- failovers ------------------------------------------------------------------------------------


class FailoverItem(BaseModel):
    service: str
    from_member: str | None
    to_member: str | None
    epoch: int
    cause: str


async def _failovers(request: web.Request) -> web.Response:
    item = FailoverItem(
        service="orders", from_member="a", to_member="b", epoch=3, cause="probe: a down"
    )
    return web.json_response([item.model_dump()])


FAILOVERS = Operation(
    "GET", "/v1/failovers", "listFailovers", "Recent failovers", _failovers,
    {200: ("failovers", ListOf(FailoverItem))}, tag="failovers",
)  # fmt: skip


def test_failovers_when_the_server_has_them(
    plane: FakePlane, capsys: pytest.CaptureFixture[str]
) -> None:
    with LiveApi(plane, extra_operations=[FAILOVERS]) as server:
        code, out, err = run(capsys, "failovers", "--api", server.url)
        assert code == 0, err
        assert "Failovers" in out and "probe: a down" in out and "FROM_MEMBER" in out
        code, out, _ = run(capsys, "failovers", "--json", "--api", server.url)
        assert json.loads(out)[0]["to_member"] == "b"


def test_failovers_not_supported_yet(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "failovers", "--api", live.url)
    assert code == 1
    assert "does not support /v1/failovers yet" in err and live.url in err


# --- auth, environment, connection ----------------------------------------------------------------


def test_token_from_environment(
    secured: LiveApi, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPSTAGE_API", secured.url)
    code, _, err = run(capsys, "services")
    assert code == 1 and "bearer token" in err

    monkeypatch.setenv("REPSTAGE_TOKEN", RO)
    code, out, _ = run(capsys, "services", "--json")
    assert code == 0 and json.loads(out)["services"][0]["name"] == "orders"

    code, _, err = run(capsys, "switchover", "orders", "--to", "b")
    assert code == 1 and "read-only" in err
    assert secured.call(lambda: secured.plane.submitted) == []

    code, out, _ = run(capsys, "switchover", "orders", "--to", "b", "--token", RW, "--json")
    assert code == 0 and json.loads(out)["primary"] == "b"


def test_unreachable_api_names_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    url = f"http://127.0.0.1:{port}"
    code, _, err = run(capsys, "status", "--api", url)
    assert code == 1
    assert url in err and "--api" in err and "REPSTAGE_API" in err


# --- validate -------------------------------------------------------------------------------------

GOOD_CONFIG = """\
xds: {listen: "127.0.0.1:18000"}
api: {listen: "127.0.0.1:8080"}
services:
  - name: orders
    protocol: tcp
    listen_port: 15000
    read_port: 15001
    members:
      - {name: a, address: 127.0.0.1, port: 9001}
      - {name: b, address: 127.0.0.1, port: 9002}
    primary: a
"""


def test_validate_good_config(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_CONFIG)
    # the CLI's own variables are not config
    monkeypatch.setenv("REPSTAGE_API", "http://127.0.0.1:1")
    monkeypatch.setenv("REPSTAGE_TOKEN", "whatever")
    code, out, err = run(capsys, "validate", str(path))
    assert code == 0, err
    assert "valid" in out and "orders" in out and "auth off" in out

    code, out, _ = run(capsys, "validate", str(path), "--json")
    summary = json.loads(out)
    assert summary["valid"] is True
    assert summary["services"][0]["name"] == "orders"
    assert summary["api"]["auth"] is False


def test_validate_broken_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD_CONFIG.replace("port: 9002", "port: 70000"))
    code, out, err = run(capsys, "validate", str(path))
    assert code == 1
    assert "services[0].members[1].port" in err
    assert "error:" in err

    code, out, _ = run(capsys, "validate", str(path), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["valid"] is False
    assert any(e["field"] == "services[0].members[1].port" for e in report["errors"])
    # the same problems the library reports
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})
    assert [e["field"] for e in report["errors"]] == [f or None for f, _ in raised.value.errors]


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 1 and "not found" in err


# --- delegated commands ---------------------------------------------------------------------------


def test_delegated_commands_get_their_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    fake = types.ModuleType("fake_delegate")
    fake.serve_main = lambda args: seen.setdefault("serve", args) and 0  # type: ignore[attr-defined]
    fake.main = lambda args: seen.setdefault("other", args) and 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_delegate", fake)
    monkeypatch.setattr(cli, "_DELEGATES", {"serve": ("fake_delegate", "serve_main"),
                                            "bootstrap": ("fake_delegate", "main"), "demo": ("fake_delegate", "main")})  # fmt: skip

    assert cli.main(["serve", "--config", "c.yaml"]) == 0
    assert seen["serve"].config == "c.yaml"
    assert cli.main(["bootstrap", "--node-id", "e1", "--xds", "127.0.0.1:18000", "--xds", "127.0.0.1:18001",
                     "--admin-port", "9902", "--delta", "--out", "b.yaml"]) == 0  # fmt: skip
    args = seen.pop("other")
    assert (args.node_id, args.xds, args.admin_port, args.delta, args.out) == (
        "e1", ["127.0.0.1:18000", "127.0.0.1:18001"], 9902, True, "b.yaml")  # fmt: skip
    assert cli.main(["demo", "--keep", "--duration", "3"]) == 0
    assert seen["other"].keep is True and seen["other"].duration == 3.0


def test_delegated_command_missing_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli._DELEGATES, "demo", ("repstage_mesh.no_such_module", "main"))
    code, _, err = run(capsys, "demo")
    assert code == 1 and "not available" in err


# --- snapshots ------------------------------------------------------------------------------


@pytest.fixture
def snap_live(plane: FakePlane) -> Iterator[LiveApi]:
    from fakes import FakeSnapshots

    from repstage_mesh.api.snapshots import snapshot_operations

    with LiveApi(plane, extra_operations=snapshot_operations(FakeSnapshots(plane))) as server:
        yield server


def test_snapshot_follows_the_committed_steps_until_the_member_is_back(
    snap_live: LiveApi, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import threading
    import time

    from repstage_mesh.core.models import SnapshotStep, UpdateSnapshot

    live = snap_live

    def finish() -> None:
        deadline = time.monotonic() + 10
        while not live.plane.state().snapshots and time.monotonic() < deadline:
            time.sleep(0.01)
        (entry,) = live.plane.state().snapshots
        step = SnapshotStep(name="take", at=time.time(), ok=True, detail="file:///x")
        update = UpdateSnapshot(id=entry.id, steps=(step,), status="completed", pool="in", artifact="file:///x")
        asyncio.run_coroutine_threadsafe(live.plane.submit(update), live.loop).result(5)

    helper = threading.Thread(target=finish)
    helper.start()
    code, out, err = run(capsys, "snapshot", "orders", "--api", live.url)
    helper.join()
    assert code == 0, err
    assert "orders/a (primary" in out and "completed" in out and "take" in out
    code, out, _ = run(capsys, "snapshots", "orders", "--api", live.url)
    assert code == 0 and "Snapshots" in out and "file:///x" in out
    code, out, _ = run(capsys, "--json", "snapshots", "orders", live.plane.state().snapshots[0].id, "--api", live.url)
    assert code == 0 and json.loads(out)["status"] == "completed"
    code, _, err = run(capsys, "snapshots", "nope", "--api", live.url)
    assert code == 1 and "nope" in err


def test_snapshot_of_several_services_needs_consistent_and_posts_one_point(
    snap_live: LiveApi, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "snapshot", "orders", "web", "--api", snap_live.url)
    assert code == 1 and "--consistent" in err and not snap_live.plane.state().holds
    code, _, err = run(capsys, "snapshot", "orders", "--consistent", "--member", "b", "--api", snap_live.url)
    assert code == 1 and "--member" in err and not snap_live.plane.state().holds
    code, out, err = run(capsys, "--json", "snapshot", "orders", "--consistent", "--no-wait", "--api", snap_live.url)
    assert code == 0, err
    (point,) = snap_live.plane.state().holds
    assert json.loads(out)["id"] == point.id and point.services == ("orders",)


@pytest.mark.parametrize("command", ["validate", "serve"])
def test_a_short_raft_password_is_refused_by_validate_and_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    path = tmp_path / "short.yaml"
    path.write_text(
        GOOD_CONFIG
        + 'raft: {bind: "127.0.0.1:7101", peers: ["127.0.0.1:7102"], password: "short-pw"}\n'
        + f"node: {{data_dir: {tmp_path / 'data'}}}\n"
    )
    monkeypatch.delenv("REPSTAGE_RAFT__PASSWORD", raising=False)
    code, out, err = run(capsys, command, *(["--config"] if command == "serve" else []), str(path))
    assert code == (2 if command == "serve" else 1)  # serve: refused to start
    assert "raft.password" in out + err and "at least 16 characters" in out + err
    assert "short-pw" not in out + err  # the value itself is never echoed
    assert not (tmp_path / "data").exists()  # nothing started


def test_bootstrap_keepalive_flags_reach_the_xds_cluster_and_bad_ones_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b.yaml"
    assert cli.main(["bootstrap", "--node-id", "e1", "--xds", "127.0.0.1:18000", "--keepalive-interval", "1.5",
                     "--keepalive-timeout", "0.5", "--out", str(out)]) == 0  # fmt: skip
    boot = yaml.safe_load(out.read_text())
    options = boot["static_resources"]["clusters"][0]["typed_extension_protocol_options"]
    keepalive = next(iter(options.values()))["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]
    assert keepalive == {"interval": "1.500s", "timeout": "0.500s"}
    code, _, err = run(capsys, "bootstrap", "--node-id", "e1", "--xds", "127.0.0.1:18000", "--keepalive-timeout", "0")
    assert code == 2 and "--keepalive-timeout" in err


# --- validate checks what serve checks (issue 13): a config that validates starts -------------


def with_top(lines: str) -> str:
    """GOOD_CONFIG with `lines` added at the top level (an api: line replaces its own)."""
    base = GOOD_CONFIG.replace('api: {listen: "127.0.0.1:8080"}\n', "") if lines.startswith("api:") else GOOD_CONFIG
    return lines + "\n" + base


@pytest.mark.parametrize(("extra", "field"), [
    ('api: {listen: "0.0.0.0:18089"}', "api.listen"),
    ("secrets: {pw: {env: REPSTAGE_TEST_UNSET_VARIABLE}}", "secrets.pw.env"),
    ("secrets: {pw: {file: /nonexistent/secret}}", "secrets.pw.file"),
    ("api: {tls: {cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem}}", "api.tls.cert_file"),
    ("node: {data_dir: /proc/self/repstage}", "node.data_dir"),
])
def test_validate_refuses_what_serve_would_refuse_and_serve_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    extra: str, field: str,
) -> None:
    from repstage_mesh.cli.serve import serve_main

    monkeypatch.delenv("REPSTAGE_TEST_UNSET_VARIABLE", raising=False)
    path = tmp_path / "bad.yaml"
    path.write_text(with_top(extra))
    code, out, _ = run(capsys, "validate", str(path), "--json")
    assert code == 1, out
    assert [e["field"] for e in json.loads(out)["errors"]] == [field]
    monkeypatch.chdir(tmp_path)
    assert serve_main(argparse.Namespace(config=str(path))) == 2  # refused before anything starts
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {field}: "), lines
    assert not (tmp_path / ".repstage").exists()


def test_a_whitespace_token_is_refused_by_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(with_top('api: {tokens: [{name: ci, role: read_write, token: "two words"}]}'))
    code, out, _ = run(capsys, "validate", str(path), "--json")
    assert code == 1
    assert [e["field"] for e in json.loads(out)["errors"]] == ["api.tokens.named[0].token"]


def test_validate_accepts_tls_named_tokens_hooks_and_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("CACHE_PW", "x")
    path = tmp_path / "good.yaml"
    path.write_text(with_top(
        f'api: {{listen: "0.0.0.0:18089", tls: {{cert_file: {cert}, key_file: {key}}},\n'
        '      tokens: [{name: ci, role: read_write, token: t0123456789}]}\n'
        "secrets: {cache-pw: {env: CACHE_PW}}\n"
        "hooks: {promote: {command: [/bin/true]}}"))
    code, out, err = run(capsys, "validate", str(path), "--json")
    assert code == 0, out + err
    summary = json.loads(out)
    assert summary["api"]["token_names"] == ["ci"] and summary["api"]["tls"] is True
    assert (summary["hooks"], summary["secrets"]) == (["promote"], ["cache-pw"])
    assert "t0123456789" not in out
