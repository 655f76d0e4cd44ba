"""Real Envoy accepts what the builders and render() produce (`envoy --mode validate`).

Validate mode parses and checks the whole bootstrap (static resources included) without
binding ports or connecting anywhere. Dynamic resources are checked by turning them into
static ones: each EDS cluster becomes a STATIC cluster carrying its ClusterLoadAssignment, and
each RDS reference becomes the inline RouteConfiguration render() produced for it.
"""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)

from repstage_mesh.core.models import Member, MeshState, ServiceProtocol, ServiceSpec, ServiceState
from repstage_mesh.filters import (
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    HTTP_CONNECTION_MANAGER,
    LISTENER,
    ROUTE_CONFIGURATION,
    DirectResponse,
    HealthStatus,
    RouteEntry,
    ToCluster,
    build_bootstrap,
    eds_cluster,
    http_health_check,
    http_listener,
    lb_endpoint,
    load_assignment,
    opentelemetry_tracing,
    pack,
    retry_policy,
    route_configuration,
    tcp_health_check,
    tcp_keepalive,
    tcp_proxy_listener,
    to_envoy_dict,
)
from repstage_mesh.render.envoy import render
from repstage_mesh.render.options import PrimaryStrategy, RenderOptions

ENVOY = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "envoy"

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason="envoy binary not installed")


def envoy_validate(config: dict[str, Any], tmp_path: Path, fmt: str = "yaml") -> None:
    path = tmp_path / f"envoy.{fmt}"
    path.write_text(yaml.safe_dump(config) if fmt == "yaml" else json.dumps(config))
    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"envoy rejected {path}:\n{result.stdout}\n{result.stderr}"
    assert "OK" in result.stdout + result.stderr


def envoy_rejects(config: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    return result.stdout + result.stderr


def bootstrap_with(clusters: list[Cluster], listeners: list[Listener], **kw: Any) -> dict[str, Any]:
    return build_bootstrap(
        "validate-node",
        [("127.0.0.1", 18000), ("127.0.0.2", 18000), ("127.0.0.3", 18000)],
        9901,
        static_clusters=clusters,
        static_listeners=listeners,
        **kw,
    )


def as_static(cluster: Cluster, assignment: ClusterLoadAssignment | None) -> Cluster:
    """An EDS cluster with `assignment` inline (STATIC); any other cluster as it is."""
    if cluster.type != ClusterDiscoveryType.EDS:
        assert assignment is None, f"{cluster.name} is not EDS but has an assignment"
        return cluster
    assert assignment is not None, f"EDS cluster {cluster.name} has no assignment"
    static = Cluster.parse(bytes(cluster))
    static.type = ClusterDiscoveryType.STATIC
    static.eds_cluster_config = None
    static.load_assignment = assignment
    return static


def inline_routes(listener: Listener, routes: dict[str, RouteConfiguration]) -> Listener:
    out = Listener.parse(bytes(listener))
    for chain in out.filter_chains:
        for filter_ in chain.filters:
            if filter_.name != HTTP_CONNECTION_MANAGER:
                continue
            assert filter_.typed_config is not None
            manager = HttpConnectionManager.parse(filter_.typed_config.value)
            assert manager.rds is not None, "render() uses RDS for every HTTP listener"
            manager.route_config = routes[manager.rds.route_config_name]
            manager.rds = None
            filter_.typed_config = pack(manager)
    return out


def test_bootstrap_with_xds_mtls_is_valid(tmp_path: Path) -> None:
    from repstage_mesh.filters.xds_tls import XdsTls
    from tests.certs import CertAuthority

    ca = CertAuthority()
    cert, key = ca.issue("edge-1", uris=("spiffe://repstage/envoy/edge-1",)).write(tmp_path, "edge-1")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    tls = XdsTls(str(cert), str(key), str(tmp_path / "ca.crt"), server_name="cp.example")
    envoy_validate(build_bootstrap("edge-1", [("127.0.0.1", 18000)], 9901, tls=tls), tmp_path)


def test_bootstrap_alone_is_valid_sotw_and_delta(tmp_path: Path) -> None:
    envoy_validate(build_bootstrap("n1", [("127.0.0.1", 18000)], 9901), tmp_path)
    envoy_validate(
        build_bootstrap(
            "n2",
            [("127.0.0.1", 18000), ("localhost", 18001)],
            9902,
            delta=True,
            runtime={"upstream": {"healthy_panic_threshold": 0}},
        ),
        tmp_path,
        fmt="json",
    )


def test_every_builder_is_accepted(tmp_path: Path) -> None:
    retry = retry_policy(per_try_timeout=timedelta(seconds=2))
    clusters = [
        eds_cluster(
            "db-primary",
            health_checks=[tcp_health_check()],
            close_connections_on_host_health_failure=True,
        ),
        eds_cluster("web-primary", health_checks=[http_health_check("/health", host="web")]),
        eds_cluster("otel", upstream_tcp_keepalive=tcp_keepalive()),
        as_static(
            eds_cluster(
                "db-read",
                health_checks=[http_health_check("/fence/db", expected_statuses=(200, 204))],
            ),
            load_assignment(
                "db-read",
                [
                    lb_endpoint("127.0.0.1", 6379, metadata={"repstage": {"member": "a", "n": 1}}),
                    lb_endpoint(
                        "127.0.0.1",
                        6380,
                        health_status=HealthStatus.UNHEALTHY,
                        health_check_address="127.0.0.1",
                        health_check_port=19000,
                        health_check_hostname="b",
                    ),
                    lb_endpoint("127.0.0.1", 6381, health_check_port=19001),
                ],
            ),
        ),
        as_static(eds_cluster("empty"), load_assignment("empty", [])),
    ]
    routes = route_configuration(
        "web-routes",
        [
            RouteEntry(path="/fence/db/a", target=DirectResponse(200, "primary\n")),
            RouteEntry(path="/fence/db", authority="b", target=DirectResponse(503)),
            RouteEntry(prefix="/", target=ToCluster("web-primary", retry=retry)),
        ],
    )
    listeners = [
        tcp_proxy_listener(
            "db-primary-listener",
            address="0.0.0.0",
            port=16379,
            cluster="db-primary",
            stat_prefix="db",
        ),
        tcp_proxy_listener(
            "db-read-listener",
            address="127.0.0.1",
            port=16380,
            cluster="db-read",
            stat_prefix="db-read",
            idle_timeout=timedelta(0),
            access_log=True,
        ),
        http_listener(
            "web-inline", address="0.0.0.0", port=18080, stat_prefix="web", route_config=routes
        ),
        http_listener(
            "web-rds",
            address="0.0.0.0",
            port=18081,
            stat_prefix="web-rds",
            rds_route_config_name="web-routes",
            tracing=opentelemetry_tracing("otel", service_name="envoy-web"),
            access_log=True,
        ),
    ]
    envoy_validate(bootstrap_with(clusters, listeners), tmp_path)


def test_envoy_notices_a_broken_config(tmp_path: Path) -> None:
    """The harness can fail: a route to a cluster that does not exist is refused."""
    routes = route_configuration("r", [RouteEntry(prefix="/", target=ToCluster("nowhere"))])
    listener = http_listener(
        "l", address="0.0.0.0", port=18080, stat_prefix="l", route_config=routes
    )
    assert "nowhere" in envoy_rejects(bootstrap_with([], [listener]), tmp_path)


def mesh_state() -> MeshState:
    members = (
        Member(name="a", address="127.0.0.1", port=6379),
        Member(name="b", address="127.0.0.2", port=6379),
        Member(name="c", address="db-c.example", port=6379),
    )
    specs = [
        ServiceSpec(
            name="cache",
            protocol=ServiceProtocol.REDIS,
            listen_port=16379,
            read_port=16380,
            members=members,
        ),
        ServiceSpec(
            name="pg", protocol=ServiceProtocol.POSTGRES, listen_port=15432, members=members[:2]
        ),
        ServiceSpec(
            name="raw",
            protocol=ServiceProtocol.TCP,
            listen_port=17000,
            read_port=17001,
            members=members[:1],
        ),
        ServiceSpec(
            name="web",
            protocol=ServiceProtocol.HTTP,
            listen_port=18080,
            read_port=18081,
            members=members,
        ),
    ]
    primaries = {"cache": "b", "pg": None, "raw": "a", "web": "c"}
    return MeshState(
        services={
            s.name: ServiceState(spec=s, primary=primaries[s.name], epoch=5 + i)
            for i, s in enumerate(specs)
        }
    )


@pytest.mark.parametrize("strategy", list(PrimaryStrategy))
def test_rendered_state_is_accepted(tmp_path: Path, strategy: PrimaryStrategy) -> None:
    options = RenderOptions(primary_strategy=strategy, fence_port=19901, access_log=True)
    resources = render(mesh_state(), options, held=frozenset({"web"}))  # web's routes with a consistent point's hold
    assignments = resources[CLUSTER_LOAD_ASSIGNMENT]
    clusters = [as_static(c, assignments.get(name)) for name, c in resources[CLUSTER].items()]  # type: ignore[arg-type]
    routes: dict[str, RouteConfiguration] = resources[ROUTE_CONFIGURATION]  # type: ignore[assignment]
    listeners = [inline_routes(listener, routes) for listener in resources[LISTENER].values()]  # type: ignore[arg-type]
    # The EDS forms themselves too (validated as given, endpoints arriving later).
    eds_forms = [Cluster.parse(bytes(c)) for c in resources[CLUSTER].values()]
    assert any(c.type == ClusterDiscoveryType.STRICT_DNS for c in eds_forms)  # member "c"
    assert any(c.type == ClusterDiscoveryType.EDS for c in eds_forms)
    for c in eds_forms:
        c.name += "-eds"
    envoy_validate(bootstrap_with(clusters + eds_forms, listeners), tmp_path)


def test_to_envoy_dict_keeps_proto_names() -> None:
    cluster = to_envoy_dict(eds_cluster("x"))
    assert cluster["common_lb_config"]["close_connections_on_host_set_change"] is True
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {}  # present, value 0
    assert cluster["eds_cluster_config"]["eds_config"] == {"ads": {}, "resource_api_version": "V3"}
