"""`repstage-mesh announce`, as an operator or Patroni's on_role_change callback runs it."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from fakes import FakePlane, LiveApi, orders_spec

from repstage_mesh.cli import main as cli


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPSTAGE_API", raising=False)
    monkeypatch.delenv("REPSTAGE_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def live() -> Iterator[LiveApi]:
    with LiveApi(FakePlane(services=[orders_spec()])) as server:
        yield server


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def primary(live: LiveApi) -> str | None:
    return live.call(lambda: live.plane.state().service("orders").primary)  # type: ignore[union-attr,no-any-return]


def test_announce_sets_the_primary(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "announce", "orders", "b", "--api", live.url, "--json")
    assert code == 0, err
    change = json.loads(out)
    assert (change["primary"], change["previous_primary"], change["changed"]) == ("b", "a", True)
    assert primary(live) == "b"


def test_patroni_callback_announces_only_a_primary_role(
    live: LiveApi, capsys: pytest.CaptureFixture[str]
) -> None:
    # Patroni appends ACTION ROLE SCOPE to the configured command.
    code, out, err = run(capsys, "announce", "orders", "b", "--api", live.url,
                         "on_role_change", "replica", "pg-cluster")  # fmt: skip
    assert code == 0, err
    assert "b is now replica" in out and "nothing to announce" in out
    assert primary(live) == "a"
    code, out, err = run(capsys, "announce", "orders", "b", "--api", live.url,
                         "on_role_change", "primary", "pg-cluster")  # fmt: skip
    assert code == 0, err
    assert primary(live) == "b"
    code, out, err = run(capsys, "announce", "orders", "a", "--api", live.url,
                         "on_role_change", "master", "pg-cluster")  # Patroni 2's name  # fmt: skip
    assert code == 0, err
    assert primary(live) == "a"


def test_announce_bad_input_changes_nothing(live: LiveApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "announce", "orders", "b", "on_role_change", "--api", live.url)
    assert code == 1 and "ACTION ROLE SCOPE" in err
    code, _, err = run(capsys, "announce", "orders", "zz", "--api", live.url)
    assert code == 1 and "(field: member)" in err
    code, _, err = run(capsys, "announce", "orders", "b", "--epoch", "0", "--api", live.url)
    assert code == 1 and "--epoch" in err
    code, _, err = run(capsys, "announce", "orders")
    assert code == 2 and "MEMBER" in err
    assert primary(live) == "a"


def test_announce_gives_up_after_retry_for(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    code, _, err = run(capsys, "announce", "orders", "b", "--retry-for", "0.3",
                       "--api", f"http://127.0.0.1:{port}")  # fmt: skip
    assert code == 1 and f"127.0.0.1:{port}" in err
