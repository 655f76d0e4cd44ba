"""`make lint` guards the layers of ARCHITECTURE.md: these tests break a copy of the package on
purpose and check that the checks fail, naming what broke. They run the same commands as
`make lint` (lint-imports with pyproject.toml's contracts, scripts/check_sizes.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package (xds and filters resolved from their symlinks), pyproject.toml, the size
    script and ARCHITECTURE.md, in a fresh directory."""
    shutil.copytree(ROOT / "repstage_mesh", tmp_path / "repstage_mesh", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "ARCHITECTURE.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "check_sizes.py", tmp_path / "scripts" / "check_sizes.py")
    for room in ("xds", "filters"):
        shutil.copytree(ROOT / room, tmp_path / room, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def lint_imports(where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(where)}  # the copy, not the installed package
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(where / "pyproject.toml")],
        cwd=where, env=env, capture_output=True, text=True, timeout=120,
    )


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_tree_as_it_is_keeps_every_contract(copy: Path) -> None:
    result = lint_imports(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.split("Contracts:")[-1].replace("0 broken", "")


@pytest.mark.parametrize("library", ["aiohttp", "grpc", "redis", "psycopg", "consul", "pysyncobj"])
def test_core_importing_an_io_library_fails(copy: Path, library: str) -> None:
    append(copy / "repstage_mesh" / "core" / "models.py", f"import {library}  # noqa")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "The domain core and the decider do no I/O BROKEN" in result.stdout
    assert f"repstage_mesh.core.models -> {library}" in result.stdout


@pytest.mark.parametrize("room", ["xds", "filters"])
def test_generic_rooms_importing_the_domain_fail(copy: Path, room: str) -> None:
    append(copy / "repstage_mesh" / room / "__init__.py", "import repstage_mesh.core.models  # noqa")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "xds and filters know nothing of RepStage's domain BROKEN" in result.stdout


def test_an_inner_layer_importing_an_outer_one_fails(copy: Path) -> None:
    append(copy / "repstage_mesh" / "decide" / "steps.py", "import repstage_mesh.api.app  # noqa")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "Layers: cli and node on top, core at the bottom BROKEN" in result.stdout


def test_config_pulling_in_the_renderer_fails(copy: Path) -> None:
    append(copy / "repstage_mesh" / "config" / "sections.py", "import repstage_mesh.render.envoy  # noqa")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "Loading a config file does not pull in the renderer" in result.stdout


def test_size_limits(copy: Path) -> None:
    script = [sys.executable, str(copy / "scripts" / "check_sizes.py")]
    assert subprocess.run(script, capture_output=True, text=True).returncode == 0
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    append(copy / "repstage_mesh" / "core" / "naming.py", f"def too_long() -> None:\n{body}")
    result = subprocess.run(script, capture_output=True, text=True)
    assert result.returncode == 1
    assert "repstage_mesh/core/naming.py" in result.stdout and "too_long: 62 lines" in result.stdout


def test_snapshot_actions_importing_the_workflow_side_fails(copy: Path) -> None:
    append(copy / "repstage_mesh" / "snapshots" / "actions" / "ledger.py",
           "import repstage_mesh.raft.store  # noqa")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "Snapshot actions know only core" in result.stdout


def test_the_snapshot_workflow_doing_io_fails(copy: Path) -> None:
    append(copy / "repstage_mesh" / "snapshots" / "workflow.py", "import asyncio  # noqa")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "The snapshot workflow and its member choice do no I/O BROKEN" in result.stdout


def test_the_consistent_point_doing_io_fails(copy: Path) -> None:
    append(copy / "repstage_mesh" / "snapshots" / "consistent.py", "import redis  # noqa")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "The consistent point's workflow does no I/O BROKEN" in result.stdout
