"""Clusters: EDS clusters fed over ADS, with fail-closed load balancing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCommonLbConfig,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterEdsClusterConfig,
    ClusterLbPolicy,
    UpstreamConnectionOptions,
)
from envoy_data_plane.envoy.config.core.v3 import HealthCheck, RoutingPriority, TcpKeepalive
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.type.v3 import Percent

from .sources import ads_config_source

DEFAULT_CONNECT_TIMEOUT = timedelta(seconds=1)
# Envoy's defaults (1024 connections, 3 concurrent retries) are sized for request traffic; a
# database proxy holds many long-lived connections, and a refused connection at the limit would
# look like an outage. The limits stay finite so a runaway client cannot exhaust Envoy.
HIGH_LIMIT = 1_000_000


def high_circuit_breakers(limit: int = HIGH_LIMIT) -> CircuitBreakers:
    """Circuit breakers with every limit at `limit`, for both routing priorities."""
    if limit < 1:
        raise ValueError(f"limit: must be at least 1, got {limit}")
    return CircuitBreakers(
        thresholds=[
            CircuitBreakersThresholds(
                priority=priority,
                max_connections=limit,
                max_pending_requests=limit,
                max_requests=limit,
                max_retries=limit,
            )
            for priority in (RoutingPriority.DEFAULT, RoutingPriority.HIGH)
        ]
    )


def tcp_keepalive(
    *,
    probes: int = 3,
    time: timedelta = timedelta(seconds=10),
    interval: timedelta = timedelta(seconds=2),
) -> TcpKeepalive:
    """Kernel TCP keepalive settings (whole seconds, as the socket options take them)."""
    for field, value in (("time", time), ("interval", interval)):
        if value < timedelta(seconds=1) or value.microseconds:
            raise ValueError(f"{field}: must be a whole number of seconds >= 1, got {value}")
    if probes < 1:
        raise ValueError(f"probes: must be at least 1, got {probes}")
    return TcpKeepalive(
        keepalive_probes=probes,
        keepalive_time=int(time.total_seconds()),
        keepalive_interval=int(interval.total_seconds()),
    )


def eds_cluster(
    name: str,
    *,
    connect_timeout: timedelta = DEFAULT_CONNECT_TIMEOUT,
    healthy_panic_threshold: float = 0.0,
    close_connections_on_host_set_change: bool = True,
    ignore_health_on_host_removal: bool = True,
    close_connections_on_host_health_failure: bool = False,
    health_checks: Sequence[HealthCheck] = (),
    circuit_breakers: CircuitBreakers | None = None,
    upstream_tcp_keepalive: TcpKeepalive | None = None,
    update_merge_window: timedelta = timedelta(0),
) -> Cluster:
    """A round-robin cluster whose endpoints arrive over ADS (EDS resource named `name`).

    - `healthy_panic_threshold` 0.0: Envoy's default (50 %) sends traffic to *all* hosts once
      fewer than half are healthy; at 0 a cluster with no healthy host routes nowhere, so a
      client is refused at once instead of reaching a demoted primary (fail closed).
    - `close_connections_on_host_set_change`: drop pooled connections when the host set
      changes (works for HTTP pools; not for an open tcp_proxy connection, see FACTS).
    - `ignore_health_on_host_removal`: a host removed from EDS leaves at once even if it still
      passes active health checks (Envoy #11527).
    - `close_connections_on_host_health_failure`: close tcp_proxy connections to a host as soon
      as an active health check (or outlier detection) marks it unhealthy; an EDS
      `health_status` alone does not trigger it.
    - `update_merge_window` 0: Envoy's default (1 s) holds back EDS updates that only change
      health status or metadata (no host added or removed) for up to a second; measured here,
      a new primary marked HEALTHY in EDS became routable only after 1.18 s with the default.
    """
    _check_eds_options(name, connect_timeout, healthy_panic_threshold, update_merge_window)
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.EDS,
        eds_cluster_config=ClusterEdsClusterConfig(eds_config=ads_config_source()),
        connect_timeout=connect_timeout,
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        common_lb_config=ClusterCommonLbConfig(
            healthy_panic_threshold=Percent(value=healthy_panic_threshold),
            close_connections_on_host_set_change=close_connections_on_host_set_change,
            update_merge_window=update_merge_window,
        ),
        ignore_health_on_host_removal=ignore_health_on_host_removal,
        close_connections_on_host_health_failure=close_connections_on_host_health_failure,
        health_checks=list(health_checks),
        circuit_breakers=circuit_breakers
        if circuit_breakers is not None
        else high_circuit_breakers(),
        upstream_connection_options=(
            UpstreamConnectionOptions(tcp_keepalive=upstream_tcp_keepalive)
            if upstream_tcp_keepalive is not None
            else None
        ),
    )


def _check_eds_options(
    name: str,
    connect_timeout: timedelta,
    healthy_panic_threshold: float,
    update_merge_window: timedelta,
) -> None:
    if not name:
        raise ValueError("name: must not be empty")
    if connect_timeout <= timedelta(0):
        raise ValueError(f"connect_timeout: must be positive, got {connect_timeout}")
    if update_merge_window < timedelta(0):
        raise ValueError(f"update_merge_window: must not be negative, got {update_merge_window}")
    if not 0.0 <= healthy_panic_threshold <= 100.0:
        raise ValueError(
            f"healthy_panic_threshold: must be a percentage in [0, 100], got {healthy_panic_threshold}"
        )


def dns_cluster(assignment: ClusterLoadAssignment, **options: Any) -> Cluster:
    """`eds_cluster(assignment.cluster_name, **options)`, but STRICT_DNS with the endpoints inline.

    For hosts given by DNS name: Envoy refuses EDS endpoints that are not IP addresses
    ("malformed IP address"), so such a cluster carries its endpoints itself and is re-sent over
    CDS whenever they change.
    """
    cluster = eds_cluster(assignment.cluster_name, **options)
    cluster.type = ClusterDiscoveryType.STRICT_DNS
    cluster.eds_cluster_config = None
    cluster.dns_lookup_family = ClusterDnsLookupFamily.V4_PREFERRED
    cluster.load_assignment = assignment
    return cluster
