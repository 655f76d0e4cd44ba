"""Promotion hooks (command and HTTP) and DatabasePromoter's dispatch, without databases.

Hooks are the operator's: defined in the config file under a name (`hooks:`), named by a
service. They run with a minimal environment, and their output is never stored verbatim."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from repstage_mesh.config import HOOK_ENV_ALLOW_LIST, Secrets, SecretSource
from repstage_mesh.core.models import HookSpec, ServiceSpec
from repstage_mesh.failover.promote import DatabasePromoter, post_http_hook, run_command_hook

PY = sys.executable


def spec(protocol: str = "tcp", hook: str | None = None) -> ServiceSpec:
    return ServiceSpec.model_validate({
        "name": "svc", "protocol": protocol, "listen_port": 9000, "primary": "a",
        "members": [{"name": "a", "address": "127.0.0.1", "port": 9001},
                    {"name": "b", "address": "127.0.0.1", "port": 9002}],
        "leadership": {"source": "probe", "mode": "orchestrate", "promote_hook": hook},
    })


def promoter(secrets: Secrets | None = None, **hooks: dict[str, Any]) -> DatabasePromoter:
    return DatabasePromoter({name: HookSpec.model_validate(h) for name, h in hooks.items()}, secrets)


async def test_command_hook_gets_the_placeholders(tmp_path: Path) -> None:
    out = tmp_path / "args.json"
    script = "import json, sys; json.dump(sys.argv[1:], open(sys.argv[1], 'w')); print('promoted')"
    hook = {"command": [PY, "-c", script, str(out), "{service}", "{member}", "{address}", "{port}",
                        "{epoch}", "{old_primary}"], "timeout": 10}
    result = await promoter(run=hook).promote(spec(hook="run"), "b", "a", epoch=42, timeout=10)
    assert result.ok, result.detail
    assert "exited 0" in result.detail
    assert json.loads(out.read_text())[1:] == ["svc", "b", "127.0.0.1", "9002", "42", "a"]


async def test_a_hook_not_defined_on_this_node_fails_and_runs_nothing() -> None:
    result = await promoter().promote(spec(hook="missing"), "b", "a", epoch=1, timeout=5)
    assert not result.ok and "no hook named 'missing'" in result.detail


async def test_command_hook_gets_a_minimal_environment_never_the_raft_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REPSTAGE_RAFT__PASSWORD", "raft-secret-0123456789")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "inherited-secret")
    monkeypatch.setenv("PG_PW", "pg-secret")
    out = tmp_path / "env.json"
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    secrets = Secrets({"pg": SecretSource(env="PG_PW")})
    hook = {"command": [PY, "-c", script, str(out)], "env": {"MODE": "fast"},
            "secret_env": {"PGPASSWORD": "pg"}}
    result = await promoter(secrets, run=hook).promote(spec(hook="run"), "b", "a", epoch=1, timeout=10)
    assert result.ok, result.detail
    env = json.loads(out.read_text())
    assert env["MODE"] == "fast" and env["PGPASSWORD"] == "pg-secret"
    assert "raft-secret-0123456789" not in json.dumps(env)
    assert "AWS_SECRET_ACCESS_KEY" not in env and "PG_PW" not in env
    assert set(env) <= {*HOOK_ENV_ALLOW_LIST, "MODE", "PGPASSWORD"}


async def test_command_hook_output_is_logged_as_an_excerpt_not_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="repstage_mesh.failover.promote")
    noisy = "import sys; sys.stdout.write('SECRET-REPLY\\x1b[31m' + 'x' * 5000); sys.exit(3)"
    failed = await run_command_hook([PY, "-c", noisy], {}, 5.0)
    assert not failed.ok and "exited 3" in failed.detail and "5017 bytes" in failed.detail
    assert "SECRET-REPLY" not in failed.detail
    logged = [r.getMessage() for r in caplog.records if "SECRET-REPLY" in r.getMessage()]
    assert logged and all("\x1b" not in m and len(m) < 400 for m in logged)


async def test_command_hook_failure_and_timeout_are_reported() -> None:
    failed = await run_command_hook([PY, "-c", "import sys; print('nope'); sys.exit(3)"], {}, 5.0)
    assert not failed.ok and "exited 3" in failed.detail
    started = time.monotonic()
    slow = await run_command_hook([PY, "-c", "import time; time.sleep(30)"], {}, 0.3)
    assert not slow.ok and "killed after 0.3 s" in slow.detail
    assert time.monotonic() - started < 5.0


async def test_command_hook_with_an_unknown_placeholder_names_it() -> None:
    result = await run_command_hook([PY, "{nodes}"], {"member": "b"}, 5.0)
    assert not result.ok and "bad placeholder" in result.detail and "nodes" in result.detail
    missing = await run_command_hook(["/nonexistent/hook"], {}, 5.0)
    assert not missing.ok and "cannot run" in missing.detail


@pytest.fixture
async def hook_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        received.append(body)
        status = 500 if body.get("member") == "a" else 200
        return web.json_response({"ok": status == 200}, status=status)

    app = web.Application()
    app.router.add_post("/promote", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/promote", received
    finally:
        await runner.cleanup()


async def test_http_hook_posts_json_and_judges_the_status(
    hook_server: tuple[str, list[dict[str, Any]]],
) -> None:
    url, received = hook_server
    hooks = promoter(web={"url": url})
    ok = await hooks.promote(spec(hook="web"), "b", "a", epoch=7, timeout=5)
    assert ok.ok, ok.detail
    assert received[-1] == {"action": "promote", "service": "svc", "member": "b",
                            "address": "127.0.0.1", "port": 9002, "epoch": 7, "old_primary": "a"}
    bad = await hooks.promote(spec(hook="web"), "a", "b", epoch=8, timeout=5)
    assert not bad.ok and "answered 500" in bad.detail
    assert '"ok"' not in bad.detail  # the reply itself is not stored, only its length
    back = await hooks.repoint(spec(hook="web"), "b", "a", timeout=5)
    assert back.ok and received[-1]["action"] == "repoint" and received[-1]["new_primary"] == "a"


async def test_http_hook_unreachable_is_a_failure_not_an_exception() -> None:
    result = await post_http_hook("http://127.0.0.1:9/x", {}, 1.0)
    assert not result.ok and "hook 'promote_hook'" in result.detail


async def test_no_builtin_promotion_without_a_hook_says_what_to_set() -> None:
    promoter = DatabasePromoter()
    result = await promoter.promote(spec("tcp"), "b", "a", epoch=1, timeout=1)
    assert not result.ok and "promote_hook" in result.detail
    unknown = await promoter.promote(spec("tcp"), "zz", "a", epoch=1, timeout=1)
    assert not unknown.ok and "not a member" in unknown.detail
    rejoin = await promoter.repoint(spec("tcp"), "a", "b", timeout=1)
    assert not rejoin.ok and rejoin.needs_rejoin == ("a",)
