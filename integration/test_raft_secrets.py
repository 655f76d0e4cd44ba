"""The Raft password stays a secret on real `serve` nodes: it is in no log line, no API answer
(every GET of the OpenAPI document, /metrics), no `validate` output, and the node's data_dir
is 0700 with its journal files 0600."""

from __future__ import annotations

import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from integration.harness import (
    RAFT_PASSWORD,
    REPSTAGE,
    cluster_leader,
    raft_cluster,
    start_cluster,
    workdir,
)


def get_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode(errors="replace"))
    except urllib.error.HTTPError as err:
        return str(err.read().decode(errors="replace"))


def test_the_raft_password_is_never_shown_and_the_journal_is_private() -> None:
    with workdir() as wd:
        check_cluster(wd)


def check_cluster(wd: Path) -> None:
    nodes = raft_cluster(wd, 3)
    try:
        start_cluster(nodes)
        leader = cluster_leader(nodes)
        status, _ = leader.call("POST", "/v1/services/nothing/primary", {"member": "x"})
        assert status >= 400  # any answer will do: it is logged, and it must not leak
        paths = [
            p for p, item in leader.get("/openapi.json")["paths"].items()
            if "get" in item and "{" not in p
        ]
        assert "/v1/cluster" in paths and len(paths) >= 4, paths
        for node in nodes:
            for path in [*paths, "/metrics"]:
                text = get_text(node.api + path)
                assert RAFT_PASSWORD not in text, f"{node.name} GET {path} shows the Raft password"
        out = subprocess.run(
            [REPSTAGE, "validate", str(nodes[0].config_path), "--json"], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert RAFT_PASSWORD not in out.stdout + out.stderr
    finally:
        for node in nodes:
            node.stop()
    for node in nodes:
        assert RAFT_PASSWORD not in node.proc.log(), f"{node.name}'s log shows the Raft password"
        data_dir = Path(node.config["node"]["data_dir"])
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        journals = [p for p in data_dir.iterdir() if p.name.startswith("journal")]
        assert journals and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in journals), [
            (p.name, oct(p.stat().st_mode)) for p in journals
        ]
