"""Type URLs, ADS ordering, and which resource names a resource refers to.

Like go-control-plane's `resource` package this knows only type URLs, ordering and
references, nothing of how resources are chosen or sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import betterproto2
    from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration

PREFIX = "type.googleapis.com/"
CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# ADS ordering: clusters and endpoints before listeners and routes (Envoy's xDS protocol doc,
# "Eventual consistency considerations"); removals go out after the additions were ACKed.
ADS_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

# Types whose SotW responses are the full state: a resource left out is deleted by Envoy.
# For EDS and RDS a SotW response carries only the named resources the client asked for.
FULL_STATE_TYPES = frozenset({CLUSTER, LISTENER})

SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds", SECRET: "sds"}

_HCM = PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TCP_PROXY = PREFIX + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


@cache
def message_types() -> dict[str, type[betterproto2.Message]]:
    """The message class of each type URL. Imported when first asked: the xDS workers only
    relay encoded bytes and never build a resource, and importing these classes is most of a
    process's start (about a second of CPU each on the 2-core machine)."""
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster
    from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
    from envoy_data_plane.envoy.config.listener.v3 import Listener
    from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration

    return {CLUSTER: Cluster, ENDPOINT: ClusterLoadAssignment, LISTENER: Listener, ROUTE: RouteConfiguration}


Ref = tuple[str, str]  # (type_url, resource name)


def type_url_of(message: betterproto2.Message) -> str:
    for url, cls in message_types().items():
        if isinstance(message, cls):
            return url
    raise TypeError(f"no xDS type URL known for {type(message).__name__}")


def short_name(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


def references(type_url: str, message: betterproto2.Message) -> frozenset[Ref]:
    """The resources `message` needs from other xDS types to work."""
    return frozenset(_refs(type_url, message))


@cache
def _ref_classes() -> SimpleNamespace:
    """What `_refs` reads, imported once when first needed (see `message_types`)."""
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
    from envoy_data_plane.envoy.config.listener.v3 import Listener
    from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
    )
    from envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3 import TcpProxy

    return SimpleNamespace(
        Cluster=Cluster, EDS=ClusterDiscoveryType.EDS, Listener=Listener, RouteConfiguration=RouteConfiguration,
        HttpConnectionManager=HttpConnectionManager, TcpProxy=TcpProxy,
    )


def _refs(type_url: str, message: betterproto2.Message) -> Iterator[Ref]:
    k = _ref_classes()
    if type_url == CLUSTER and isinstance(message, k.Cluster):
        if message.type == k.EDS:
            eds = message.eds_cluster_config
            yield ENDPOINT, (eds.service_name if eds and eds.service_name else message.name)
    elif type_url == LISTENER and isinstance(message, k.Listener):
        chains = list(message.filter_chains)
        if message.default_filter_chain is not None:
            chains.append(message.default_filter_chain)
        for chain in chains:
            for flt in chain.filters:
                typed = flt.typed_config
                if typed is None:
                    continue
                if typed.type_url == _TCP_PROXY:
                    proxy = k.TcpProxy.parse(typed.value)
                    if proxy.cluster:
                        yield CLUSTER, proxy.cluster
                    if proxy.weighted_clusters is not None:
                        for wc in proxy.weighted_clusters.clusters:
                            yield CLUSTER, wc.name
                elif typed.type_url == _HCM:
                    hcm = k.HttpConnectionManager.parse(typed.value)
                    if hcm.rds is not None:
                        yield ROUTE, hcm.rds.route_config_name
                    if hcm.route_config is not None:
                        yield from _route_refs(hcm.route_config)
    elif type_url == ROUTE and isinstance(message, k.RouteConfiguration):
        yield from _route_refs(message)


def _route_refs(config: RouteConfiguration) -> Iterator[Ref]:
    for vhost in config.virtual_hosts:
        for route in vhost.routes:
            action = route.route
            if action is None:
                continue
            if action.cluster:
                yield CLUSTER, action.cluster
            if action.weighted_clusters is not None:
                for wc in action.weighted_clusters.clusters:
                    yield CLUSTER, wc.name
