"""The README's REST reference must list every endpoint the OpenAPI document has."""

from __future__ import annotations

import re
from pathlib import Path

from fakes import FakePlane, FakeSnapshots

from repstage_mesh.api.app import operations
from repstage_mesh.api.failovers import failover_operations
from repstage_mesh.api.snapshots import snapshot_operations

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_rest_reference_matches_the_api() -> None:
    text = README.read_text()
    start, end = text.index("<!-- rest-reference"), text.index("<!-- /rest-reference -->")
    rows = set(re.findall(r"^\| (GET|PUT|POST|DELETE) \| `([^`?]+)", text[start:end], re.M))
    documented = {(op.method, op.path) for op in [*operations(), *failover_operations(), *snapshot_operations(FakeSnapshots(FakePlane()))]}
    assert rows == documented, f"missing from README: {documented - rows}; not in the API: {rows - documented}"


def test_readme_starts_with_the_two_commands() -> None:
    head = README.read_text()[:1500]
    assert "make run" in head and "make test" in head
