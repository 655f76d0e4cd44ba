"""Schemathesis over the whole OpenAPI document against a real `serve` node, every phase
including the stateful one (links inferred from the document), as `make fuzz-api` runs it
with fewer examples: no 5xx, no answer that breaks the document, nothing logged as an
unexpected error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_schemathesis_against_a_real_node_finds_no_5xx_and_no_schema_violation() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz_api.py"), "--max-examples", "15", "--seed", "7"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "✅ Stateful" in output and "node log: 0 unexpected error(s)" in output, output[-3000:]
