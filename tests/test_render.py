"""render(): fail closed, deterministic, referentially consistent, for every protocol and strategy."""

from __future__ import annotations

import typing
from collections.abc import Callable
from datetime import timedelta

import betterproto2
import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import HealthStatus
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)
from envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3 import TcpProxy
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from repstage_mesh.core import naming
from repstage_mesh.core.models import Member, MeshState, ServiceProtocol, ServiceSpec, ServiceState
from repstage_mesh.filters import (
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    HTTP_CONNECTION_MANAGER,
    LISTENER,
    RESOURCE_ORDER,
    ROUTE_CONFIGURATION,
    TCP_PROXY,
)
from repstage_mesh.render.envoy import (
    PrimaryStrategy,
    RenderOptions,
    Resources,
    clear_render_cache,
    port_conflicts,
    primary_cluster_name,
    render,
)

FENCE_PORT = 19901
ALL_OPTIONS = [RenderOptions(primary_strategy=s, fence_port=FENCE_PORT) for s in PrimaryStrategy]
TCP_LIKE = [ServiceProtocol.TCP, ServiceProtocol.REDIS, ServiceProtocol.POSTGRES]

A = Member(name="a", address="10.0.0.1", port=6379)
B = Member(name="b", address="10.0.0.2", port=6379)
C = Member(name="c", address="10.0.0.3", port=6380)


def service(
    name: str = "cache",
    primary: str | None = "a",
    *,
    epoch: int = 7,
    protocol: ServiceProtocol = ServiceProtocol.REDIS,
    members: tuple[Member, ...] = (A, B, C),
    listen_port: int = 16379,
    read_port: int | None = None,
) -> ServiceState:
    spec = ServiceSpec(
        name=name,
        protocol=protocol,
        listen_port=listen_port,
        read_port=read_port,
        members=members,
    )
    return ServiceState(spec=spec, primary=primary, epoch=epoch, changed_at=epoch)


def mesh(*services: ServiceState) -> MeshState:
    return MeshState(services={s.name: s for s in services}, index=100)


# --- reading the output back ------------------------------------------------------------------


def hosts(assignment: ClusterLoadAssignment) -> list[tuple[str, int, HealthStatus]]:
    out: list[tuple[str, int, HealthStatus]] = []
    for locality in assignment.endpoints:
        for lb in locality.lb_endpoints:
            address: typing.Any = lb.endpoint.address.socket_address  # type: ignore[union-attr]
            out.append((address.address, address.port_value, lb.health_status))
    return out


def listener_target(listener: betterproto2.Message) -> tuple[str, typing.Any]:
    """(filter name, its unpacked config) of a one-filter listener."""
    assert isinstance(listener, Listener)
    (chain,) = listener.filter_chains
    (filter_,) = chain.filters
    assert filter_.typed_config is not None
    if filter_.name == TCP_PROXY:
        return TCP_PROXY, TcpProxy.parse(filter_.typed_config.value)
    assert filter_.name == HTTP_CONNECTION_MANAGER
    return HTTP_CONNECTION_MANAGER, HttpConnectionManager.parse(filter_.typed_config.value)


def referenced_clusters(resources: Resources, listener: Listener) -> set[str]:
    kind, config = listener_target(listener)
    if kind == TCP_PROXY:
        return {config.cluster}
    routes = resources[ROUTE_CONFIGURATION][config.rds.route_config_name]
    assert isinstance(routes, RouteConfiguration)
    return {
        r.route.cluster or ""
        for vh in routes.virtual_hosts
        for r in vh.routes
        if r.route is not None
    }


def consistency_problems(resources: Resources) -> list[str]:
    """Everything a listener names exists; every EDS cluster has its assignment and vice versa."""
    problems: list[str] = []
    if list(resources) != list(RESOURCE_ORDER):
        problems.append(f"type URLs {list(resources)}")
    clusters = typing.cast(dict[str, Cluster], resources[CLUSTER])
    assignments = typing.cast(dict[str, ClusterLoadAssignment], resources[CLUSTER_LOAD_ASSIGNMENT])
    listeners = typing.cast(dict[str, Listener], resources[LISTENER])
    routes = typing.cast(dict[str, RouteConfiguration], resources[ROUTE_CONFIGURATION])
    for kind, named, attr in (
        ("cluster", clusters, "name"),
        ("assignment", assignments, "cluster_name"),
        ("listener", listeners, "name"),
        ("routes", routes, "name"),
    ):
        problems += [
            f"{kind} {k} is named {getattr(v, attr)}"
            for k, v in named.items()
            if getattr(v, attr) != k
        ]
        if list(named) != sorted(named):
            problems.append(f"{kind}s not sorted")
    used_routes: set[str] = set()
    for listener in listeners.values():
        kind, config = listener_target(listener)
        if kind == HTTP_CONNECTION_MANAGER:
            if config.rds is None or config.rds.route_config_name not in routes:
                problems.append(f"listener {listener.name} names missing routes")
                continue
            used_routes.add(config.rds.route_config_name)
        for target in referenced_clusters(resources, listener):
            if target not in clusters:
                problems.append(f"listener {listener.name} names missing cluster {target}")
    problems += [f"routes {r} used by no listener" for r in routes if r not in used_routes]
    for name, cluster in clusters.items():
        if cluster.type == ClusterDiscoveryType.EDS and name not in assignments:
            problems.append(f"EDS cluster {name} has no assignment")
        if cluster.type != ClusterDiscoveryType.EDS and name in assignments:
            problems.append(f"non-EDS cluster {name} has an assignment")
    problems += [f"assignment {a} has no cluster" for a in assignments if a not in clusters]
    return problems


def wire(resources: Resources) -> list[tuple[str, str, bytes]]:
    return [(t, n, bytes(m)) for t, named in resources.items() for n, m in named.items()]


# --- fail closed, primary only --------------------------------------------------------------


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=lambda o: o.primary_strategy.value)
def test_primary_cluster_holds_only_the_primary(options: RenderOptions) -> None:
    state = service(primary="b")
    out = render(mesh(state), options)
    assert consistency_problems(out) == []
    assignment = out[CLUSTER_LOAD_ASSIGNMENT][primary_cluster_name(state, options)]
    assert isinstance(assignment, ClusterLoadAssignment)
    healthy = [(h, p) for h, p, status in hosts(assignment) if status == HealthStatus.HEALTHY]
    assert healthy == [("10.0.0.2", 6379)]


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=lambda o: o.primary_strategy.value)
@pytest.mark.parametrize("primary", [None, "gone"])
def test_no_primary_fails_closed(options: RenderOptions, primary: str | None) -> None:
    """No primary (or one that is no longer a member): no healthy endpoint, nothing routed."""
    state = service(primary=primary)
    out = render(mesh(state), options)
    assert consistency_problems(out) == []
    name = primary_cluster_name(state, options)
    cluster = out[CLUSTER][name]
    assert isinstance(cluster, Cluster)
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0.0  # type: ignore[union-attr]
    assignment = out[CLUSTER_LOAD_ASSIGNMENT][name]
    assert isinstance(assignment, ClusterLoadAssignment)
    assert all(status != HealthStatus.HEALTHY for _, _, status in hosts(assignment))
    if options.primary_strategy is not PrimaryStrategy.HEALTH_FENCE:
        assert assignment.endpoints == []


def test_empty_state_renders_empty_resources() -> None:
    out = render(MeshState())
    assert out == {t: {} for t in RESOURCE_ORDER}


# --- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=lambda o: o.primary_strategy.value)
def test_same_state_same_bytes_whatever_the_order(options: RenderOptions) -> None:
    one = mesh(
        service("cache", "a", read_port=16380),
        service("web", "c", protocol=ServiceProtocol.HTTP, listen_port=18080, read_port=18081),
    )
    other = mesh(
        service(
            "web",
            "c",
            protocol=ServiceProtocol.HTTP,
            listen_port=18080,
            read_port=18081,
            members=(C, A, B),
        ),
        service("cache", "a", read_port=16380, members=(B, C, A)),
    )
    assert list(one.services) != list(other.services)
    first = wire(render(one, options))
    assert first == wire(render(one, options))
    assert first == wire(render(other, options))


# --- protocols ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", TCP_LIKE)
def test_tcp_like_protocols_get_tcp_proxy(protocol: ServiceProtocol) -> None:
    options = RenderOptions(bind_address="127.0.0.1", tcp_idle_timeout=timedelta(minutes=10))
    out = render(mesh(service(protocol=protocol, read_port=16380)), options)
    assert consistency_problems(out) == []
    assert out[ROUTE_CONFIGURATION] == {}
    primary = out[LISTENER][naming.primary_listener("cache")]
    assert isinstance(primary, Listener)
    assert primary.address.socket_address.address == "127.0.0.1"  # type: ignore[union-attr]
    assert primary.address.socket_address.port_value == 16379  # type: ignore[union-attr]
    kind, proxy = listener_target(primary)
    assert (kind, proxy.cluster, proxy.stat_prefix) == (TCP_PROXY, "cache-primary", "cache-primary")
    assert proxy.idle_timeout == timedelta(minutes=10)
    read = out[LISTENER][naming.read_listener("cache")]
    assert isinstance(read, Listener)
    assert read.address.socket_address.port_value == 16380  # type: ignore[union-attr]
    assert listener_target(read)[1].cluster == "cache-read"
    read_assignment = out[CLUSTER_LOAD_ASSIGNMENT]["cache-read"]
    assert isinstance(read_assignment, ClusterLoadAssignment)
    assert [h[:2] for h in hosts(read_assignment)] == [
        ("10.0.0.1", 6379),
        ("10.0.0.2", 6379),
        ("10.0.0.3", 6380),
    ]


def test_http_gets_connection_manager_rds_and_retries() -> None:
    options = RenderOptions(http_num_retries=4, http_per_try_timeout=timedelta(seconds=2))
    state = service("web", "a", protocol=ServiceProtocol.HTTP, listen_port=18080, read_port=18081)
    out = render(mesh(state), options)
    assert consistency_problems(out) == []
    assert sorted(out[ROUTE_CONFIGURATION]) == ["web-primary-routes", "web-read-routes"]
    kind, manager = listener_target(out[LISTENER]["web-primary-listener"])
    assert kind == HTTP_CONNECTION_MANAGER
    assert manager.rds.route_config_name == "web-primary-routes"
    assert manager.rds.config_source.ads is not None
    assert manager.http_filters[-1].name == "envoy.filters.http.router"
    assert manager.tracing is None
    routes = out[ROUTE_CONFIGURATION]["web-primary-routes"]
    assert isinstance(routes, RouteConfiguration)
    (route,) = routes.virtual_hosts[0].routes
    assert route.match.prefix == "/"  # type: ignore[union-attr]
    assert route.route.cluster == "web-primary"  # type: ignore[union-attr]
    retry = route.route.retry_policy  # type: ignore[union-attr]
    assert retry is not None
    assert "connect-failure" in retry.retry_on and "retriable-status-codes" in retry.retry_on
    assert (retry.num_retries, retry.per_try_timeout) == (4, timedelta(seconds=2))
    assert retry.retriable_status_codes == [503]


def test_tracing_hook_reaches_http_listeners() -> None:
    options = RenderOptions(tracing_collector_cluster="otel-collector")
    out = render(
        mesh(service("web", "a", protocol=ServiceProtocol.HTTP, listen_port=18080)), options
    )
    _, manager = listener_target(out[LISTENER]["web-primary-listener"])
    assert manager.tracing.provider.name == "envoy.tracers.opentelemetry"


# --- strategies --------------------------------------------------------------------------------


def test_eds_only_closes_pools_on_host_set_change() -> None:
    out = render(mesh(service()), RenderOptions(primary_strategy=PrimaryStrategy.EDS_ONLY))
    cluster = out[CLUSTER]["cache-primary"]
    assert isinstance(cluster, Cluster)
    assert cluster.type == ClusterDiscoveryType.EDS
    assert cluster.common_lb_config.close_connections_on_host_set_change is True  # type: ignore[union-attr]
    assert cluster.health_checks == []


def test_epoch_cluster_is_renamed_per_epoch_and_the_listener_follows() -> None:
    options = RenderOptions(primary_strategy=PrimaryStrategy.EPOCH_CLUSTER)
    before = render(mesh(service(primary="a", epoch=7)), options)
    after = render(mesh(service(primary="b", epoch=9)), options)
    assert sorted(before[CLUSTER]) == ["cache-primary-e7"]
    assert sorted(after[CLUSTER]) == ["cache-primary-e9"]  # the old epoch's cluster is gone
    assert (
        listener_target(before[LISTENER]["cache-primary-listener"])[1].cluster == "cache-primary-e7"
    )
    assert (
        listener_target(after[LISTENER]["cache-primary-listener"])[1].cluster == "cache-primary-e9"
    )
    assert consistency_problems(before) == consistency_problems(after) == []


def test_health_fence_lists_every_member_and_checks_through_the_fence() -> None:
    options = RenderOptions(
        primary_strategy=PrimaryStrategy.HEALTH_FENCE,
        fence_port=FENCE_PORT,
        fence_interval=timedelta(milliseconds=300),
    )
    out = render(mesh(service(primary="b", read_port=16380)), options)
    assert consistency_problems(out) == []
    cluster = out[CLUSTER]["cache-primary"]
    assert isinstance(cluster, Cluster)
    assert cluster.close_connections_on_host_health_failure is True
    assert cluster.ignore_health_on_host_removal is True
    (check,) = cluster.health_checks
    assert check.http_health_check.path == "/fence/cache"  # type: ignore[union-attr]
    assert check.interval == check.no_traffic_healthy_interval == timedelta(milliseconds=300)
    # Not set: a failed host is checked as often; the check keeps its connection (Envoy's own listener)
    assert check.unhealthy_interval == check.no_traffic_interval == timedelta(milliseconds=300)
    assert check.unhealthy_edge_interval == check.healthy_edge_interval == timedelta(milliseconds=300)
    assert check.reuse_connection is True
    assert (check.unhealthy_threshold, check.healthy_threshold) == (3, 1)  # timeouts only; a 503 fails at once
    assignment = out[CLUSTER_LOAD_ASSIGNMENT]["cache-primary"]
    assert isinstance(assignment, ClusterLoadAssignment)
    assert hosts(assignment) == [
        ("10.0.0.1", 6379, HealthStatus.UNHEALTHY),
        ("10.0.0.2", 6379, HealthStatus.HEALTHY),
        ("10.0.0.3", 6380, HealthStatus.UNHEALTHY),
    ]
    for lb, member in zip(assignment.endpoints[0].lb_endpoints, "abc", strict=True):
        hc = lb.endpoint.health_check_config  # type: ignore[union-attr]
        assert hc.address.socket_address.address == "127.0.0.1"  # type: ignore[union-attr]
        assert hc.address.socket_address.port_value == FENCE_PORT  # type: ignore[union-attr]
        assert hc.hostname == member  # type: ignore[union-attr]
    # The read cluster is not fenced.
    read = out[CLUSTER]["cache-read"]
    assert isinstance(read, Cluster)
    assert read.health_checks == [] and not read.close_connections_on_host_health_failure
    # The fence listener serves the fence routes on the fence port.
    fence = out[LISTENER][naming.FENCE_LISTENER]
    assert isinstance(fence, Listener)
    assert fence.address.socket_address.address == "127.0.0.1"  # type: ignore[union-attr]
    assert fence.address.socket_address.port_value == FENCE_PORT  # type: ignore[union-attr]
    assert listener_target(fence)[1].rds.route_config_name == naming.FENCE_ROUTES


def fence_answers(resources: Resources) -> dict[tuple[str, str | None], int]:
    """(path, :authority or None) -> the status the fence answers."""
    rendered = resources[ROUTE_CONFIGURATION][naming.FENCE_ROUTES]
    assert isinstance(rendered, RouteConfiguration)
    routes = RouteConfiguration.parse(bytes(rendered))  # the routes go out pre-encoded
    assert routes.virtual_hosts[0].routes[-1].match.prefix == "/"  # the fallback is tried last
    answers: dict[tuple[str, str | None], int] = {}
    for route in routes.virtual_hosts[0].routes:
        match = route.match
        assert match is not None and route.direct_response is not None
        authority = match.headers[0].string_match.exact if match.headers else None  # type: ignore[union-attr]
        answers[(match.path or match.prefix or "", authority)] = route.direct_response.status
    return answers


def test_fence_answers_200_only_for_the_current_primary() -> None:
    options = RenderOptions(primary_strategy=PrimaryStrategy.HEALTH_FENCE, fence_port=FENCE_PORT)
    other = service(
        "pg", None, protocol=ServiceProtocol.POSTGRES, members=(A, B), listen_port=15432
    )
    answers = fence_answers(render(mesh(service(primary="c"), other), options))
    assert answers == {
        ("/fence/cache/a", None): 503,
        ("/fence/cache", "a"): 503,
        ("/fence/cache/b", None): 503,
        ("/fence/cache", "b"): 503,
        ("/fence/cache/c", None): 200,
        ("/fence/cache", "c"): 200,
        ("/fence/pg/a", None): 503,  # no primary: every member is fenced off
        ("/fence/pg", "a"): 503,
        ("/fence/pg/b", None): 503,
        ("/fence/pg", "b"): 503,
        ("/", None): 404,
    }


def test_fence_routes_are_encoded_again_only_when_an_answer_changes() -> None:
    """A change that leaves every service's members and primary alone (a port, a timeout)
    gives the very same fence routes (the encoder reuses their bytes, however many services
    there are); a new primary gives new ones."""
    options = RenderOptions(primary_strategy=PrimaryStrategy.HEALTH_FENCE, fence_port=FENCE_PORT)

    def fence(pg_primary: str, b: Member = B) -> typing.Any:
        pg = service("pg", pg_primary, protocol=ServiceProtocol.POSTGRES, members=(A, b), listen_port=15432)
        return render(mesh(service(primary="c"), pg), options)

    before = fence("a")[ROUTE_CONFIGURATION][naming.FENCE_ROUTES]
    ported = fence("a", Member(name="b", address="127.0.0.1", port=7999))
    assert ported[ROUTE_CONFIGURATION][naming.FENCE_ROUTES] is before
    switched = fence("b")
    assert switched[ROUTE_CONFIGURATION][naming.FENCE_ROUTES] is not before
    assert fence_answers(switched)[("/fence/pg", "b")] == 200
    assert fence_answers(switched)[("/fence/pg", "a")] == 503
    assert fence_answers(switched)[("/fence/cache", "c")] == 200


def test_a_change_to_one_service_renders_that_service_only_in_a_large_mesh() -> None:
    """Every other service's messages are the very objects of the last render (the encoder
    reuses their bytes), one entry per service whatever the mesh's size."""
    options = RenderOptions(primary_strategy=PrimaryStrategy.HEALTH_FENCE, fence_port=FENCE_PORT)
    many = [service(f"s{i:03}", "a", listen_port=20000 + i) for i in range(60)]
    before = render(mesh(*many), options)
    many[50] = service("s050", "b", listen_port=20050)
    after = render(mesh(*many), options)
    changed = {
        (type_url, name) for type_url, by_name in after.items() for name, message in by_name.items()
        if before[type_url].get(name) is not message
    }
    assert changed == {
        (CLUSTER_LOAD_ASSIGNMENT, "s050-primary"), (ROUTE_CONFIGURATION, naming.FENCE_ROUTES),
    }
    assert fence_answers(after)[("/fence/s050", "b")] == 200
    assert fence_answers(after)[("/fence/s049", "a")] == 200


def test_health_fence_without_services_still_serves_the_fence() -> None:
    options = RenderOptions(primary_strategy=PrimaryStrategy.HEALTH_FENCE, fence_port=FENCE_PORT)
    out = render(MeshState(), options)
    assert consistency_problems(out) == []
    assert sorted(out[LISTENER]) == sorted([naming.FENCE_LISTENER, naming.FENCE_LISTENER_ALT])
    assert fence_answers(out) == {("/", None): 404}


def test_member_given_by_dns_name_gets_a_strict_dns_cluster() -> None:
    named = Member(name="d", address="db-d.example", port=6379)
    out = render(mesh(service(primary="d", members=(A, named), read_port=16380)))
    assert consistency_problems(out) == []
    for name in ("cache-primary", "cache-read"):
        cluster = out[CLUSTER][name]
        assert isinstance(cluster, Cluster)
        assert cluster.type == ClusterDiscoveryType.STRICT_DNS
        assert name not in out[CLUSTER_LOAD_ASSIGNMENT]
    # Once the primary is an IP again, the primary cluster is EDS again.
    out = render(mesh(service(primary="a", members=(A, named))))
    assert out[CLUSTER]["cache-primary"].type == ClusterDiscoveryType.EDS  # type: ignore[attr-defined]


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: RenderOptions(primary_strategy=PrimaryStrategy.HEALTH_FENCE), "fence_port"),
        (lambda: RenderOptions(bind_address="not-an-ip"), "bind_address"),
        (lambda: RenderOptions(fence_address="localhost"), "fence_address"),
        (lambda: RenderOptions(fence_port=0), "fence_port"),
        (lambda: RenderOptions(connect_timeout=timedelta(0)), "connect_timeout"),
        (lambda: RenderOptions(tcp_idle_timeout=timedelta(seconds=-1)), "tcp_idle_timeout"),
        (lambda: RenderOptions(http_num_retries=-1), "http_num_retries"),
        (lambda: RenderOptions.model_validate({"primary_strategy": "fastest"}), "primary_strategy"),
    ],
)
def test_bad_options_name_the_field(make: Callable[[], RenderOptions], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        make()


def test_port_conflicts() -> None:
    options = RenderOptions(primary_strategy=PrimaryStrategy.HEALTH_FENCE, fence_port=16380)
    state = mesh(
        service("cache", read_port=16380),
        service("pg", protocol=ServiceProtocol.POSTGRES, listen_port=16379),
    )
    assert port_conflicts(state, options) == [
        "port 16379: cache.listen_port, pg.listen_port",
        "port 16380: cache.read_port, fence_port",
    ]
    assert port_conflicts(mesh(service()), options) == []


# --- property: any state renders consistently and deterministically -----------------------------

names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.sampled_from(["db.example", "cache-1.svc.local"]),
)


@st.composite
def service_states(draw: st.DrawFn, name: str, ports: list[int]) -> ServiceState:
    member_names = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    endpoints = draw(
        st.lists(
            st.tuples(addresses, st.integers(1, 65535)),
            min_size=len(member_names),
            max_size=len(member_names),
            unique=True,
        )
    )
    members = tuple(
        Member(name=n, address=a, port=p) for n, (a, p) in zip(member_names, endpoints, strict=True)
    )
    primary = draw(st.one_of(st.none(), st.sampled_from(member_names), st.just("departed")))
    spec = ServiceSpec(
        name=name,
        protocol=draw(st.sampled_from(list(ServiceProtocol))),
        listen_port=ports[0],
        read_port=draw(st.sampled_from([None, ports[1]])),
        members=members,
    )
    return ServiceState(spec=spec, primary=primary, epoch=draw(st.integers(0, 10**9)))


@st.composite
def mesh_states(draw: st.DrawFn) -> MeshState:
    service_names = draw(st.lists(names, max_size=5, unique=True))
    ports = draw(
        st.lists(
            st.integers(1024, 60000),
            min_size=2 * len(service_names),
            max_size=2 * len(service_names),
            unique=True,
        )
    )
    services = [
        draw(service_states(n, ports[2 * i : 2 * i + 2])) for i, n in enumerate(service_names)
    ]
    return MeshState(services={s.name: s for s in services})


@settings(max_examples=60, deadline=None)
@given(state=mesh_states(), strategy=st.sampled_from(list(PrimaryStrategy)))
def test_any_state_renders_consistently_and_deterministically(
    state: MeshState, strategy: PrimaryStrategy
) -> None:
    options = RenderOptions(primary_strategy=strategy, fence_port=60001)
    out = render(state, options)
    assert consistency_problems(out) == []
    clear_render_cache()  # rendered afresh, not served from the per-service cache
    assert wire(out) == wire(render(state.model_copy(deep=True), options))
    shuffled = MeshState(services=dict(reversed(list(state.services.items()))))
    assert wire(out) == wire(render(shuffled, options))
    for svc in state.services.values():
        # Exactly one listener per declared port, and the primary cluster exists.
        assert naming.primary_listener(svc.name) in out[LISTENER]
        assert (naming.read_listener(svc.name) in out[LISTENER]) == (svc.spec.read_port is not None)
        assert primary_cluster_name(svc, options) in out[CLUSTER]
        # Fail closed: a healthy endpoint in the primary cluster only for a real primary.
        cluster = out[CLUSTER][primary_cluster_name(svc, options)]
        assert isinstance(cluster, Cluster)
        assignment = cluster.load_assignment or out[CLUSTER_LOAD_ASSIGNMENT][cluster.name]
        assert isinstance(assignment, ClusterLoadAssignment)
        healthy = [h[:2] for h in hosts(assignment) if h[2] == HealthStatus.HEALTHY]
        member = svc.spec.member(svc.primary) if svc.primary else None
        assert healthy == ([(member.address, member.port)] if member else [])


def test_consistency_check_can_fail() -> None:
    """The checker used above notices a missing cluster, assignment and route configuration."""
    state = mesh(
        service("web", "a", protocol=ServiceProtocol.HTTP, listen_port=18080, read_port=18081)
    )
    out = render(state)
    del out[CLUSTER]["web-read"]
    del out[CLUSTER_LOAD_ASSIGNMENT]["web-primary"]
    del out[ROUTE_CONFIGURATION]["web-primary-routes"]
    problems = consistency_problems(out)
    assert "listener web-primary-listener names missing routes" in problems
    assert "listener web-read-listener names missing cluster web-read" in problems
    assert "EDS cluster web-primary has no assignment" in problems
    assert "assignment web-read has no cluster" in problems


def test_unchanged_services_keep_their_message_objects() -> None:
    """An encoder can reuse the bytes of what did not change; what changed is new."""
    options = RenderOptions()
    cache, web = service("cache", "a"), service("web", "a", listen_port=18080)
    before = render(mesh(cache, web), options)
    after = render(mesh(cache, web.model_copy(update={"primary": "b", "epoch": 9})), options)
    assert (
        after[CLUSTER_LOAD_ASSIGNMENT]["cache-primary"]
        is before[CLUSTER_LOAD_ASSIGNMENT]["cache-primary"]
    )
    assert after[LISTENER]["cache-primary-listener"] is before[LISTENER]["cache-primary-listener"]
    assert (
        after[CLUSTER_LOAD_ASSIGNMENT]["web-primary"]
        is not before[CLUSTER_LOAD_ASSIGNMENT]["web-primary"]
    )
    assert bytes(after[CLUSTER_LOAD_ASSIGNMENT]["web-primary"]) != bytes(
        before[CLUSTER_LOAD_ASSIGNMENT]["web-primary"]
    )


def test_a_promoted_member_checks_on_the_other_fence_port_and_a_demoted_one_keeps_its_port() -> None:
    """Rotation: promotion gives a member a fresh Envoy host (checked at once); demotion keeps
    the host, so its failing check closes its connections."""
    from repstage_mesh.core.models import SetPrimary
    from repstage_mesh.core.state import apply

    options = RenderOptions(primary_strategy=PrimaryStrategy.HEALTH_FENCE, fence_port=FENCE_PORT)
    spec = ServiceSpec(
        name="pg", listen_port=15432,
        members=(Member(name="a", address="10.0.0.1", port=5432), Member(name="b", address="10.0.0.2", port=5432)),
        primary="a",
    )
    from repstage_mesh.core.models import PutService

    state, _ = apply(MeshState(), PutService(spec=spec), 1)

    def ports(st: MeshState) -> dict[str, int]:
        cla = render(st, options)[CLUSTER_LOAD_ASSIGNMENT]["pg-primary"]
        return {
            lb.metadata.filter_metadata[naming.METADATA_NAMESPACE].to_dict()["member"]: lb.endpoint.health_check_config.port_value
            for loc in cla.endpoints for lb in loc.lb_endpoints
        }

    first = ports(state)
    assert first == {"a": FENCE_PORT + 1, "b": FENCE_PORT}
    state, _ = apply(state, SetPrimary(service="pg", member="b"), 2)
    second = ports(state)
    assert second == {"a": FENCE_PORT + 1, "b": FENCE_PORT + 1}  # a demoted: unchanged; b promoted: flipped
    state, _ = apply(state, SetPrimary(service="pg", member=None), 3)
    assert ports(state) == second  # fencing off changes no host
    state, _ = apply(state, SetPrimary(service="pg", member="a"), 4)
    assert ports(state) == {"a": FENCE_PORT, "b": FENCE_PORT + 1}


def test_health_fence_checks_members_that_are_not_the_primary_less_often() -> None:
    """The primary at fence_interval (its demotion must close connections within it); a failed
    host at fence_unhealthy_interval once the cluster carried traffic; the first check after a
    failure one fence_interval later, and every host at fence_interval before any traffic (at an
    Envoy's start the checks can run before the fence listener exists: the primary's first one
    fails, and its next must not wait for the long interval)."""
    options = RenderOptions(
        primary_strategy=PrimaryStrategy.HEALTH_FENCE, fence_port=FENCE_PORT,
        fence_interval=timedelta(milliseconds=100), fence_unhealthy_interval=timedelta(milliseconds=700),
    )
    cluster = render(mesh(service(primary="b")), options)[CLUSTER]["cache-primary"]
    assert isinstance(cluster, Cluster)
    (check,) = cluster.health_checks
    assert check.interval == check.no_traffic_healthy_interval == timedelta(milliseconds=100)
    assert check.unhealthy_edge_interval == check.healthy_edge_interval == timedelta(milliseconds=100)
    assert check.unhealthy_interval == timedelta(milliseconds=700)
    assert check.no_traffic_interval == timedelta(milliseconds=100)
    with pytest.raises(ValueError, match="fence_unhealthy_interval: must be at least fence_interval"):
        RenderOptions(primary_strategy=PrimaryStrategy.HEALTH_FENCE, fence_port=FENCE_PORT,
                      fence_interval=timedelta(milliseconds=100), fence_unhealthy_interval=timedelta(milliseconds=50))
