"""Active health checks (TCP connect and HTTP GET) for clusters.

Every interval Envoy knows (`interval`, `no_traffic_interval`, `no_traffic_healthy_interval`,
`unhealthy_interval`, the edge intervals) is set to the same value: otherwise a cluster that has
never carried traffic is checked only every 60 s (Envoy's `no_traffic_interval` default), which
would make a check-driven failover depend on whether a client happened to connect before.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import (
    HealthCheck,
    HealthCheckHttpHealthCheck,
    HealthCheckTcpHealthCheck,
)
from envoy_data_plane.envoy.type.v3 import Int64Range

DEFAULT_INTERVAL = timedelta(seconds=1)
DEFAULT_TIMEOUT = timedelta(milliseconds=500)


def _check_timing(interval: timedelta, timeout: timedelta, unhealthy: int, healthy: int) -> None:
    if interval <= timedelta(0):
        raise ValueError(f"interval: must be positive, got {interval}")
    if timeout <= timedelta(0):
        raise ValueError(f"timeout: must be positive, got {timeout}")
    if unhealthy < 1:
        raise ValueError(f"unhealthy_threshold: must be at least 1, got {unhealthy}")
    if healthy < 1:
        raise ValueError(f"healthy_threshold: must be at least 1, got {healthy}")


def _health_check(
    interval: timedelta,
    timeout: timedelta,
    unhealthy_threshold: int,
    healthy_threshold: int,
    *,
    tcp: HealthCheckTcpHealthCheck | None = None,
    http: HealthCheckHttpHealthCheck | None = None,
) -> HealthCheck:
    _check_timing(interval, timeout, unhealthy_threshold, healthy_threshold)
    return HealthCheck(
        timeout=timeout,
        interval=interval,
        no_traffic_interval=interval,
        no_traffic_healthy_interval=interval,
        unhealthy_interval=interval,
        unhealthy_edge_interval=interval,
        healthy_edge_interval=interval,
        unhealthy_threshold=unhealthy_threshold,
        healthy_threshold=healthy_threshold,
        # A new connection per check: a check must notice a peer that stopped answering.
        reuse_connection=False,
        tcp_health_check=tcp,
        http_health_check=http,
    )


def tcp_health_check(
    *,
    interval: timedelta = DEFAULT_INTERVAL,
    timeout: timedelta = DEFAULT_TIMEOUT,
    unhealthy_threshold: int = 2,
    healthy_threshold: int = 1,
) -> HealthCheck:
    """A connect-only check: the host is healthy while it accepts TCP connections."""
    return _health_check(
        interval, timeout, unhealthy_threshold, healthy_threshold, tcp=HealthCheckTcpHealthCheck()
    )


def http_health_check(
    path: str,
    *,
    host: str | None = None,
    expected_statuses: Sequence[int] = (200,),
    interval: timedelta = DEFAULT_INTERVAL,
    timeout: timedelta = DEFAULT_TIMEOUT,
    unhealthy_threshold: int = 1,
    healthy_threshold: int = 1,
) -> HealthCheck:
    """An HTTP/1.1 GET of `path`; any status outside `expected_statuses` fails the host."""
    if not path.startswith("/"):
        raise ValueError(f"path: must start with '/', got {path!r}")
    if not expected_statuses:
        raise ValueError("expected_statuses: must name at least one status")
    for status in expected_statuses:
        if not 100 <= status <= 599:
            raise ValueError(f"expected_statuses: {status} is not an HTTP status")
    http = HealthCheckHttpHealthCheck(
        path=path,
        host=host or "",
        expected_statuses=[Int64Range(start=s, end=s + 1) for s in sorted(set(expected_statuses))],
    )
    return _health_check(interval, timeout, unhealthy_threshold, healthy_threshold, http=http)
