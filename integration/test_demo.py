"""`make run` is `repstage-mesh demo`: it must run its failover and then end by itself, with no
write misrouted (a leftover task that ignores its cancellation once kept it running forever)."""

from __future__ import annotations

import re
import subprocess

import pytest

from .harness import REPSTAGE

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial


def test_the_demo_fails_over_and_exits_by_itself() -> None:
    proc = subprocess.Popen(
        [REPSTAGE, "demo", "--duration", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "COLUMNS": "120", "NO_COLOR": "1"},
    )
    try:
        output, _ = proc.communicate(timeout=120)  # a bound against hanging, not a speed figure
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert re.search(r"writes misrouted \(must be 0\)\s*│\s*0\s*│", output), output[-3000:]
    assert "failover done" in output, output[-3000:]
