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
    reuse_connection: bool = False,
    unhealthy_interval: timedelta | None = None,
) -> HealthCheck:
    _check_timing(interval, timeout, unhealthy_threshold, healthy_threshold)
    if unhealthy_interval is not None and unhealthy_interval < interval:
        raise ValueError(f"unhealthy_interval: must be at least interval ({interval}), got {unhealthy_interval}")
    return HealthCheck(
        timeout=timeout,
        interval=interval,
        # Not the unhealthy interval before traffic: a host whose first check fails (at an Envoy's
        # start its checks can run before the listener they go to exists) would wait for it.
        no_traffic_interval=interval,
        no_traffic_healthy_interval=interval,
        unhealthy_interval=unhealthy_interval or interval,
        unhealthy_edge_interval=interval,
        healthy_edge_interval=interval,
        unhealthy_threshold=unhealthy_threshold,
        healthy_threshold=healthy_threshold,
        reuse_connection=reuse_connection,
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
    reuse_connection: bool = False,
    unhealthy_interval: timedelta | None = None,
) -> HealthCheck:
    """An HTTP/1.1 GET of `path`; any status outside `expected_statuses` fails the host.

    By default each check opens a new connection (a check must notice a peer that accepts no
    new one) and a failed host is checked as often as a healthy one. `reuse_connection` keeps
    one connection per host (for a peer that cannot fail that way, e.g. Envoy's own loopback
    listener); `unhealthy_interval` checks a failed host less often once the cluster has carried
    traffic (the first check after a failure still comes one `interval` later,
    `unhealthy_edge_interval`; before any traffic every host is checked every `interval`)."""
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
    return _health_check(interval, timeout, unhealthy_threshold, healthy_threshold, http=http,
                         reuse_connection=reuse_connection, unhealthy_interval=unhealthy_interval)
