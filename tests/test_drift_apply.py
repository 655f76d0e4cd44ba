"""Config drift (config/drift.py), `repstage-mesh apply FILE [--dry-run]`, drift in `status`,
and the CLI following a switchover that outlived its request (504 switchover_running)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes import FakePlane, LiveApi, orders_spec

from repstage_mesh.api.failovers import failover_operations
from repstage_mesh.api.plane import DIRECT, Caller
from repstage_mesh.cli import main as cli
from repstage_mesh.config.drift import diff_lines, drift
from repstage_mesh.core.errors import SwitchoverRunning


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPSTAGE_API", raising=False)
    monkeypatch.delenv("REPSTAGE_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_drift_names_changed_fields_missing_and_unmanaged_services_and_ignores_primary() -> None:
    replicated = {
        "orders": orders_spec(primary="b"),
        "legacy": orders_spec(name="legacy", listen_port=16000, read_port=None),
    }
    changed = orders_spec(listen_port=15100, primary="a")
    new = orders_spec(name="cache", listen_port=17000, read_port=None)
    items = drift([changed, new], replicated)
    assert [(i.service, i.kind, i.fields) for i in items] == [
        ("orders", "changed", ("listen_port",)),
        ("cache", "missing", ()),
        ("legacy", "unmanaged", ()),
    ]
    assert diff_lines(items[0]) == ["orders:", "  listen_port: 15000 -> 15100"]
    # the primary alone is not drift: failovers change the replicated one
    assert drift([orders_spec(primary="b")], {"orders": orders_spec(primary="a")}) == []


def _config(tmp_path: Path, services: list[dict[str, Any]]) -> str:
    path = tmp_path / "repstage.yaml"
    path.write_text(yaml.safe_dump({"services": services}))
    return str(path)


def _service(**overrides: Any) -> dict[str, Any]:
    return orders_spec(**overrides).model_dump(mode="json", exclude_none=True)


@pytest.fixture
def live() -> Iterator[LiveApi]:
    with LiveApi(FakePlane(services=[orders_spec(primary="b")])) as server:
        yield server


def test_apply_dry_run_shows_the_diff_and_changes_nothing_then_apply_puts(
    live: LiveApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, [_service(listen_port=15100),
                                _service(name="cache", listen_port=17000, read_port=None)])  # fmt: skip
    before = live.plane.state()
    code, out, err = run(capsys, "apply", config, "--dry-run", "--api", live.url)
    assert code == 0, err
    assert "listen_port: 15000 -> 15100" in out and "cache: in the config file only" in out
    assert "dry run: nothing applied" in out
    assert live.plane.state() == before

    code, out, err = run(capsys, "--json", "apply", config, "--api", live.url)
    assert code == 0, err
    assert json.loads(out)["applied"] == ["orders", "cache"]
    orders = live.plane.state().service("orders")
    assert orders is not None and orders.spec.listen_port == 15100
    assert orders.primary == "b"  # the file's initial primary does not undo a failover
    assert live.plane.state().service("cache") is not None

    code, out, err = run(capsys, "apply", config, "--api", live.url)
    assert code == 0 and "no differences" in out and "nothing to apply" in out


def test_apply_refuses_an_invalid_file_naming_the_field(
    live: LiveApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, [{**_service(), "listen_port": 0}])
    code, _, err = run(capsys, "apply", config, "--api", live.url)
    assert code == 1 and "services[0].listen_port" in err


def test_status_shows_config_drift(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "--api", live.url)
    assert code == 0 and "in step with the replicated services" in out
    live.plane.cluster_view["config_drift"] = [
        {"service": "orders", "kind": "changed", "fields": ["listen_port", "members"]}
    ]
    code, out, _ = run(capsys, "status", "--api", live.url)
    assert code == 0
    assert (
        "config drift" in out
        and "orders: listen_port, members" in out
        and "repstage-mesh apply" in out
    )


class SlowSwitchoverPlane(FakePlane):
    """A leader whose switchover outlives the request: 504 with the running record, then the
    record is done when followed."""

    def __init__(self) -> None:
        super().__init__(services=[orders_spec()])
        self.waits: list[float | None] = []
        self.follows = 0

    async def switchover(
        self,
        service: str,
        to: str,
        timeout: float | None,
        wait: float | None = None,
        caller: Caller = DIRECT,
    ) -> dict[str, Any]:
        self.waits.append(wait)
        raise SwitchoverRunning("still running", self._record("running"))

    async def failover(self, record_id: str, caller: Caller = DIRECT) -> dict[str, Any] | None:
        self.follows += 1
        return (
            self._record("running" if self.follows < 2 else "done")
            if record_id == "cp-1-7"
            else None
        )

    def _record(self, status: str) -> dict[str, Any]:
        return {"id": "cp-1-7", "service": "orders", "cause": "switchover", "mode": "orchestrate",
                "kind": "switchover", "old_primary": "a", "new_primary": "b", "status": status,
                "started_at": 1.0, "epoch": 9, "timeline": []}  # fmt: skip


def test_cli_follows_a_switchover_that_outlived_its_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plane = SlowSwitchoverPlane()
    with LiveApi(plane, extra_operations=failover_operations()) as server:
        plane._commit(_orchestrate())
        code, out, err = run(
            capsys, "--json", "switchover", "orders", "--to", "b", "--api", server.url
        )
    assert code == 0, err
    assert json.loads(out)["status"] == "done"
    assert plane.waits == [cli.SWITCHOVER_WAIT] and plane.follows == 2


def _orchestrate() -> Any:
    from repstage_mesh.core.models import LeadershipMode, PutService

    spec = orders_spec()
    leadership = spec.leadership.model_copy(update={"mode": LeadershipMode.ORCHESTRATE})
    return PutService(spec=spec.model_copy(update={"leadership": leadership}))
