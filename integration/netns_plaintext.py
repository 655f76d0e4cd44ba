"""Run inside a fresh network namespace (`unshare --net`) by test_xds_security.py: a plaintext
`serve` on 0.0.0.0, one Envoy reaching it over loopback, one over 10.213.0.1 (an address this
script puts on the namespace's own loopback interface). Prints a JSON report as its last line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from integration.harness import ControlPlaneNode, Envoy, free_low_port, wait_until

OTHER = "10.213.0.1"


def refused(cp: ControlPlaneNode) -> float:
    with urllib.request.urlopen(f"{cp.api}/metrics", timeout=2) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith('repstage_xds_streams_refused_total{reason="plaintext_peer"}'):
                return float(line.split()[-1])
    return 0.0


def main(base: Path) -> dict[str, object]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{OTHER}/32", "dev", "lo"], check=True)
    port = free_low_port()
    cp = ControlPlaneNode(base, {"xds": {"listen": f"0.0.0.0:{port}"}})
    near = Envoy(base, "near", [f"127.0.0.1:{port}"])
    far = Envoy(base, "far", [f"{OTHER}:{port}"])
    try:
        cp.start()
        near.start()
        far.proc.start()  # never "ready": it gets no config
        wait_until(lambda: far.admin("/server_info") is not None, 20, what="far Envoy's admin")

        def connected() -> list[str]:
            return [p["node_id"] for p in cp.get("/v1/proxies") if p["connected"]]

        wait_until(lambda: "near" in connected(), 20, what="the loopback Envoy is served")
        wait_until(lambda: refused(cp) >= 1, 20, what="the non-loopback stream is refused")
        time.sleep(0.5)  # not synchronisation: a last look that "far" stayed out
        return {
            "loopback_envoy_served": "near" in connected(),
            "non_loopback_envoy_served": "far" in connected(),
            "refused_plaintext_peer": refused(cp),
        }
    finally:
        far.stop()
        near.stop()
        cp.stop()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
