"""Envoy's own OpenTelemetry tracer, turned on from the config file (`telemetry.envoy_tracing`),
and how the control plane's OTLP exporter treats a bare HOST:PORT. No network, no Envoy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)

from repstage_mesh.config import (
    ENVOY_COLLECTOR_CLUSTER,
    ConfigError,
    EnvoyConfig,
    TelemetryConfig,
    load_config,
)
from repstage_mesh.core.models import Member, MeshState, ServiceProtocol, ServiceSpec, ServiceState
from repstage_mesh.filters import CLUSTER, HTTP_CONNECTION_MANAGER, LISTENER
from repstage_mesh.render.envoy import render
from repstage_mesh.telemetry.tracing import _plaintext


def state(*protocols: ServiceProtocol) -> MeshState:
    services = {}
    for i, protocol in enumerate(protocols):
        spec = ServiceSpec(
            name=f"s{i}", protocol=protocol, listen_port=18000 + i,
            members=(Member(name="a", address="127.0.0.1", port=9000 + i),),
        )  # fmt: skip
        services[spec.name] = ServiceState(spec=spec, primary="a", epoch=3)
    return MeshState(services=services)


def managers(resources: Mapping[str, Mapping[str, object]]) -> list[HttpConnectionManager]:
    out = []
    for listener in resources[LISTENER].values():
        assert isinstance(listener, Listener)
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.name == HTTP_CONNECTION_MANAGER and f.typed_config is not None:
                    out.append(HttpConnectionManager.parse(f.typed_config.value))
    return out


def test_envoy_tracing_renders_the_tracer_and_the_collector_cluster() -> None:
    telemetry = TelemetryConfig(otlp_endpoint="http://127.0.0.1:4317", envoy_tracing=True, envoy_sampling_percent=25)
    options = EnvoyConfig(listen_address="127.0.0.1").render_options(telemetry)
    resources = render(state(ServiceProtocol.HTTP, ServiceProtocol.TCP), options)
    collector = resources[CLUSTER][ENVOY_COLLECTOR_CLUSTER]
    assert isinstance(collector, Cluster)
    assert collector.type == ClusterDiscoveryType.STATIC
    (endpoint,) = collector.load_assignment.endpoints[0].lb_endpoints  # type: ignore[union-attr]
    address = endpoint.endpoint.address.socket_address  # type: ignore[union-attr]
    assert (address.address, address.port_value) == ("127.0.0.1", 4317)  # type: ignore[union-attr]
    (manager,) = [m for m in managers(resources) if m.tracing is not None]  # the HTTP service's, not the fence's
    assert manager.tracing is not None and manager.tracing.provider is not None
    assert manager.tracing.provider.name == "envoy.tracers.opentelemetry"
    assert manager.tracing.random_sampling.value == 25  # type: ignore[union-attr]
    assert ENVOY_COLLECTOR_CLUSTER.encode() in manager.tracing.provider.typed_config.value  # type: ignore[union-attr]
    # the same objects on the next render: encoded once
    again = render(state(ServiceProtocol.HTTP, ServiceProtocol.TCP), options)
    assert again[CLUSTER][ENVOY_COLLECTOR_CLUSTER] is collector


def test_envoy_tracing_dns_collector_is_strict_dns_and_envoy_endpoint_wins() -> None:
    telemetry = TelemetryConfig(
        otlp_endpoint="127.0.0.1:4317", envoy_tracing=True, envoy_otlp_endpoint="otel-collector.example:4317"
    )
    resources = render(state(ServiceProtocol.HTTP), EnvoyConfig().render_options(telemetry))
    collector = resources[CLUSTER][ENVOY_COLLECTOR_CLUSTER]
    assert isinstance(collector, Cluster) and collector.type == ClusterDiscoveryType.STRICT_DNS


def test_no_collector_cluster_without_http_services_or_when_off() -> None:
    on = EnvoyConfig().render_options(TelemetryConfig(otlp_endpoint="127.0.0.1:4317", envoy_tracing=True))
    assert ENVOY_COLLECTOR_CLUSTER not in render(state(ServiceProtocol.REDIS), on)[CLUSTER]
    off = EnvoyConfig().render_options(TelemetryConfig(otlp_endpoint="127.0.0.1:4317"))
    resources = render(state(ServiceProtocol.HTTP), off)
    assert ENVOY_COLLECTOR_CLUSTER not in resources[CLUSTER]
    assert all(m.tracing is None for m in managers(resources))


@pytest.mark.parametrize(
    ("telemetry", "message"),
    [
        ("{envoy_tracing: true}", "telemetry.envoy_tracing: needs telemetry.otlp_endpoint"),
        ('{envoy_tracing: true, otlp_endpoint: "https://c:4317"}', "telemetry.otlp_endpoint: Envoy exports spans over plaintext gRPC"),
        ('{envoy_tracing: true, otlp_endpoint: "c:4317", envoy_otlp_endpoint: "nope"}', "telemetry.envoy_otlp_endpoint: expected HOST:PORT"),
        ("{envoy_tracing: true, otlp_endpoint: 'c:4317', envoy_sampling_percent: 101}", "telemetry.envoy_sampling_percent"),
    ],
)
def test_bad_envoy_tracing_config_names_the_field(tmp_path: Path, telemetry: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"telemetry: {telemetry}\n")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(str(path), env={})


def test_bare_host_port_exports_in_plaintext_unless_the_environment_says() -> None:
    assert _plaintext("127.0.0.1:4317", {}) is True
    assert _plaintext("http://127.0.0.1:4317", {}) is None  # the exporter: http -> plaintext
    assert _plaintext("https://c:4317", {}) is None
    assert _plaintext("c:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "false"}) is None
    assert _plaintext("c:4317", {"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "false"}) is None
    assert _plaintext(None, {}) is None
