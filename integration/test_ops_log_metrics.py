"""Issue 15 items 1-2 end to end: what the person on call sees of a switchover, a failover, a
fail-closed period and an adopt, in the server's JSON log and in `/metrics`.

Real Redis 7 (a primary and two replicas) and a real `repstage-mesh serve --log-format json`
deciding with probes in orchestrate mode; no Envoy (no proxy to wait for: the plans' proxy waits
end at once), which keeps the test lean.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .databases import RedisGroup, redis_group
from .harness import ControlPlaneNode, free_low_port, wait_until, workdir


@dataclass
class Mesh:
    group: RedisGroup
    cp: ControlPlaneNode

    def log(self) -> list[dict[str, Any]]:
        """Every JSON line of the server's log (all of them must parse)."""
        lines = self.cp.proc.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def steps(self, record_id: str) -> list[str]:
        return [e["step"] for e in self.log() if e.get("event") == "failover_step" and e["id"] == record_id]

    def roles(self) -> list[tuple[str, str | None, str | None]]:
        return [(e["event"], e["old"], e["new"]) for e in self.log()
                if e.get("event") in ("role_change", "fail_closed_entered", "fail_closed_exited")]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.cp.api + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def service(self) -> tuple[list[str], float, float]:
        """(members with repstage_service_primary == 1, epoch, fail_closed) of `cache`."""
        m = self.metrics()
        primaries = [dict(labels)["member"] for (name, labels), v in m.items()
                     if name == "repstage_service_primary" and dict(labels)["service"] == "cache" and v == 1]
        key = (("service", "cache"),)
        return sorted(primaries), m[("repstage_service_epoch", key)], m[("repstage_service_fail_closed", key)]


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    with workdir() as wd, redis_group(replicas=2) as group:
        members = [{"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in group.names]
        cfg: dict[str, Any] = {
            "services": [{
                "name": "cache", "protocol": "redis", "listen_port": free_low_port(), "members": members,
                "primary": "r0",
                "leadership": {"source": "probe", "mode": "orchestrate", "min_failover_interval": 0.5},
            }],
            "log": {"format": "json"},
        }
        cp = ControlPlaneNode(wd, cfg)
        try:
            cp.start()
            yield Mesh(group, cp)
        finally:
            cp.stop()


FAILOVER_STEPS = ("detected", "decided", "leadership_confirmed", "fenced", "proxies_fenced", "promoted",
                  "committed", "done")


def test_switchover_failover_fail_closed_and_adopt_in_the_log_and_metrics(mesh: Mesh) -> None:
    first = wait_until(lambda: (s := mesh.service())[0] == ["r0"] and s, 20, what="r0 is primary in /metrics")
    assert first[2] == 0

    def probed(member: str, state: str) -> bool:
        labels = (("member", member), ("service", "cache"), ("state", state))
        return mesh.metrics().get(("repstage_member_probe_state", labels)) == 1

    wait_until(lambda: probed("r1", "replica") and probed("r0", "primary"), 20, what="the probes in /metrics")

    # a planned switchover: every step logged, the primary series moves to r1, the epoch grows
    status, body = mesh.cp.call("POST", "/v1/services/cache/switchover", {"to": "r1"})
    assert status == 200, body
    switch = body
    wait_until(lambda: "done" in mesh.steps(switch["id"]), 10, what="the switchover's last step is logged")
    steps = mesh.steps(switch["id"])
    for step in ("decided", "caught_up", "fenced", "proxies_fenced", "promoted", "committed", "done"):
        assert step in steps, (step, steps)
    assert steps.index("fenced") < steps.index("promoted") < steps.index("committed") < steps.index("done")
    done = next(e for e in mesh.log() if e.get("id") == switch["id"] and e["step"] == "done")
    assert (done["kind"], done["service"], done["old"], done["new"], done["source"]) == (
        "switchover", "cache", "r0", "r1", "probe")
    assert done["epoch"] > first[1] and done["duration_ms"] > 0 and done["cause"]
    primaries, epoch, closed = mesh.service()
    assert (primaries, closed) == (["r1"], 0) and epoch == done["epoch"] > first[1]
    # break before make, as every node saw it: the fence then the new primary
    assert mesh.roles()[-2:] == [("fail_closed_entered", "r0", None), ("fail_closed_exited", None, "r1")]

    # the replicas follow r1 and have settled (the decider promotes a replica only after its
    # status held for 0.2 s; a kill at once would fail closed first): the metrics say when
    def settled() -> bool:
        age = mesh.metrics().get(("repstage_service_role_age_seconds", (("service", "cache"),)), 0.0)
        return probed("r0", "replica") and probed("r2", "replica") and age >= 1.0

    wait_until(settled, 20, what="r0 and r2 replicate from r1 for a second")

    # the new primary dies: a failover, logged step by step
    mesh.group.kill("r1")
    after = wait_until(lambda: (s := mesh.service())[0] not in ([], ["r1"]) and s, 20, what="a replica promoted")
    new = after[0][0]
    assert after[1] > epoch and after[2] == 0
    record = next(r for r in mesh.cp.get("/v1/failovers")["failovers"] if r["kind"] == "failover")
    wait_until(lambda: "done" in mesh.steps(record["id"]), 10, what="the failover's last step is logged")
    steps = mesh.steps(record["id"])
    assert [s for s in steps if s in FAILOVER_STEPS] == list(FAILOVER_STEPS), steps
    last = next(e for e in mesh.log() if e.get("id") == record["id"] and e["step"] == "done")
    assert (last["old"], last["new"], last["epoch"], last["status"]) == ("r1", new, after[1], "done")
    assert "r1" in last["cause"]

    # no member left that can serve: fail closed (no primary series, fail_closed 1) ...
    other = next(n for n in ("r0", "r2") if n != new)
    mesh.group.kill(other)
    mesh.group.kill(new)
    closed_at = wait_until(lambda: (s := mesh.service())[2] == 1 and s, 20, what="fail closed in /metrics")
    assert closed_at[0] == [] and closed_at[1] > after[1]
    assert mesh.roles()[-1] == ("fail_closed_entered", new, None)
    # ... until a member comes back as a primary and is adopted
    mesh.group.start(other)
    back = wait_until(lambda: (s := mesh.service())[0] == [other] and s, 20, what=f"{other} adopted")
    assert back[2] == 0 and back[1] > closed_at[1]
    wait_until(lambda: mesh.roles()[-1][0] == "fail_closed_exited", 5, what="the fail-closed exit is logged")
    exited = [e for e in mesh.log() if e.get("event") == "fail_closed_exited"][-1]
    assert (exited["new"], exited["epoch"], exited["source"]) == (other, back[1], "probe")
    assert exited["duration_ms"] > 0
    kinds = {e["kind"] for e in mesh.log() if e.get("event") == "failover_step"}
    assert {"switchover", "failover", "fail_closed", "adopt"} <= kinds, kinds
