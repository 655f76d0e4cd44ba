"""Tracing providers for http_connection_manager (OpenTelemetry over OTLP/gRPC), and the
cluster of the collector they export to (sent over CDS: no bootstrap change needed)."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.core.v3 import (
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Http2ProtocolOptions,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManagerTracing,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.v3 import Percent

from .endpoints import is_ip_address, lb_endpoint, load_assignment
from .type_urls import pack

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def opentelemetry_tracing(
    collector_cluster: str,
    *,
    service_name: str = "envoy",
    sampling_percent: float = 100.0,
    export_timeout: timedelta = timedelta(seconds=1),
) -> HttpConnectionManagerTracing:
    """Send spans over OTLP/gRPC to `collector_cluster` (which must exist and speak HTTP/2).

    Incoming W3C `traceparent` headers are honoured; `sampling_percent` applies to requests
    that arrive without a sampling decision.
    """
    if not collector_cluster:
        raise ValueError("collector_cluster: must not be empty")
    if not 0.0 <= sampling_percent <= 100.0:
        raise ValueError(f"sampling_percent: must be in [0, 100], got {sampling_percent}")
    config = OpenTelemetryConfig(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=collector_cluster), timeout=export_timeout
        ),
        service_name=service_name,
    )
    return HttpConnectionManagerTracing(
        random_sampling=Percent(value=sampling_percent),
        provider=TracingHttp(name="envoy.tracers.opentelemetry", typed_config=pack(config)),
    )


def collector_cluster(
    name: str, host: str, port: int, *, connect_timeout: timedelta = timedelta(seconds=1)
) -> Cluster:
    """The cluster of an OTLP/gRPC collector (plaintext HTTP/2) for `opentelemetry_tracing`:
    STATIC for an IP address, STRICT_DNS for a DNS name; its endpoint inline, so it can be sent
    over CDS like any other cluster."""
    if not name:
        raise ValueError("name: must not be empty")
    if not host:
        raise ValueError("host: must not be empty")
    if not 1 <= port <= 65535:
        raise ValueError(f"port: must be in [1, 65535], got {port}")
    ip = is_ip_address(host)
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if ip else ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.AUTO if ip else ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=connect_timeout,
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=load_assignment(name, [lb_endpoint(host, port)]),
        typed_extension_protocol_options={
            HTTP_PROTOCOL_OPTIONS: pack(
                HttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                        http2_protocol_options=Http2ProtocolOptions()
                    )
                )
            )
        },
    )
