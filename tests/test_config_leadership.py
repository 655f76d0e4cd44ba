"""The `leadership:` section of a service in the config file (part of ServiceSpec)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from repstage_mesh.config import ConfigError, Settings, load_config
from repstage_mesh.core.models import (
    LeadershipMode,
    LeadershipSource,
    ProbeKind,
    ServiceSpec,
)
from repstage_mesh.sources.probes import probe_kind

FILE = """
secrets:
  redis-password: {env: REDIS_PASSWORD}
services:
  - name: orders
    protocol: redis
    listen_port: 15000
    members:
      - {name: r0, address: 127.0.0.1, port: 6379}
      - {name: r1, address: 127.0.0.1, port: 6380}
    leadership:
      source: probe
      mode: orchestrate
      probe: {interval: 0.2, timeout: 0.5, fall: 2, rise: 1, password_secret: redis-password}
      min_failover_interval: 10
  - name: billing
    protocol: postgres
    listen_port: 15002
    members:
      - {name: pg-1, address: db1.example.com, port: 5432}
    leadership:
      source: consul
      consul: {service: patroni-billing, tag: master, wait: 60}
  - name: api
    protocol: http
    listen_port: 15003
    members:
      - {name: h1, address: 127.0.0.1, port: 8008}
    leadership:
      source: probe
      probe: {kind: http, path: /leader, expect_status: 204}
"""


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "repstage.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path, env={})


def test_leadership_parses_as_part_of_the_spec(tmp_path: Path) -> None:
    settings = load(tmp_path, FILE)
    orders, billing, api = settings.specs()
    assert orders.leadership.source is LeadershipSource.PROBE
    assert orders.leadership.mode is LeadershipMode.ORCHESTRATE
    probe = orders.leadership.probe
    assert (probe.interval, probe.timeout, probe.fall, probe.rise, probe.password_secret) == (
        0.2,
        0.5,
        2,
        1,
        "redis-password",
    )
    assert orders.leadership.min_failover_interval == 10
    assert probe_kind(orders) is ProbeKind.REDIS
    assert billing.leadership.source is LeadershipSource.CONSUL
    assert (
        billing.leadership.consul.service,
        billing.leadership.consul.tag,
        billing.leadership.consul.wait,
    ) == ("patroni-billing", "master", 60)
    assert probe_kind(billing) is ProbeKind.POSTGRES
    assert probe_kind(api) is ProbeKind.HTTP
    assert (api.leadership.probe.path, api.leadership.probe.expect_status) == ("/leader", 204)


def test_defaults_without_a_leadership_section() -> None:
    spec = ServiceSpec.model_validate(
        {
            "name": "s",
            "listen_port": 15000,
            "protocol": "http",
            "members": [{"name": "a", "address": "127.0.0.1", "port": 1}],
        }
    )
    leadership = spec.leadership
    assert (leadership.source, leadership.mode) == (
        LeadershipSource.ANNOUNCE,
        LeadershipMode.FOLLOW,
    )
    probe = leadership.probe
    assert (probe.interval, probe.timeout, probe.fall, probe.rise) == (0.1, 0.25, 3, 2)
    assert leadership.consul.tag == "primary" and leadership.consul.wait == 30.0
    assert probe_kind(spec) is ProbeKind.TCP  # an http service without kind http is TCP-probed


def test_dump_and_reload_keeps_leadership(tmp_path: Path) -> None:
    import yaml

    settings = load(tmp_path, FILE)
    dumped = yaml.safe_dump({
        "secrets": {k: v.model_dump(mode="json", exclude_none=True) for k, v in settings.secrets.items()},
        "services": [s.model_dump(mode="json") for s in settings.services],
    })
    again = load(tmp_path, dumped)
    assert again.specs() == settings.specs()


def service_with(leadership: str) -> str:
    return f"""
    services:
      - name: orders
        listen_port: 15000
        members: [{{name: a, address: 127.0.0.1, port: 9001}}]
        leadership: {leadership}
    """


CASES = [
    ("{source: gossip}", "services[0].leadership.source", "'announce', 'probe' or 'consul'"),
    ("{mode: auto}", "services[0].leadership.mode", "'follow' or 'orchestrate'"),
    ("{probe: {fall: 0}}", "services[0].leadership.probe.fall", "greater than or equal to 1"),
    ("{probe: {interval: 0}}", "services[0].leadership.probe.interval", "greater than 0"),
    ("{probe: {timeout: 61}}", "services[0].leadership.probe.timeout", "less than or equal to 60"),
    (
        "{probe: {kind: udp}}",
        "services[0].leadership.probe.kind",
        "'redis', 'postgres', 'http' or 'tcp'",
    ),
    (
        "{probe: {expect_status: 99}}",
        "services[0].leadership.probe.expect_status",
        "greater than or equal to 100",
    ),
    (
        "{probe: {period: 1}}",
        "services[0].leadership.probe.period",
        "Extra inputs are not permitted",
    ),
    ("{consul: {wait: 601}}", "services[0].leadership.consul.wait", "less than or equal to 600"),
    ("{ack_deadline: 0}", "services[0].leadership.ack_deadline", "greater than 0"),
    ("{max_lag_bytes: -1}", "services[0].leadership.max_lag_bytes", "greater than or equal to 0"),
]


@pytest.mark.parametrize(
    ("leadership", "path", "fragment"), CASES, ids=[c[1].split(".", 2)[-1] for c in CASES]
)
def test_bad_leadership_names_the_field(
    tmp_path: Path, leadership: str, path: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, service_with(leadership))
    assert [p for p, _ in caught.value.errors] == [path], caught.value.errors
    assert fragment in caught.value.errors[0][1]
