"""The Grafana dashboard and the Prometheus alert rules (manifests/monitoring/): promtool checks
the rules and runs their unit tests (alerts_test.yaml); every metric they name is one a node exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from repstage_mesh.core.models import MeshState
from repstage_mesh.telemetry.metrics import MeshMetrics

MONITORING = Path(__file__).resolve().parent.parent / "manifests" / "monitoring"
METRIC = re.compile(r"\brepstage_[a-z_]+")


def promtool() -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is not installed: run scripts/system-deps.sh (Debian package prometheus)"
    return tool


def exported() -> set[str]:
    """Every sample name a node can export (counters' _total, histograms' _bucket/_sum/_count)."""
    registry = CollectorRegistry()
    MeshMetrics(registry, "cp-1", raft_status=lambda: None, state=MeshState)
    names = {family.name for family in registry.collect()}
    return {name + suffix for name in names for suffix in ("", "_total", "_bucket", "_sum", "_count")}


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    for argv in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts_test.yaml"]):
        done = subprocess.run([promtool(), *argv], cwd=MONITORING, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(argv)}:\n{done.stdout}{done.stderr}"
        assert "SUCCESS" in done.stdout


def test_rules_cover_the_issue_and_name_only_exported_metrics() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"][0]["rules"]
    alerts = {rule["alert"]: rule for rule in rules}
    assert {"RepStageServiceNoPrimary", "RepStageProxiesBehind", "RepStageProxiesNack", "RepStageNoRaftQuorum"} <= set(alerts)
    known = exported()
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] in ("warning", "critical"), rule
        assert set(METRIC.findall(rule["expr"])) <= known, rule["expr"]


def test_dashboard_panels_query_exported_metrics() -> None:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    known = exported()
    queried: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(METRIC.findall(target["expr"]))
            assert names and names <= known, (panel["title"], target["expr"])
            queried |= names
    for needed in ("repstage_service_primary", "repstage_service_epoch", "repstage_service_fail_closed",
                   "repstage_service_role_age_seconds", "repstage_member_probe_state",
                   "repstage_member_lag_bytes", "repstage_xds_proxies", "repstage_raft_has_quorum"):
        assert needed in queried, needed
