"""Listeners: a TCP proxy to one cluster, or an HTTP connection manager."""

from __future__ import annotations

from datetime import timedelta

from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManagerTracing,
)
from envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3 import TcpProxy

from .access_logs import stdout_access_log
from .endpoints import socket_address
from .http import http_connection_manager
from .type_urls import pack

TCP_PROXY = "envoy.filters.network.tcp_proxy"
HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"


def _listener(name: str, address: str, port: int, filter_: Filter) -> Listener:
    if not name:
        raise ValueError("name: must not be empty")
    return Listener(
        name=name,
        address=socket_address(address, port),
        filter_chains=[FilterChain(filters=[filter_])],
    )


def tcp_proxy_listener(
    name: str,
    *,
    address: str,
    port: int,
    cluster: str,
    stat_prefix: str,
    idle_timeout: timedelta | None = None,
    access_log: bool = False,
) -> Listener:
    """Proxy every connection on `address:port` to `cluster`.

    `idle_timeout` None keeps Envoy's default (1 h); `timedelta(0)` disables it.
    """
    if not cluster:
        raise ValueError("cluster: must not be empty")
    if not stat_prefix:
        raise ValueError("stat_prefix: must not be empty")
    if idle_timeout is not None and idle_timeout < timedelta(0):
        raise ValueError(f"idle_timeout: must not be negative, got {idle_timeout}")
    proxy = TcpProxy(
        stat_prefix=stat_prefix,
        cluster=cluster,
        idle_timeout=idle_timeout,
        access_log=[stdout_access_log()] if access_log else [],
    )
    return _listener(name, address, port, Filter(name=TCP_PROXY, typed_config=pack(proxy)))


def http_listener(
    name: str,
    *,
    address: str,
    port: int,
    stat_prefix: str,
    route_config: RouteConfiguration | None = None,
    rds_route_config_name: str | None = None,
    tracing: HttpConnectionManagerTracing | None = None,
    access_log: bool = False,
) -> Listener:
    """An HTTP listener with routes inline (`route_config`) or from RDS over ADS."""
    manager = http_connection_manager(
        stat_prefix,
        route_config=route_config,
        rds_route_config_name=rds_route_config_name,
        tracing=tracing,
        access_log=access_log,
    )
    return _listener(
        name, address, port, Filter(name=HTTP_CONNECTION_MANAGER, typed_config=pack(manager))
    )
