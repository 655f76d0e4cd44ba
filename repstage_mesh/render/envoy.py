"""render: replicated state -> Envoy resources. A pure function, deterministic to the byte.

Per service: a listener on `listen_port` to the primary cluster, whose load assignment holds
only the current primary (none known: no endpoints, connections refused at once), and, if
`read_port` is set, a listener to a read cluster over all members. `tcp`, `redis` and
`postgres` services get tcp_proxy; `http` services get http_connection_manager with RDS (over
ADS) and a router with retries.

How an *open* connection to a demoted primary is cut is the `PrimaryStrategy`:

- `eds_only`: cluster `s-primary`, the load assignment swaps the host. New connections go to
  the new primary; an open tcp_proxy connection to the old one stays open (FACTS).
- `epoch_cluster`: cluster `s-primary-e<epoch>`; a new epoch is a new cluster and a changed
  listener, so Envoy drains the old filter chain (closes it after `--drain-time-s`).
- `health_fence`: cluster `s-primary` lists every member, the non-primaries as UNHEALTHY, with
  an active HTTP health check that Envoy sends to its own fence listener (health-check address
  override), which answers 200 for the current primary and 503 otherwise. When the primary
  changes the check fails for the old one and `close_connections_on_host_health_failure`
  closes its tcp_proxy connections (an EDS health_status alone does not trigger that).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from functools import lru_cache
from typing import Any, Generic, TypeVar

import betterproto2
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, LbEndpoint
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RetryPolicy, RouteConfiguration

from repstage_mesh.core import naming
from repstage_mesh.core.models import MeshState, ServiceProtocol, ServiceState
from repstage_mesh.filters import (
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    LISTENER,
    ROUTE_CONFIGURATION,
    DirectResponse,
    HealthStatus,
    RouteEntry,
    ToCluster,
    assembled_route_configuration,
    collector_cluster,
    dns_cluster,
    eds_cluster,
    encoded_routes,
    http_health_check,
    http_listener,
    is_ip_address,
    lb_endpoint,
    load_assignment,
    opentelemetry_tracing,
    retry_policy,
    route_configuration,
    tcp_proxy_listener,
)
from repstage_mesh.render.options import PrimaryStrategy, RenderOptions

Resources = dict[str, dict[str, betterproto2.Message]]
_V = TypeVar("_V")


DEFAULT_OPTIONS = RenderOptions()


def primary_cluster_name(service: ServiceState, options: RenderOptions) -> str:
    """The primary cluster's name under `options.primary_strategy`."""
    if options.primary_strategy is PrimaryStrategy.EPOCH_CLUSTER:
        return naming.epoch_cluster(service.name, service.epoch)
    return naming.primary_cluster(service.name)


def primary_clusters(state: MeshState, options: RenderOptions = DEFAULT_OPTIONS) -> list[str]:
    """The clusters that route to a primary, one per service (what a primary lease covers)."""
    return [primary_cluster_name(state.services[name], options) for name in sorted(state.services)]


def without_primaries(state: MeshState) -> MeshState:
    """`state` with no service's primary known: rendered, every primary route fails closed."""
    services = {
        name: service.model_copy(update={"primary": None}) for name, service in state.services.items()
    }
    return state.model_copy(update={"services": services})


HELD_METHODS = ("DELETE", "PATCH", "POST", "PUT")
HELD_ANSWER = DirectResponse(503, "writes held for a consistent point; retry\n", headers=(("retry-after", "1"),))


def _empty() -> Resources:
    return {CLUSTER: {}, CLUSTER_LOAD_ASSIGNMENT: {}, LISTENER: {}, ROUTE_CONFIGURATION: {}}


def render(state: MeshState, options: RenderOptions = DEFAULT_OPTIONS, held: frozenset[str] = frozenset()) -> Resources:
    """All Envoy resources for `state`, by type URL then resource name (both sorted).

    `held`: services whose new writes a consistent point holds now (`MeshState.held_services`,
    read with the node's clock by the caller): their HTTP primary route answers writes
    (`HELD_METHODS`) with 503 and `Retry-After` from Envoy itself.

    A service whose state and options are unchanged since an earlier call gets the very same
    message objects back (a per-service cache): treat the messages as read-only. An encoder can
    then reuse the bytes of everything but the services that changed (compare with `is`).
    """
    out = _empty()
    services = [state.services[name] for name in sorted(state.services)]
    _SERVICES.keep(state.services)
    _FENCES.keep(state.services)
    for service in services:
        pools = _pools(state, service.name)
        for type_url, name, message in _service_resources(service, options, pools, service.name in held):
            out[type_url][name] = message
    if options.primary_strategy is PrimaryStrategy.HEALTH_FENCE:
        _render_fence(services, options, out)
    if (
        options.tracing_collector_cluster
        and options.tracing_collector_address is not None
        and any(s.spec.protocol is ServiceProtocol.HTTP for s in services)
    ):
        host, port = options.tracing_collector_address
        out[CLUSTER][options.tracing_collector_cluster] = _collector(options.tracing_collector_cluster, host, port)
    return {type_url: dict(sorted(named.items())) for type_url, named in out.items()}


def port_conflicts(state: MeshState, options: RenderOptions = DEFAULT_OPTIONS) -> list[str]:
    """Listener ports used twice (Envoy would refuse the second listener); empty when none."""
    users: dict[int, list[str]] = {}
    for name in sorted(state.services):
        spec = state.services[name].spec
        users.setdefault(spec.listen_port, []).append(f"{name}.listen_port")
        if spec.read_port is not None:
            users.setdefault(spec.read_port, []).append(f"{name}.read_port")
    if options.primary_strategy is PrimaryStrategy.HEALTH_FENCE and options.fence_port is not None:
        users.setdefault(options.fence_port, []).append("fence_port")
        users.setdefault(options.fence_port + 1, []).append("fence_port + 1")
    return [f"port {port}: {', '.join(who)}" for port, who in sorted(users.items()) if len(who) > 1]


# --- per service ----------------------------------------------------------------------------


def _pools(state: MeshState, service: str) -> tuple[tuple[str, str], ...]:
    """(member, "draining" | "out") for the members a snapshot took out of the read pool."""
    return tuple(sorted((s.member, s.pool) for s in state.snapshots if s.service == service and s.pool != "in"))


class _LastByName(Generic[_V]):
    """The last value made for each service name, with the key it was made for: one entry per
    service, however many there are (an LRU bounded below the number of services would miss on
    every render, each evicting the next). `keep` forgets services that are gone."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[Hashable, _V]] = {}

    def get(self, name: str, key: Hashable, make: Callable[[], _V]) -> _V:
        found = self._items.get(name)
        if found is not None and found[0] == key:  # the same objects compare by identity first
            return found[1]
        value = make()
        self._items[name] = (key, value)
        return value

    def keep(self, names: Collection[str]) -> None:
        if len(self._items) > len(names):
            for gone in [n for n in self._items if n not in names]:
                del self._items[gone]

    def clear(self) -> None:
        self._items.clear()


ServiceResources = tuple[tuple[str, str, betterproto2.Message], ...]
_SERVICES: _LastByName[ServiceResources] = _LastByName()


def _service_resources(
    service: ServiceState, options: RenderOptions, pools: tuple[tuple[str, str], ...] = (), held: bool = False
) -> ServiceResources:
    def make() -> ServiceResources:
        out = _empty()
        _render_service(service, options, out, dict(pools), held)
        return tuple((t, n, m) for t, named in out.items() for n, m in named.items())

    return _SERVICES.get(service.name, (service, options, pools, held), make)


def clear_render_cache() -> None:
    """Forget the render caches (tests; memory)."""
    _SERVICES.clear()
    _FENCES.clear()
    for cached in (_cluster_options, _eds_cluster, _listener_resources, _fence_listeners, _collector, _fence_routes):
        cached.cache_clear()


@lru_cache(maxsize=16)
def _collector(name: str, host: str, port: int) -> Cluster:
    """The collector's cluster; the same object while the options stay (encode once)."""
    return collector_cluster(name, host, port)


def _render_service(
    service: ServiceState, options: RenderOptions, out: Resources, pools: dict[str, str] | None = None,
    held: bool = False,
) -> None:
    """`pools`: members a snapshot drains from the read cluster: `draining` stays listed as
    DRAINING (no new connections; its per-host counters stay in Envoy's admin /clusters),
    `out` is absent."""
    pools = pools or {}
    name = service.name
    spec = service.spec
    primary = primary_cluster_name(service, options)
    if options.primary_strategy is PrimaryStrategy.HEALTH_FENCE:
        _add_cluster(out, _fenced_assignment(service, primary, options), name, True, options)
    else:
        _add_cluster(out, load_assignment(primary, _primary_endpoints(service)), name, False, options)
    _add_listener(
        out, service, naming.primary_listener(name), spec.listen_port, primary,
        naming.primary_routes(name), options, held,
    )  # fmt: skip
    if spec.read_port is not None:
        read = naming.read_cluster(name)
        _add_cluster(
            out,
            load_assignment(read, [
                _endpoint(service, m, health_status=HealthStatus.DRAINING if pools.get(m) == "draining" else HealthStatus.HEALTHY)
                for m in _member_names(service) if pools.get(m) != "out"
            ]),
            name, False, options,
        )  # fmt: skip
        _add_listener(
            out, service, naming.read_listener(name), spec.read_port, read,
            naming.read_routes(name), options,
        )  # fmt: skip


def _member_names(service: ServiceState) -> list[str]:
    return sorted(m.name for m in service.spec.members)


def _endpoint(
    service: ServiceState,
    member_name: str,
    *,
    health_status: HealthStatus = HealthStatus.HEALTHY,
    fence: RenderOptions | None = None,
) -> LbEndpoint:
    """`fence`: send this host's health checks to the fence listener, Host: <member>."""
    member = service.spec.member(member_name)
    assert member is not None, f"{member_name} is not a member of {service.name}"
    return lb_endpoint(
        member.address,
        member.port,
        health_status=health_status,
        health_check_address=fence.fence_address if fence else None,
        # A member's check goes to one of two fence ports, flipped each time it is promoted and
        # never on demotion: a promoted member becomes a new Envoy host, checked at once (~10 ms
        # to routable instead of one interval), while a demoted one stays the same host, whose
        # failed check closes its connections (bench/close_on_switch.md, "rotation").
        health_check_port=_fence_port(fence, service.promotion_count(member_name)) if fence else None,
        health_check_hostname=member.name if fence else None,
        metadata={naming.METADATA_NAMESPACE: {"member": member.name}},
    )


def _fence_port(fence: RenderOptions, promotions: int) -> int:
    assert fence.fence_port is not None
    return fence.fence_port + promotions % 2


def _primary_endpoints(service: ServiceState) -> list[LbEndpoint]:
    """Only the current primary; no primary (or one no longer a member): none, fail closed."""
    if service.primary is None or service.spec.member(service.primary) is None:
        return []
    return [_endpoint(service, service.primary)]


def _fenced_cluster_options(service_name: str, options: RenderOptions) -> dict[str, Any]:
    check = http_health_check(
        naming.fence_check_path(service_name),
        interval=options.fence_interval,
        timeout=options.fence_timeout,
        # A 503 from the fence fails the host at once whatever this says; the threshold only
        # counts timeouts, so a slow fence listener does not cut the real primary's connections.
        unhealthy_threshold=3,
        healthy_threshold=1,
        # The peer is Envoy's own fence listener: one kept connection per host (a check every
        # interval on a new connection cost 50 Envoys ~0.7 of a core more, bench/RESULTS.md).
        reuse_connection=True,
        # A member that is not the primary fails its check and only its promotion (a new host,
        # checked at once: `_fence_port`) makes it routable again: checked less often.
        unhealthy_interval=options.fence_unhealthy_interval,
    )
    return {
        "connect_timeout": options.connect_timeout,
        "health_checks": [check],
        "close_connections_on_host_health_failure": True,
    }


def _fenced_assignment(
    service: ServiceState, name: str, options: RenderOptions
) -> ClusterLoadAssignment:
    assert options.fence_port is not None
    endpoints = [
        _endpoint(
            service,
            member,
            health_status=(
                HealthStatus.HEALTHY if member == service.primary else HealthStatus.UNHEALTHY
            ),
            fence=options,
        )
        for member in _member_names(service)
    ]
    return load_assignment(name, endpoints)


@lru_cache(maxsize=8192)
def _cluster_options(service_name: str, fenced: bool, options: RenderOptions) -> tuple[tuple[str, Any], ...]:
    if fenced:
        return tuple(_fenced_cluster_options(service_name, options).items())
    return (("connect_timeout", options.connect_timeout),)


@lru_cache(maxsize=8192)
def _eds_cluster(name: str, service_name: str, fenced: bool, options: RenderOptions) -> Cluster:
    """Cached: a cluster that did not change is the same object, so the xDS snapshot does not
    encode it again (messages are read-only once rendered)."""
    return eds_cluster(name, **dict(_cluster_options(service_name, fenced, options)))


def _add_cluster(
    out: Resources, assignment: ClusterLoadAssignment, service_name: str, fenced: bool, options: RenderOptions
) -> None:
    """An EDS cluster and its assignment; a STRICT_DNS cluster when a host is a DNS name.

    EDS refuses endpoints that are not IP addresses, so a cluster with a member given by name
    carries its endpoints inline (and has no ClusterLoadAssignment of its own).
    """
    name = assignment.cluster_name
    addresses = [
        lb.endpoint.address.socket_address.address
        for locality in assignment.endpoints
        for lb in locality.lb_endpoints
        if lb.endpoint and lb.endpoint.address and lb.endpoint.address.socket_address
    ]
    if all(is_ip_address(a) for a in addresses):
        out[CLUSTER][name] = _eds_cluster(name, service_name, fenced, options)
        out[CLUSTER_LOAD_ASSIGNMENT][name] = assignment
    else:
        out[CLUSTER][name] = dns_cluster(assignment, **dict(_cluster_options(service_name, fenced, options)))


def _add_listener(
    out: Resources,
    service: ServiceState,
    listener_name: str,
    port: int,
    cluster: str,
    routes_name: str,
    options: RenderOptions,
    held: bool = False,
) -> None:
    for type_url, name, message in _listener_resources(
        service.spec.protocol, service.name, listener_name, port, cluster, routes_name, options, held
    ):
        out[type_url][name] = message


@lru_cache(maxsize=8192)
def _listener_resources(
    protocol: ServiceProtocol,
    service_name: str,
    listener_name: str,
    port: int,
    cluster: str,
    routes_name: str,
    options: RenderOptions,
    held: bool = False,
) -> tuple[tuple[str, str, betterproto2.Message], ...]:
    """Cached like `_eds_cluster`: the listener (and HTTP routes) of a service whose primary
    changed are the same objects as before."""
    out = _empty()
    stat_prefix = listener_name.removesuffix("-listener")
    listener: Listener
    if protocol is ServiceProtocol.HTTP:
        hold = [RouteEntry(prefix="/", methods=HELD_METHODS, target=HELD_ANSWER)] if held else []
        routes = route_configuration(
            routes_name,
            [*hold, RouteEntry(prefix="/", target=ToCluster(cluster, retry=_retry(options)))],
            virtual_host=service_name,
        )
        out[ROUTE_CONFIGURATION][routes.name] = routes
        listener = http_listener(
            listener_name,
            address=options.bind_address,
            port=port,
            stat_prefix=stat_prefix,
            rds_route_config_name=routes.name,
            tracing=(
                opentelemetry_tracing(
                    options.tracing_collector_cluster,
                    service_name=f"envoy-{service_name}",
                    sampling_percent=options.tracing_sampling_percent,
                )
                if options.tracing_collector_cluster
                else None
            ),
            access_log=options.access_log,
        )
    else:  # tcp, redis, postgres
        listener = tcp_proxy_listener(
            listener_name,
            address=options.bind_address,
            port=port,
            cluster=cluster,
            stat_prefix=stat_prefix,
            idle_timeout=options.tcp_idle_timeout,
            access_log=options.access_log,
        )
    out[LISTENER][listener.name] = listener
    return tuple((t, n, m) for t, named in out.items() for n, m in named.items())


def _retry(options: RenderOptions) -> RetryPolicy:
    return retry_policy(
        retry_on=options.http_retry_on,
        num_retries=options.http_num_retries,
        per_try_timeout=options.http_per_try_timeout,
        retriable_status_codes=options.http_retriable_status_codes,
    )


# --- the fence --------------------------------------------------------------------------------


# A service's fence answers: its name, its members (in order) and its primary.
FenceKey = tuple[str, tuple[str, ...], str | None]


def _fence_key(service: ServiceState) -> FenceKey:
    return (service.name, tuple(_member_names(service)), service.primary)


_FENCES: _LastByName[bytes] = _LastByName()


def _fence_fragment(key: FenceKey) -> bytes:
    """One service's fence routes, encoded once per (members, primary): a change of primary
    in a mesh of many services encodes that service's routes, not every service's."""
    return _FENCES.get(key[0], key, lambda: _encode_fence(key))


def _encode_fence(key: FenceKey) -> bytes:
    name, members, primary = key
    entries: list[RouteEntry] = []
    for member in members:
        status = 200 if member == primary else 503
        answer = DirectResponse(status, "primary\n" if status == 200 else "not primary\n")
        entries.append(RouteEntry(path=naming.fence_path(name, member), target=answer))
        entries.append(
            RouteEntry(path=naming.fence_check_path(name), authority=member, target=answer)
        )
    return encoded_routes(entries)


_FENCE_FALLBACK = encoded_routes(
    [RouteEntry(prefix="/", target=DirectResponse(404, "unknown service or member\n"))]
)


@lru_cache(maxsize=8)
def _fence_routes(keys: tuple[FenceKey, ...]) -> RouteConfiguration:
    """The fence's one route configuration, the same object while no service's answers
    changed (a put that leaves members and primary alone re-encodes nothing of it)."""
    fragments = [_fence_fragment(key) for key in keys]
    fragments.append(_FENCE_FALLBACK)
    return assembled_route_configuration(naming.FENCE_ROUTES, fragments, virtual_host="fence")


def _render_fence(services: list[ServiceState], options: RenderOptions, out: Resources) -> None:
    assert options.fence_port is not None
    routes = _fence_routes(tuple(_fence_key(s) for s in services))
    out[ROUTE_CONFIGURATION][naming.FENCE_ROUTES] = routes
    for listener in _fence_listeners(options):
        out[LISTENER][listener.name] = listener


@lru_cache(maxsize=64)
def _fence_listeners(options: RenderOptions) -> tuple[Listener, ...]:
    assert options.fence_port is not None
    return tuple(
        http_listener(
            name,
            address=options.fence_address,
            port=options.fence_port + offset,
            stat_prefix="repstage-fence",
            rds_route_config_name=naming.FENCE_ROUTES,
        )
        for offset, name in enumerate((naming.FENCE_LISTENER, naming.FENCE_LISTENER_ALT))
    )


__all__ = [
    "DEFAULT_OPTIONS",
    "PrimaryStrategy",
    "RenderOptions",
    "Resources",
    "clear_render_cache",
    "port_conflicts",
    "primary_cluster_name",
    "primary_clusters",
    "render",
    "without_primaries",
]
