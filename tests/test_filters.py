"""Unit tests for repstage_mesh.filters: the messages carry what Envoy needs, bad input is refused."""

from __future__ import annotations

import typing
from collections.abc import Callable
from datetime import timedelta

import betterproto2
import pytest
import yaml
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import ApiVersion, RoutingPriority
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)
from envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3 import TcpProxy
from envoy_data_plane.google.protobuf import Any

from repstage_mesh.filters import (
    CLUSTER,
    DEFAULT_RETRY_ON,
    HTTP_CONNECTION_MANAGER,
    TCP_PROXY,
    XDS_CLUSTER,
    DirectResponse,
    HealthStatus,
    RouteEntry,
    ToCluster,
    XdsConnection,
    assembled_route_configuration,
    build_bootstrap,
    dns_cluster,
    eds_cluster,
    encoded_routes,
    high_circuit_breakers,
    http_connection_manager,
    http_health_check,
    http_listener,
    is_ip_address,
    lb_endpoint,
    load_assignment,
    opentelemetry_tracing,
    pack,
    retry_policy,
    route_configuration,
    tcp_health_check,
    tcp_proxy_listener,
    to_envoy_dict,
    type_url_of,
)


def roundtrip(message: betterproto2.Message) -> typing.Any:
    """What Envoy receives: the wire bytes, parsed back (typed loosely: tests read deep fields)."""
    return type(message).parse(bytes(message))


# --- clusters ------------------------------------------------------------------------------


def test_eds_cluster_is_fed_over_ads_and_fails_closed() -> None:
    cluster = roundtrip(eds_cluster("db-primary", connect_timeout=timedelta(milliseconds=750)))
    assert cluster.name == "db-primary"
    assert cluster.type == ClusterDiscoveryType.EDS
    assert cluster.eds_cluster_config.eds_config.ads is not None
    assert cluster.eds_cluster_config.eds_config.resource_api_version == ApiVersion.V3
    assert cluster.connect_timeout == timedelta(milliseconds=750)
    # The Percent must be on the wire even though its value is the proto default 0.
    assert cluster.common_lb_config.healthy_panic_threshold is not None
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0.0
    assert cluster.common_lb_config.close_connections_on_host_set_change is True
    # Present and zero: health-only EDS changes apply at once, not after Envoy's 1 s merge.
    assert cluster.common_lb_config.update_merge_window == timedelta(0)
    assert cluster.ignore_health_on_host_removal is True
    assert cluster.close_connections_on_host_health_failure is False
    assert cluster.health_checks == []


def test_eds_cluster_options() -> None:
    cluster = roundtrip(
        eds_cluster(
            "x",
            healthy_panic_threshold=50.0,
            close_connections_on_host_health_failure=True,
            health_checks=[tcp_health_check(interval=timedelta(milliseconds=300))],
        )
    )
    assert cluster.common_lb_config.healthy_panic_threshold.value == 50.0
    assert cluster.close_connections_on_host_health_failure is True
    (check,) = cluster.health_checks
    assert check.tcp_health_check is not None
    assert check.interval == timedelta(milliseconds=300)
    # Without this a cluster that never had traffic is checked only every 60 s.
    assert check.no_traffic_interval == timedelta(milliseconds=300)
    assert check.no_traffic_healthy_interval == timedelta(milliseconds=300)


def test_circuit_breakers_are_high_for_both_priorities() -> None:
    breakers = roundtrip(eds_cluster("x")).circuit_breakers
    assert {t.priority for t in breakers.thresholds} == {
        RoutingPriority.DEFAULT,
        RoutingPriority.HIGH,
    }
    for t in breakers.thresholds:
        assert (
            min(t.max_connections, t.max_pending_requests, t.max_requests, t.max_retries) >= 100_000
        )
    assert high_circuit_breakers(5).thresholds[0].max_connections == 5


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: eds_cluster(""), "name"),
        (lambda: eds_cluster("x", connect_timeout=timedelta(0)), "connect_timeout"),
        (lambda: eds_cluster("x", healthy_panic_threshold=101.0), "healthy_panic_threshold"),
        (lambda: eds_cluster("x", update_merge_window=timedelta(-1)), "update_merge_window"),
        (lambda: high_circuit_breakers(0), "limit"),
        (lambda: tcp_health_check(interval=timedelta(0)), "interval"),
        (lambda: tcp_health_check(unhealthy_threshold=0), "unhealthy_threshold"),
        (lambda: http_health_check("health"), "path"),
        (lambda: http_health_check("/h", expected_statuses=()), "expected_statuses"),
        (lambda: http_health_check("/h", expected_statuses=(99,)), "expected_statuses"),
        (lambda: lb_endpoint("10.0.0.1", 0), "port"),
        (lambda: lb_endpoint("", 80), "address"),
        (lambda: lb_endpoint("10.0.0.1", 80, health_check_port=70000), "health_check_port"),
        (lambda: load_assignment("", []), "cluster_name"),
        (lambda: retry_policy(num_retries=-1), "num_retries"),
        (lambda: retry_policy(retry_on=" "), "retry_on"),
        (lambda: retry_policy(retriable_status_codes=(1000,)), "retriable_status_codes"),
        (lambda: retry_policy(per_try_timeout=timedelta(0)), "per_try_timeout"),
        (lambda: RouteEntry(target=DirectResponse(200)), "path/prefix"),
        (lambda: RouteEntry(path="/a", prefix="/", target=DirectResponse(200)), "path/prefix"),
        (lambda: RouteEntry(path="a", target=DirectResponse(200)), "path/prefix"),
        (lambda: RouteEntry(prefix="/", target=DirectResponse(42)), "status"),
        (lambda: RouteEntry(prefix="/", target=ToCluster("")), "cluster"),
        (lambda: route_configuration("r", [], domains=()), "domains"),
        (lambda: http_connection_manager("web"), "route_config/rds_route_config_name"),
        (lambda: http_connection_manager("", rds_route_config_name="r"), "stat_prefix"),
        (
            lambda: tcp_proxy_listener("l", address="0.0.0.0", port=1, cluster="", stat_prefix="s"),
            "cluster",
        ),
        (
            lambda: tcp_proxy_listener(
                "l",
                address="0.0.0.0",
                port=1,
                cluster="c",
                stat_prefix="s",
                idle_timeout=timedelta(-1),
            ),
            "idle_timeout",
        ),
        (lambda: opentelemetry_tracing(""), "collector_cluster"),
        (lambda: opentelemetry_tracing("otel", sampling_percent=150), "sampling_percent"),
        (lambda: XdsConnection(retry_base_interval=timedelta(0)), "retry_base_interval"),
        (
            lambda: XdsConnection(retry_base_interval=timedelta(seconds=3)),
            "retry_max_interval",
        ),
        (lambda: build_bootstrap("n", [], 9901), "xds"),
        (lambda: build_bootstrap("n", [("10.0.0.1", 1), ("10.0.0.1", 1)], 9901), "xds"),
        (lambda: build_bootstrap("", [("10.0.0.1", 1)], 9901), "node_id"),
        (lambda: build_bootstrap("n", [("10.0.0.1", 1)], 0), "port"),
        (
            lambda: build_bootstrap(
                "n", [("10.0.0.1", 1)], 9901, static_clusters=[eds_cluster(XDS_CLUSTER)]
            ),
            "static_clusters",
        ),
    ],
)
def test_bad_input_names_the_field(call: Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        call()


# --- endpoints ------------------------------------------------------------------------------


def test_load_assignment_may_be_empty() -> None:
    assignment = roundtrip(load_assignment("db-primary", []))
    assert assignment.cluster_name == "db-primary"
    assert assignment.endpoints == []


def test_lb_endpoint_with_health_check_override_and_metadata() -> None:
    endpoint = lb_endpoint(
        "10.0.0.7",
        6379,
        health_status=HealthStatus.UNHEALTHY,
        health_check_address="127.0.0.1",
        health_check_port=19000,
        health_check_hostname="b",
        metadata={"repstage": {"member": "b", "weight": 2}},
    )
    assignment = roundtrip(load_assignment("c", [endpoint]))
    (got,) = assignment.endpoints[0].lb_endpoints
    assert got.health_status == HealthStatus.UNHEALTHY
    assert got.endpoint.address.socket_address.address == "10.0.0.7"
    assert got.endpoint.address.socket_address.port_value == 6379
    hc = got.endpoint.health_check_config
    assert hc.address.socket_address.address == "127.0.0.1"
    assert hc.address.socket_address.port_value == 19000
    assert hc.port_value == 19000
    assert hc.hostname == "b"
    assert to_envoy_dict(got)["metadata"] == {
        "filter_metadata": {"repstage": {"member": "b", "weight": 2.0}}
    }


def test_lb_endpoint_without_overrides_has_no_health_check_config() -> None:
    got = roundtrip(lb_endpoint("10.0.0.7", 6379))
    assert got.endpoint.health_check_config is None
    assert got.health_status == HealthStatus.HEALTHY
    assert got.metadata is None


def test_dns_cluster_carries_endpoints_inline() -> None:
    assignment = load_assignment("db-read", [lb_endpoint("db.example", 5432)])
    cluster = roundtrip(dns_cluster(assignment, connect_timeout=timedelta(seconds=2)))
    assert cluster.type == ClusterDiscoveryType.STRICT_DNS
    assert cluster.eds_cluster_config is None
    assert cluster.load_assignment == assignment
    assert cluster.connect_timeout == timedelta(seconds=2)
    assert cluster.common_lb_config.healthy_panic_threshold is not None
    assert is_ip_address("::1") and is_ip_address("10.1.2.3") and not is_ip_address("db.example")


# --- listeners, routes -------------------------------------------------------------------------


def test_tcp_proxy_listener() -> None:
    listener = roundtrip(
        tcp_proxy_listener(
            "db-primary-listener",
            address="0.0.0.0",
            port=16379,
            cluster="db-primary",
            stat_prefix="db-primary",
            idle_timeout=timedelta(minutes=5),
            access_log=True,
        )
    )
    assert listener.address.socket_address.port_value == 16379
    (chain,) = listener.filter_chains
    (filter_,) = chain.filters
    assert filter_.name == TCP_PROXY
    assert filter_.typed_config.type_url == type_url_of(TcpProxy)
    proxy = TcpProxy.parse(filter_.typed_config.value)
    assert (proxy.cluster, proxy.stat_prefix) == ("db-primary", "db-primary")
    assert proxy.idle_timeout == timedelta(minutes=5)
    assert len(proxy.access_log) == 1


def unpack_manager(listener: Listener) -> typing.Any:
    (filter_,) = listener.filter_chains[0].filters
    assert filter_.name == HTTP_CONNECTION_MANAGER
    assert filter_.typed_config is not None
    return HttpConnectionManager.parse(filter_.typed_config.value)


def test_http_listener_over_rds_with_router_and_tracing() -> None:
    listener = http_listener(
        "web-primary-listener",
        address="0.0.0.0",
        port=18080,
        stat_prefix="web-primary",
        rds_route_config_name="web-primary-routes",
        tracing=opentelemetry_tracing("otel-collector", service_name="envoy-web"),
    )
    manager = unpack_manager(roundtrip(listener))
    assert manager.rds.route_config_name == "web-primary-routes"
    assert manager.rds.config_source.ads is not None
    assert manager.route_config is None
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
    assert manager.tracing.provider.name == "envoy.tracers.opentelemetry"
    otel = roundtrip(OpenTelemetryConfig.parse(manager.tracing.provider.typed_config.value))
    assert otel.grpc_service.envoy_grpc.cluster_name == "otel-collector"
    assert otel.service_name == "envoy-web"


def test_route_configuration_keeps_order_and_targets() -> None:
    retry = retry_policy(
        num_retries=2, per_try_timeout=timedelta(seconds=1), retriable_status_codes=(503, 502)
    )
    routes = roundtrip(
        route_configuration(
            "r",
            [
                RouteEntry(path="/fence/db/a", target=DirectResponse(200, "primary\n")),
                RouteEntry(path="/fence/db", authority="a", target=DirectResponse(503)),
                RouteEntry(
                    prefix="/", target=ToCluster("db-primary", retry=retry, timeout=timedelta(0))
                ),
            ],
            virtual_host="db",
        )
    )
    (vhost,) = routes.virtual_hosts
    assert (vhost.name, vhost.domains) == ("db", ["*"])
    first, second, third = vhost.routes
    assert first.match.path == "/fence/db/a"
    assert first.direct_response.status == 200
    assert first.direct_response.body.inline_string == "primary\n"
    assert second.match.headers[0].name == ":authority"
    assert second.match.headers[0].string_match.exact == "a"
    assert second.direct_response.status == 503
    assert third.match.prefix == "/"
    assert third.route.cluster == "db-primary"
    assert third.route.timeout == timedelta(0)
    got = third.route.retry_policy
    assert got.retry_on == DEFAULT_RETRY_ON
    assert got.num_retries == 2
    assert got.per_try_timeout == timedelta(seconds=1)
    assert got.retriable_status_codes == [502, 503]


def test_assembled_route_configuration_encodes_as_the_whole_one() -> None:
    """Routes encoded in pieces and joined give the bytes of the configuration built in one
    piece (Envoy cannot tell them apart), in the order of the pieces."""
    first = [
        RouteEntry(path="/fence/db/a", target=DirectResponse(200, "primary\n")),
        RouteEntry(path="/fence/db", authority="a", target=DirectResponse(200, "primary\n")),
    ]
    second = [RouteEntry(path="/fence/db/b", target=DirectResponse(503, "not primary\n"))]
    last = [RouteEntry(prefix="/", target=DirectResponse(404))]
    whole = route_configuration("r", [*first, *second, *last], virtual_host="fence")
    assembled = assembled_route_configuration(
        "r", [encoded_routes(first), encoded_routes(second), encoded_routes(last)], virtual_host="fence"
    )
    assert bytes(assembled) == bytes(whole)
    (vhost,) = RouteConfiguration.parse(bytes(assembled)).virtual_hosts
    assert [r.match.path or r.match.prefix for r in vhost.routes] == ["/fence/db/a", "/fence/db", "/fence/db/b", "/"]
    assert encoded_routes([]) == b""


def test_http_connection_manager_inline_routes() -> None:
    routes = route_configuration("r", [RouteEntry(prefix="/", target=ToCluster("c"))])
    manager = roundtrip(http_connection_manager("s", route_config=routes))
    assert manager.rds is None
    assert manager.route_config.name == "r"


def test_http_health_check_statuses() -> None:
    check = roundtrip(http_health_check("/fence/db", expected_statuses=(204, 200, 200)))
    assert check.http_health_check.path == "/fence/db"
    assert [(r.start, r.end) for r in check.http_health_check.expected_statuses] == [
        (200, 201),
        (204, 205),
    ]
    assert check.unhealthy_threshold == 1


def test_pack_matches_any_pack() -> None:
    cluster = eds_cluster("x")
    assert pack(cluster) == Any.pack(cluster)
    assert pack(cluster).type_url == CLUSTER


# --- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_sotw_with_several_control_plane_nodes() -> None:
    xds = [("10.0.0.1", 18000), ("10.0.0.2", 18000), ("10.0.0.3", 18001)]
    boot = build_bootstrap("node-a", xds, 9901)
    assert boot["node"] == {"id": "node-a", "cluster": "repstage"}
    assert boot["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9901,
    }
    ads = boot["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "GRPC"
    assert ads["transport_api_version"] == "V3"
    assert ads["set_node_on_first_message_only"] is True
    grpc = ads["grpc_services"][0]["envoy_grpc"]
    assert grpc["cluster_name"] == XDS_CLUSTER
    assert grpc["retry_policy"]["retry_back_off"] == {
        "base_interval": "0.100s",
        "max_interval": "2s",
    }
    for key in ("cds_config", "lds_config"):
        assert boot["dynamic_resources"][key] == {"ads": {}, "resource_api_version": "V3"}
    (cluster,) = boot["static_resources"]["clusters"]
    assert cluster["name"] == XDS_CLUSTER
    assert cluster["type"] == "STATIC"
    hosts = [
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert hosts == xds
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert (
        options["@type"]
        == "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    )
    assert options["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"] == {
        "interval": "0.400s",
        "timeout": "0.200s",
    }
    assert cluster["upstream_connection_options"]["tcp_keepalive"]["keepalive_probes"] == 3
    assert cluster["outlier_detection"]["consecutive_local_origin_failure"] == 1
    assert cluster["health_checks"][0]["tcp_health_check"] == {}
    assert "layered_runtime" not in boot
    assert yaml.safe_load(yaml.safe_dump(boot)) == boot


def test_bootstrap_delta_dns_runtime_and_static_resources() -> None:
    collector = dns_cluster(load_assignment("otel", [lb_endpoint("otel.example", 4317)]))
    boot = build_bootstrap(
        "node-b",
        [("cp-0.cp.example", 18000), ("10.0.0.2", 18000)],
        9902,
        delta=True,
        node_cluster="edge",
        connection=XdsConnection(health_check_interval=None, outlier_detection=False),
        static_clusters=[collector],
        runtime={"re2": {"max_program_size": {"error_level": 1000}}},
    )
    assert boot["node"]["cluster"] == "edge"
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    xds, otel = boot["static_resources"]["clusters"]
    assert xds["type"] == "STRICT_DNS"
    assert xds["dns_lookup_family"] == "V4_PREFERRED"
    assert "health_checks" not in xds and "outlier_detection" not in xds
    assert otel["name"] == "otel"
    assert boot["layered_runtime"]["layers"][0]["static_layer"] == {
        "re2": {"max_program_size": {"error_level": 1000.0}}
    }


def test_messages_are_valid_for_their_types() -> None:
    assert type_url_of(Cluster).endswith("envoy.config.cluster.v3.Cluster")
    assert type_url_of(ClusterLoadAssignment).endswith("ClusterLoadAssignment")
