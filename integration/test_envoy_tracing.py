"""Envoy's own OpenTelemetry tracer for HTTP services (`telemetry: {envoy_tracing: true}`).

- What render() produces with it on passes `envoy --mode validate` (the collector's cluster
  included, as STATIC for an IP and STRICT_DNS for a name).
- End to end: a live `serve` whose config turns it on, a real Envoy bootstrapped as usual (no
  bootstrap change: the collector's cluster arrives over CDS), an HTTP request through the mesh,
  and the OTLP receiver gets Envoy's span for it next to nothing else it did not ask for.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration

from repstage_mesh.config import ENVOY_COLLECTOR_CLUSTER, EnvoyConfig, TelemetryConfig
from repstage_mesh.filters import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION
from repstage_mesh.render.envoy import render
from repstage_mesh.render.options import PrimaryStrategy

from .harness import ControlPlaneNode, Envoy, free_low_port, wait_until, workdir
from .otlp_receiver import OtlpReceiver
from .test_filters_envoy_validate import (
    ENVOY,
    as_static,
    bootstrap_with,
    envoy_validate,
    inline_routes,
    mesh_state,
)

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason="envoy binary not installed")


@pytest.mark.parametrize("collector", ["127.0.0.1:4317", "http://otel-collector.example:4317"])
def test_rendered_http_listener_with_envoy_tracing_is_accepted(tmp_path: Path, collector: str) -> None:
    telemetry = TelemetryConfig(otlp_endpoint=collector, envoy_tracing=True, envoy_sampling_percent=50)
    options = EnvoyConfig(
        primary_strategy=PrimaryStrategy.HEALTH_FENCE, fence_port=19901
    ).render_options(telemetry)
    resources = render(mesh_state(), options)
    traced = resources[CLUSTER][ENVOY_COLLECTOR_CLUSTER]
    assert isinstance(traced, Cluster)
    ip = not collector.startswith("http://otel")
    assert traced.type == (ClusterDiscoveryType.STATIC if ip else ClusterDiscoveryType.STRICT_DNS)
    assignments = resources[CLUSTER_LOAD_ASSIGNMENT]
    clusters = [as_static(c, assignments.get(name)) for name, c in resources[CLUSTER].items()]  # type: ignore[arg-type]
    routes: dict[str, RouteConfiguration] = resources[ROUTE_CONFIGURATION]  # type: ignore[assignment]
    listeners = [inline_routes(listener, routes) for listener in resources[LISTENER].values()]  # type: ignore[arg-type]
    envoy_validate(bootstrap_with(clusters, listeners), tmp_path)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from a\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_backend() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str = "/") -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def test_real_envoy_sends_spans_for_a_request_through_the_mesh(http_backend: int) -> None:
    with workdir() as wd, OtlpReceiver() as receiver:
        port = free_low_port()
        cfg: dict[str, Any] = {
            "services": [{
                "name": "web", "protocol": "http", "listen_port": port, "primary": "a",
                "members": [{"name": "a", "address": "127.0.0.1", "port": http_backend}],
            }],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
            "telemetry": {"otlp_endpoint": f"127.0.0.1:{receiver.port}", "envoy_tracing": True},
        }
        cp = ControlPlaneNode(wd, cfg)
        envoy = Envoy(wd, "edge-traced", [cp.xds_address])
        try:
            cp.start()
            envoy.start()
            wait_until(lambda: get(port) == 200, 20, what="HTTP through Envoy reaches a")
            # Envoy's OTel tracer flushes every 5 spans (or 5 s): send a few requests
            for i in range(6):
                assert get(port, f"/traced/{i}") == 200
            # Envoy exports in batches: the first may hold only the readiness requests above.
            spans = receiver.wait_for(
                lambda s: any(
                    x.resource.get("service.name") == "envoy-web" and "/traced/" in str(x.attributes.get("http.url", ""))
                    for x in s
                ),
                timeout=20.0,
            )
        finally:
            envoy.stop()
            cp.stop()
    from_envoy = [s for s in spans if s.resource.get("service.name") == "envoy-web"]
    traced = [s for s in from_envoy if "/traced/" in str(s.attributes.get("http.url", ""))]
    assert traced, [dict(s.attributes) for s in from_envoy]
    for span in traced:
        assert span.parent_span_id == ""  # a request without a traceparent starts a trace in Envoy
        assert span.attributes.get("http.status_code") == "200"
        assert str(span.attributes.get("upstream_cluster", "")).startswith("web")
