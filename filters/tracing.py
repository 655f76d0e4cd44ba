"""Tracing providers for http_connection_manager (OpenTelemetry over OTLP/gRPC)."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import GrpcService, GrpcServiceEnvoyGrpc
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManagerTracing,
)
from envoy_data_plane.envoy.type.v3 import Percent

from .type_urls import pack


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
