"""Builders for how one service's traffic is shaped in Envoy (listeners, clusters, endpoints, bootstrap).

Every builder returns an envoy-data-plane (betterproto2) message, except `build_bootstrap`,
which returns the dict Envoy reads from its bootstrap file. Nothing here knows RepStage's
domain: callers pass names, addresses and ports.
"""

from .access_logs import stdout_access_log
from .bootstrap import (
    XDS_CLUSTER,
    XDS_SERVER_GRPC_OPTIONS,
    XdsConnection,
    build_bootstrap,
    xds_cluster,
)
from .clusters import dns_cluster, eds_cluster, high_circuit_breakers, tcp_keepalive
from .endpoints import (
    HealthStatus,
    MetadataValue,
    is_ip_address,
    lb_endpoint,
    load_assignment,
    socket_address,
)
from .health_checks import http_health_check, tcp_health_check
from .http import (
    DEFAULT_RETRIABLE_STATUS_CODES,
    DEFAULT_RETRY_ON,
    DirectResponse,
    RouteEntry,
    ToCluster,
    assembled_route_configuration,
    encoded_routes,
    http_connection_manager,
    retry_policy,
    route_configuration,
    router_filter,
)
from .listeners import HTTP_CONNECTION_MANAGER, TCP_PROXY, http_listener, tcp_proxy_listener
from .serialize import to_envoy_dict
from .sources import ads_config_source
from .tracing import collector_cluster, opentelemetry_tracing
from .type_urls import (
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    LISTENER,
    RESOURCE_ORDER,
    ROUTE_CONFIGURATION,
    pack,
    type_url_of,
)

__all__ = [
    "CLUSTER",
    "CLUSTER_LOAD_ASSIGNMENT",
    "DEFAULT_RETRIABLE_STATUS_CODES",
    "DEFAULT_RETRY_ON",
    "HTTP_CONNECTION_MANAGER",
    "LISTENER",
    "RESOURCE_ORDER",
    "ROUTE_CONFIGURATION",
    "TCP_PROXY",
    "XDS_CLUSTER",
    "XDS_SERVER_GRPC_OPTIONS",
    "DirectResponse",
    "HealthStatus",
    "MetadataValue",
    "RouteEntry",
    "ToCluster",
    "XdsConnection",
    "ads_config_source",
    "assembled_route_configuration",
    "build_bootstrap",
    "collector_cluster",
    "dns_cluster",
    "eds_cluster",
    "encoded_routes",
    "high_circuit_breakers",
    "http_connection_manager",
    "http_health_check",
    "http_listener",
    "is_ip_address",
    "lb_endpoint",
    "load_assignment",
    "opentelemetry_tracing",
    "pack",
    "retry_policy",
    "route_configuration",
    "router_filter",
    "socket_address",
    "stdout_access_log",
    "tcp_health_check",
    "tcp_keepalive",
    "tcp_proxy_listener",
    "to_envoy_dict",
    "type_url_of",
    "xds_cluster",
]
