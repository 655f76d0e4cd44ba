"""HTTP: route configurations, retry policies, and the http_connection_manager filter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
)
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerTracing,
    HttpFilter,
    Rds,
)
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher

from .access_logs import stdout_access_log
from .sources import ads_config_source
from .type_urls import pack

# Retry what cannot have reached the application (connect failures, refused streams) and what
# says "try elsewhere" (gRPC unavailable/cancelled, the status codes below) -- not 5xx in general,
# which may follow a write that happened.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRIABLE_STATUS_CODES: tuple[int, ...] = (503,)


def retry_policy(
    *,
    retry_on: str = DEFAULT_RETRY_ON,
    num_retries: int = 3,
    per_try_timeout: timedelta | None = None,
    retriable_status_codes: Sequence[int] = DEFAULT_RETRIABLE_STATUS_CODES,
) -> RetryPolicy:
    """A route retry policy. `per_try_timeout` None leaves each try bounded by the route timeout."""
    if not retry_on.strip():
        raise ValueError("retry_on: must name at least one condition")
    if num_retries < 0:
        raise ValueError(f"num_retries: must be >= 0, got {num_retries}")
    if per_try_timeout is not None and per_try_timeout <= timedelta(0):
        raise ValueError(f"per_try_timeout: must be positive, got {per_try_timeout}")
    for code in retriable_status_codes:
        if not 100 <= code <= 599:
            raise ValueError(f"retriable_status_codes: {code} is not an HTTP status")
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=num_retries,
        per_try_timeout=per_try_timeout,
        retriable_status_codes=sorted(set(retriable_status_codes)),
    )


@dataclass(frozen=True)
class ToCluster:
    """Forward to `cluster`. `timeout` None keeps Envoy's 15 s route timeout; 0 disables it."""

    cluster: str
    retry: RetryPolicy | None = None
    timeout: timedelta | None = None


@dataclass(frozen=True)
class DirectResponse:
    """Answer from Envoy itself with `status` (and `body`, if any, and `headers`)."""

    status: int
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RouteEntry:
    """Match exactly one of `path` (exact) or `prefix`, and optionally the exact `:authority`
    and one of `methods` (upper-case HTTP methods)."""

    target: ToCluster | DirectResponse
    path: str | None = None
    prefix: str | None = None
    authority: str | None = None
    methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.path is None) == (self.prefix is None):
            raise ValueError("path/prefix: give exactly one of them")
        match = self.path if self.path is not None else self.prefix
        if not (match or "").startswith("/"):
            raise ValueError(f"path/prefix: must start with '/', got {match!r}")
        if isinstance(self.target, DirectResponse) and not 200 <= self.target.status <= 599:
            raise ValueError(f"status: must be in 200..599, got {self.target.status}")
        if isinstance(self.target, ToCluster) and not self.target.cluster:
            raise ValueError("cluster: must not be empty")
        for method in self.methods:
            if not method.isalpha() or not method.isupper():
                raise ValueError(f"methods: {method!r} is not an upper-case HTTP method")


def _route(entry: RouteEntry) -> Route:
    headers = []
    if entry.authority is not None:
        headers.append(HeaderMatcher(name=":authority", string_match=StringMatcher(exact=entry.authority)))
    if entry.methods:
        regex = RegexMatcher(regex=f"^({'|'.join(entry.methods)})$")
        headers.append(HeaderMatcher(name=":method", string_match=StringMatcher(safe_regex=regex)))
    match = RouteMatch(path=entry.path, prefix=entry.prefix, headers=headers)
    target = entry.target
    if isinstance(target, DirectResponse):
        return Route(
            match=match,
            direct_response=DirectResponseAction(
                status=target.status,
                body=DataSource(inline_string=target.body) if target.body else None,
            ),
            response_headers_to_add=[
                HeaderValueOption(
                    header=HeaderValue(key=k, value=v),
                    append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                )
                for k, v in target.headers
            ],
        )
    return Route(
        match=match,
        route=RouteAction(
            cluster=target.cluster, retry_policy=target.retry, timeout=target.timeout
        ),
    )


def route_configuration(
    name: str,
    entries: Sequence[RouteEntry],
    *,
    virtual_host: str = "all",
    domains: Sequence[str] = ("*",),
) -> RouteConfiguration:
    """One virtual host whose routes are `entries`, tried in the order given (first match wins).

    No entries is valid: every request gets Envoy's 404.
    """
    if not name:
        raise ValueError("name: must not be empty")
    if not domains:
        raise ValueError("domains: must name at least one domain")
    return RouteConfiguration(
        name=name,
        virtual_hosts=[
            VirtualHost(
                name=virtual_host, domains=list(domains), routes=[_route(e) for e in entries]
            )
        ],
    )


def encoded_routes(entries: Sequence[RouteEntry]) -> bytes:
    """The routes of `entries`, encoded as a virtual host's repeated `routes` field: a fragment
    for `assembled_route_configuration`. A caller that keeps the fragments of what did not
    change encodes only what did (one route configuration shared by many services)."""
    return bytes(VirtualHost(routes=[_route(e) for e in entries]))


def assembled_route_configuration(
    name: str,
    fragments: Sequence[bytes],
    *,
    virtual_host: str = "all",
    domains: Sequence[str] = ("*",),
) -> RouteConfiguration:
    """`route_configuration` with routes encoded beforehand (`encoded_routes`), tried in the
    order of `fragments`. `bytes()` of the result is exactly that of `route_configuration` with
    all the entries; the routes travel as the virtual host's unknown fields (protobuf's own
    rule: unknown fields are kept and written out again), so `virtual_hosts[0].routes` is
    empty in Python: read them with `RouteConfiguration.parse(bytes(config))`. Only for routes
    that name no cluster (what a snapshot's references are worked out from)."""
    config = route_configuration(name, (), virtual_host=virtual_host, domains=domains)
    config.virtual_hosts[0]._unknown_fields = b"".join(fragments)
    return config


def router_filter() -> HttpFilter:
    """The terminal router filter."""
    return HttpFilter(name="envoy.filters.http.router", typed_config=pack(Router()))


def http_connection_manager(
    stat_prefix: str,
    *,
    route_config: RouteConfiguration | None = None,
    rds_route_config_name: str | None = None,
    tracing: HttpConnectionManagerTracing | None = None,
    access_log: bool = False,
) -> HttpConnectionManager:
    """HTTP/1.1 and HTTP/2 (codec AUTO) with routes inline or from RDS over ADS (give one)."""
    if not stat_prefix:
        raise ValueError("stat_prefix: must not be empty")
    if (route_config is None) == (rds_route_config_name is None):
        raise ValueError("route_config/rds_route_config_name: give exactly one of them")
    return HttpConnectionManager(
        codec_type=HttpConnectionManagerCodecType.AUTO,
        stat_prefix=stat_prefix,
        route_config=route_config,
        rds=(
            Rds(config_source=ads_config_source(), route_config_name=rds_route_config_name)
            if rds_route_config_name is not None
            else None
        ),
        http_filters=[router_filter()],
        tracing=tracing,
        access_log=[stdout_access_log()] if access_log else [],
    )
