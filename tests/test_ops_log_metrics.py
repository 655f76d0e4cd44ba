"""Issue 15 items 1-2: the log formats, the role-change and failover-step lines, and the
service, member and per-type proxy gauges (scraped and parsed as Prometheus would)."""

from __future__ import annotations

import argparse
import io
import json
import logging
from typing import Any

import pytest
from fakes import orders_spec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from repstage_mesh.cli.main import build_parser
from repstage_mesh.config import ConfigError, load_config
from repstage_mesh.core.models import DeleteService, MeshState, Outcome, PutService, SetPrimary
from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.core.state import apply
from repstage_mesh.decide import FailoverRecord
from repstage_mesh.failover.steplog import StepLog
from repstage_mesh.telemetry import logs
from repstage_mesh.telemetry.metrics import MeshMetrics
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot
from repstage_mesh.xds.protocol import NodeInfo, SotwRequest, SotwStream
from repstage_mesh.xds.tracker import ProxyTracker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


class Chain:
    """Applies commands one index after another, like the Raft log, keeping each outcome."""

    def __init__(self) -> None:
        self.state = MeshState()
        self.index = 0

    def __call__(self, command: Any) -> tuple[MeshState, Outcome]:
        self.index += 1
        self.state, outcome = apply(self.state, command, self.index)
        assert outcome.ok, outcome
        return self.state, outcome


# --- formats ---------------------------------------------------------------------------------


def emit(fmt: logs.LogFormat, *, exc: bool = False) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.TextFormatter())
    logger = logging.getLogger(f"test.ops.{fmt}.{exc}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logs.event(logger, "role_change", "orders: primary a -> b", service="orders", old="a", new=None,
                   epoch=7, cause="primary 'a' is down", elapsed_ms=1.5)
        logger.info("plain %s", "line")
        if exc:
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_lines_parse_and_carry_the_event_fields() -> None:
    first, second, third = [json.loads(line) for line in emit("json", exc=True).splitlines() if line.startswith("{")]
    assert first["event"] == "role_change" and first["msg"] == "orders: primary a -> b"
    assert (first["service"], first["old"], first["new"], first["epoch"]) == ("orders", "a", None, 7)
    assert first["level"] == "INFO" and first["ts"].endswith("Z") and first["logger"] == "test.ops.json.True"
    assert second == {"ts": second["ts"], "level": "INFO", "logger": "test.ops.json.True", "msg": "plain line"}
    assert third["level"] == "ERROR" and "ValueError: boom" in third["exc"]


def test_text_lines_are_readable_with_key_value_fields() -> None:
    event, plain = emit("text").splitlines()
    assert " INFO test.ops.text.False: orders: primary a -> b | " in event
    assert ('| event=role_change service=orders old=a new=- epoch=7 cause="primary \'a\' is down" '
            'elapsed_ms=1.5') in event
    assert not event.startswith("{")
    assert plain.endswith("INFO test.ops.text.False: plain line")


def test_configure_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        stream = io.StringIO()
        handler = logs.configure("json", "debug", stream)
        assert root.handlers == [handler] and root.level == logging.DEBUG
        logging.getLogger("repstage_mesh.x").debug("hello")
        assert json.loads(stream.getvalue())["msg"] == "hello"
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_log_format_from_the_file_the_environment_and_the_serve_flag(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"node: {{id: n1, data_dir: {tmp_path}}}\nlog: {{format: json}}\n")
    assert load_config(path, env={}).log.format == "json"
    assert load_config(path, env={"REPSTAGE_LOG__FORMAT": "text"}).log.format == "text"
    path.write_text(f"node: {{id: n1, data_dir: {tmp_path}}}\n")
    assert (load_config(path, env={}).log.format, load_config(path, env={}).log.level) == ("text", "info")
    path.write_text(f"node: {{id: n1, data_dir: {tmp_path}}}\nlog: {{format: xml}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "log.format" in str(caught.value)
    args = build_parser().parse_args(["serve", "--config", "c.yaml", "--log-format", "json"])
    assert args.log_format == "json"
    assert build_parser().parse_args(["serve", "--config", "c.yaml"]).log_format is None


# --- role changes, as every node logs them -----------------------------------------------------


def test_role_changes_are_logged_with_cause_source_and_fail_closed_duration(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    chain = Chain()
    metrics = MeshMetrics(registry, "cp-1", state=lambda: chain.state)
    watch = metrics.services
    clock = [100.0]
    watch.clock = lambda: clock[0]
    caplog.set_level(logging.DEBUG, logger="repstage_mesh.roles")
    watch.applied(*chain(PutService(spec=orders_spec())), ready=False)  # the baseline: a is primary
    watch.applied(*chain(SetPrimary(service="orders", member="b", cause="replayed")), ready=False)
    watch.applied(*chain(SetPrimary(service="orders", member=None, cause="fence: a is down")))
    clock[0] += 0.25
    watch.applied(*chain(SetPrimary(service="orders", member="a", cause="a is back")))
    got = [(r.levelno, r.repstage_fields) for r in caplog.records]  # type: ignore[attr-defined]
    assert [(level, f["event"], f["old"], f["new"], f["cause"]) for level, f in got] == [
        (logging.DEBUG, "role_change", "a", "b", "replayed"),  # before the node is ready
        (logging.INFO, "fail_closed_entered", "b", None, "fence: a is down"),
        (logging.INFO, "fail_closed_exited", None, "a", "a is back"),
    ]
    exited = got[-1][1]
    assert exited["duration_ms"] == 250.0 and exited["epoch"] == 4 and exited["source"] == "announce"


# --- the service gauges ----------------------------------------------------------------------


def test_primary_epoch_and_fail_closed_series_follow_the_state() -> None:
    registry = CollectorRegistry()
    chain = Chain()
    leads = [True]
    metrics = MeshMetrics(registry, "cp-1", state=lambda: chain.state, leads=lambda: leads[0])
    metrics.services.applied(*chain(PutService(spec=orders_spec())))
    metrics.services.applied(*chain(PutService(spec=orders_spec(name="cart", listen_port=16000, read_port=16001))))
    samples = scrape(registry)
    assert series(samples, "repstage_service_primary") == {
        (("member", "a"), ("service", "cart")): 1, (("member", "a"), ("service", "orders")): 1}
    assert value(samples, "repstage_service_fail_closed", service="orders") == 0
    assert value(samples, "repstage_service_role_age_seconds", service="orders") is not None

    metrics.services.applied(*chain(SetPrimary(service="orders", member=None)))
    samples = scrape(registry)
    assert value(samples, "repstage_service_primary", service="orders", member="a") is None  # no primary: no series
    assert value(samples, "repstage_service_fail_closed", service="orders") == 1
    assert value(samples, "repstage_service_epoch", service="orders") == 3

    metrics.services.applied(*chain(SetPrimary(service="orders", member="b")))
    samples = scrape(registry)
    assert {dict(k)["member"] for k in series(samples, "repstage_service_primary") if dict(k)["service"] == "orders"} == {"b"}
    assert value(samples, "repstage_service_fail_closed", service="orders") == 0
    assert value(samples, "repstage_service_epoch", service="orders") == 4

    # members' probe state and lag, from the leader's observations, only while it leads
    for member, status, offset in (("a", MemberStatus.REPLICA, 900), ("b", MemberStatus.PRIMARY, 1000)):
        metrics.services.observed(Observation("orders", member, status, 1.0, "probe:tcp", offset=offset))
    metrics.services.observed(Observation("gone", "x", MemberStatus.DOWN, 1.0, "probe:tcp"))  # no such service
    samples = scrape(registry)
    assert value(samples, "repstage_member_probe_state", service="orders", member="a", state="replica") == 1
    assert value(samples, "repstage_member_probe_state", service="orders", member="a", state="down") == 0
    assert value(samples, "repstage_member_lag_bytes", service="orders", member="a") == 100
    assert value(samples, "repstage_member_lag_bytes", service="orders", member="b") == 0
    assert not any(dict(k).get("service") == "gone" for k in series(samples, "repstage_member_probe_state"))
    leads[0] = False
    assert series(scrape(registry), "repstage_member_probe_state") == {}

    # a removed service drops every series of its own
    metrics.services.applied(*chain(DeleteService(name="orders")))
    samples = scrape(registry)
    assert not [k for (_, k) in samples if ("service", "orders") in k]
    assert value(samples, "repstage_service_primary", service="cart", member="a") == 1


def test_proxies_by_type_and_sync_state() -> None:
    registry = CollectorRegistry()
    metrics = MeshMetrics(registry, "cp-1")
    tracker = ProxyTracker(control_plane="cp-1")
    tracker.observers.append(metrics)
    cluster = EncodedResource.from_bytes(res.CLUSTER, "db", b"cluster-db", ())
    snap = Snapshot("3", {res.CLUSTER: {"db": cluster}})
    streams = []
    for sid in (1, 2, 3):
        stream = SotwStream(snap)
        streams.append(stream)
        tracker.connect(sid, NodeInfo(f"envoy-{sid}"), stream)
        tracker.record(sid, stream.receive(SotwRequest(res.CLUSTER, node=NodeInfo(f"envoy-{sid}"))))
    samples = scrape(registry)
    assert value(samples, "repstage_xds_proxies", control_plane="cp-1", type="cds", state="behind") == 3
    assert value(samples, "repstage_xds_proxies", control_plane="cp-1", type="lds", state="synced") == 0
    for sid, nack in ((1, False), (2, True)):
        send = next(iter(streams[sid - 1].types[res.CLUSTER].pending.values()))
        request = SotwRequest(res.CLUSTER, "" if nack else send.version, send.nonce, error="bad" if nack else None)
        tracker.record(sid, streams[sid - 1].receive(request))
    samples = scrape(registry)
    assert [value(samples, "repstage_xds_proxies", control_plane="cp-1", type="cds", state=s)
            for s in ("synced", "behind", "nacked")] == [1, 1, 1]
    assert {dict(k)["type"] for k in series(samples, "repstage_xds_proxies")} == {"cds", "eds", "lds", "rds", "sds"}


# --- failover steps, as the leader logs them ---------------------------------------------------


def test_each_timeline_event_is_logged_once_and_the_last_carries_the_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chain = Chain()
    chain(PutService(spec=orders_spec()))
    steplog = StepLog(lambda: chain.state)
    rec = FailoverRecord(id="cp-1-1", service="orders", cause="primary 'a' is down", mode="orchestrate",
                         kind="failover", old_primary="a", new_primary="b", started_at=10.0)
    caplog.set_level(logging.DEBUG, logger="repstage_mesh.failover")
    rec.event("detected", 10.0)
    rec.event("decided", 10.001, target="b")
    steplog.changed(rec)
    steplog.changed(rec)  # nothing new: nothing logged
    rec.event("fenced", 10.01, epoch=5)
    rec.event("acked", 10.02, proxy="envoy-1")
    rec.epoch = 7
    rec.event("committed", 10.03, epoch=7, member="b")
    rec.end(10.04, True, "new primary b")
    rec.event("done", 10.04, reason="new primary b")
    steplog.changed(rec)
    fields = [r.repstage_fields for r in caplog.records]  # type: ignore[attr-defined]
    assert [f["step"] for f in fields] == ["detected", "decided", "fenced", "acked", "committed", "done"]
    assert [r.levelno for r in caplog.records][3] == logging.DEBUG  # one per proxy: DEBUG
    assert {(f["event"], f["id"], f["kind"], f["service"], f["old"], f["new"], f["source"]) for f in fields} == {
        ("failover_step", "cp-1-1", "failover", "orders", "a", "b", "announce")}
    assert [f["epoch"] for f in fields] == [None, None, 5, 5, 7, 7]
    assert fields[-1]["duration_ms"] == 40.0 and fields[-1]["status"] == "done" and fields[1]["detail"] == {"target": "b"}
    assert "duration_ms" not in fields[2]


def test_serve_installs_the_format_of_the_flag_else_the_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """`serve`: --log-format wins over log.format; without it the file's format is used."""
    from repstage_mesh.cli import serve

    def run(coroutine: Any) -> None:  # instead of running a node: log one line
        coroutine.close()
        logging.getLogger("repstage_mesh.node").info("node would start")

    monkeypatch.setattr(serve.asyncio, "run", run)
    path = tmp_path / "c.yaml"
    path.write_text(f"node: {{id: n1, data_dir: {tmp_path}}}\nlog: {{format: json}}\n")
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        for flag, json_expected in ((None, True), ("text", False), ("json", True)):
            assert serve.serve_main(argparse.Namespace(config=str(path), log_format=flag)) == 0
            line = capsys.readouterr().err.strip().splitlines()[-1]
            if json_expected:
                assert json.loads(line)["msg"] == "node would start", line
            else:
                assert line.endswith("INFO repstage_mesh.node: node would start"), line
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
