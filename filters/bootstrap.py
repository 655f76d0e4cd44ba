"""The Envoy bootstrap: who this proxy is, its admin port, and how it reaches the control plane.

How Envoy moves to another control-plane node
---------------------------------------------
Envoy keeps ONE ADS stream, to one host of `xds_cluster`, picked by the cluster's load balancer
(round robin). When the stream breaks, Envoy waits a back-off and opens a new stream, again
through the load balancer. To make that pick a live node, quickly, the bootstrap sets:

1. Every control-plane address as an endpoint of `xds_cluster` (STATIC when all are IPs,
   STRICT_DNS otherwise), so there is someone else to go to.
2. A short stream retry back-off (`envoy_grpc.retry_policy.retry_back_off`, 0.1 s doubling to
   2 s instead of Envoy's 0.5 s to 30 s): after a few failures in a row the default would leave
   a proxy without a control plane for up to 30 s although a live node is there; the first
   retry comes within 0.1 s (Envoy jitters it in [0, base)).
3. Outlier detection on local-origin errors (`split_external_local_origin_errors`,
   `consecutive_local_origin_failure: 1`): the host whose connection just failed or reset is
   ejected at once, so the re-connect goes to another node instead of round-robin landing on
   the dead one again. `max_ejection_percent: 100` with Envoy's default panic threshold (50 %)
   means that when most nodes are out, Envoy still tries them all rather than none.
4. An active TCP health check (1 s): a node that is down is marked unhealthy even while the
   stream is elsewhere, so it is skipped on the next re-connect; a passing check un-ejects a
   node that came back (`successful_active_health_check_uneject_host`, on by default).
5. HTTP/2 keepalive PINGs on the xDS connection (every 0.4 s, 0.2 s timeout; Envoy extends the
   timeout while any frame arrives, so a busy stream is not cut): a node that is paused or cut
   off (no RST ever arrives) is left within ~0.6 s (interval + timeout, plus Envoy's 15 %
   interval jitter), which TCP alone would not do for minutes. Kernel TCP keepalive is set as a
   second line. The control plane's gRPC server must accept pings that often
   (`XDS_SERVER_GRPC_OPTIONS`: no ping strikes), or it ends the stream with GOAWAY
   "too_many_pings": measured with grpcio's defaults, and with
   `min_ping_interval_without_data_ms` 5000, the stream broke every ~11 s. The cost: one PING
   and its ACK per proxy every 0.4 s (2,500 per second for 1,000 proxies). Loosen it with
   `repstage-mesh bootstrap
   --keepalive-interval/--keepalive-timeout` where the network is slow or the nodes are far.
6. A short connect timeout (1 s) so a black-holed address fails fast.

All of these are fields of `XdsConnection`; `build_bootstrap` takes one.

Measured (integration/test_bootstrap_failover.py, three stub ADS servers on loopback): a killed
node's proxies were on another node 0.2-0.4 s later. With three real `serve` nodes
(bench/frozen_node.py, bench/RESULTS.md): the node an Envoy is on SIGSTOPped and a switch
committed by the other two, the Envoy routed the new primary 0.49-0.74 s after the commit
(p50 0.54 s; it was ~3.0 s with the former 2 s / 1 s keepalive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapDynamicResources,
    BootstrapStaticResources,
    LayeredRuntime,
    RuntimeLayer,
)
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
    OutlierDetection,
    UpstreamConnectionOptions,
)
from envoy_data_plane.envoy.config.core.v3 import (
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    BackoffStrategy,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HealthCheck,
    Http2ProtocolOptions,
    KeepaliveSettings,
    Node,
    RetryPolicy,
)
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.google.protobuf import Struct

from .clusters import tcp_keepalive
from .endpoints import is_ip_address, lb_endpoint, load_assignment, socket_address
from .health_checks import tcp_health_check
from .serialize import to_envoy_dict
from .sources import ads_config_source
from .type_urls import pack
from .xds_tls import XdsTls, xds_transport_socket

XDS_CLUSTER = "xds_cluster"
# gRPC server options the control plane needs for the keepalive PINGs this bootstrap sends.
XDS_SERVER_GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
)
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class XdsConnection:
    """How this Envoy talks to the control plane (see the module docstring for why)."""

    connect_timeout: timedelta = timedelta(seconds=1)
    retry_base_interval: timedelta = timedelta(milliseconds=100)
    retry_max_interval: timedelta = timedelta(seconds=2)
    keepalive_interval: timedelta = timedelta(milliseconds=400)
    keepalive_timeout: timedelta = timedelta(milliseconds=200)
    health_check_interval: timedelta | None = timedelta(seconds=1)
    outlier_detection: bool = True

    def __post_init__(self) -> None:
        for field in (
            "connect_timeout",
            "retry_base_interval",
            "keepalive_interval",
            "keepalive_timeout",
        ):
            if getattr(self, field) <= timedelta(0):
                raise ValueError(f"{field}: must be positive")
        if self.retry_max_interval < self.retry_base_interval:
            raise ValueError("retry_max_interval: must be >= retry_base_interval")
        if self.health_check_interval is not None and self.health_check_interval <= timedelta(0):
            raise ValueError("health_check_interval: must be positive (or None for no check)")


def xds_cluster(
    xds: Sequence[tuple[str, int]],
    connection: XdsConnection = XdsConnection(),
    tls: XdsTls | None = None,
) -> Cluster:
    """The static HTTP/2 cluster of control-plane nodes that the ADS stream uses (over mTLS
    when `tls` is given, see xds_tls.py)."""
    if not xds:
        raise ValueError("xds: name at least one control-plane address")
    if len(set(xds)) != len(xds):
        raise ValueError(f"xds: addresses repeat: {list(xds)}")
    all_ips = all(is_ip_address(host) for host, _ in xds)
    return Cluster(
        name=XDS_CLUSTER,
        type=ClusterDiscoveryType.STATIC if all_ips else ClusterDiscoveryType.STRICT_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.AUTO
        if all_ips
        else ClusterDnsLookupFamily.V4_PREFERRED,
        connect_timeout=connection.connect_timeout,
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=load_assignment(
            XDS_CLUSTER, [lb_endpoint(host, port) for host, port in xds]
        ),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: _xds_http2_options(connection)},
        upstream_connection_options=UpstreamConnectionOptions(
            tcp_keepalive=tcp_keepalive(
                probes=3, time=timedelta(seconds=5), interval=timedelta(seconds=1)
            )
        ),
        health_checks=_xds_health_checks(connection),
        outlier_detection=_xds_outlier_detection(connection),
        transport_socket=xds_transport_socket(tls) if tls is not None else None,
    )


def _xds_http2_options(connection: XdsConnection) -> Any:
    """HTTP/2 with keepalive PINGs, packed for `typed_extension_protocol_options` (point 5)."""
    h2 = Http2ProtocolOptions(
        connection_keepalive=KeepaliveSettings(
            interval=connection.keepalive_interval, timeout=connection.keepalive_timeout
        )
    )
    return pack(
        HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=h2)
        )
    )


def _xds_health_checks(connection: XdsConnection) -> list[HealthCheck]:
    """The active TCP health check of every control-plane node (point 4), if enabled."""
    if connection.health_check_interval is None:
        return []
    timeout = min(connection.health_check_interval, timedelta(seconds=1))
    return [
        tcp_health_check(
            interval=connection.health_check_interval,
            timeout=timeout,
            unhealthy_threshold=1,
            healthy_threshold=1,
        )
    ]


def _xds_outlier_detection(connection: XdsConnection) -> OutlierDetection | None:
    """Eject the node whose connection just failed, at once (point 3), if enabled."""
    if not connection.outlier_detection:
        return None
    return OutlierDetection(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=1,
        enforcing_consecutive_local_origin_failure=100,
        interval=timedelta(seconds=1),
        base_ejection_time=timedelta(seconds=5),
        max_ejection_percent=100,
    )


def build_bootstrap(
    node_id: str,
    xds: list[tuple[str, int]],
    admin_port: int,
    delta: bool = False,
    node_cluster: str = "repstage",
    *,
    admin_address: str = "127.0.0.1",
    connection: XdsConnection = XdsConnection(),
    static_clusters: Sequence[Cluster] = (),
    static_listeners: Sequence[Listener] = (),
    runtime: Mapping[str, Any] | None = None,
    tls: XdsTls | None = None,
) -> dict[str, Any]:
    """An Envoy bootstrap (a dict to dump as YAML/JSON) that takes everything else over ADS.

    `delta` picks the incremental protocol (DELTA_GRPC) instead of state-of-the-world (GRPC).
    `static_clusters`/`static_listeners` are added as static resources (for example an OTLP
    collector cluster); `runtime` becomes a static runtime layer; `tls` makes the xDS
    connection mTLS (xds_tls.py).
    """
    if not node_id:
        raise ValueError("node_id: must not be empty")
    if not node_cluster:
        raise ValueError("node_cluster: must not be empty")
    names = [c.name for c in static_clusters]
    if XDS_CLUSTER in names or len(set(names)) != len(names):
        raise ValueError(f"static_clusters: names must be unique and not {XDS_CLUSTER!r}: {names}")
    bootstrap = Bootstrap(
        node=Node(id=node_id, cluster=node_cluster),
        admin=Admin(address=socket_address(admin_address, admin_port)),
        dynamic_resources=_ads_resources(delta, connection),
        static_resources=BootstrapStaticResources(
            clusters=[xds_cluster(xds, connection, tls), *static_clusters],
            listeners=list(static_listeners),
        ),
        layered_runtime=_static_runtime(runtime),
    )
    return to_envoy_dict(bootstrap)


def _ads_resources(delta: bool, connection: XdsConnection) -> BootstrapDynamicResources:
    """Everything else (clusters, listeners and what they name) over one ADS stream to
    `xds_cluster`, re-opened with a short back-off (point 2)."""
    grpc = GrpcService(
        envoy_grpc=GrpcServiceEnvoyGrpc(
            cluster_name=XDS_CLUSTER,
            retry_policy=RetryPolicy(
                retry_back_off=BackoffStrategy(
                    base_interval=connection.retry_base_interval,
                    max_interval=connection.retry_max_interval,
                )
            ),
        )
    )
    return BootstrapDynamicResources(
        ads_config=ApiConfigSource(
            api_type=ApiConfigSourceApiType.DELTA_GRPC if delta else ApiConfigSourceApiType.GRPC,
            transport_api_version=ApiVersion.V3,
            grpc_services=[grpc],
            set_node_on_first_message_only=True,
        ),
        cds_config=ads_config_source(),
        lds_config=ads_config_source(),
    )


def _static_runtime(runtime: Mapping[str, Any] | None) -> LayeredRuntime | None:
    if not runtime:
        return None
    return LayeredRuntime(
        layers=[RuntimeLayer(name="static", static_layer=Struct.from_dict(dict(runtime)))]
    )
