"""Endpoints: ClusterLoadAssignments (the EDS resource) and the LbEndpoints inside them."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from envoy_data_plane.envoy.config.core.v3 import Address, HealthStatus, Metadata, SocketAddress
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    EndpointHealthCheckConfig,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.google.protobuf import Struct

MetadataValue = str | int | float | bool

__all__ = [
    "HealthStatus",
    "MetadataValue",
    "is_ip_address",
    "lb_endpoint",
    "load_assignment",
    "socket_address",
]


def is_ip_address(address: str) -> bool:
    """True for an IPv4/IPv6 literal (what EDS accepts), False for a DNS name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _check_port(field: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"{field}: must be a port in 1..65535, got {port}")


def socket_address(address: str, port: int) -> Address:
    """A TCP `Address` (IP or DNS name) and port."""
    if not address:
        raise ValueError("address: must not be empty")
    _check_port("port", port)
    return Address(socket_address=SocketAddress(address=address, port_value=port))


def _metadata(metadata: Mapping[str, Mapping[str, MetadataValue]]) -> Metadata:
    # Sorted keys: the same input serialises to the same bytes.
    return Metadata(
        filter_metadata={
            namespace: Struct.from_dict({k: fields[k] for k in sorted(fields)})
            for namespace, fields in sorted(metadata.items())
        }
    )


def lb_endpoint(
    address: str,
    port: int,
    *,
    health_status: HealthStatus = HealthStatus.HEALTHY,
    health_check_address: str | None = None,
    health_check_port: int | None = None,
    health_check_hostname: str | None = None,
    metadata: Mapping[str, Mapping[str, MetadataValue]] | None = None,
) -> LbEndpoint:
    """One upstream host.

    `health_check_address`/`health_check_port` send active health checks for this host
    somewhere else than its traffic address (for example to a fence listener on the Envoy
    itself); either may be given alone. `health_check_hostname` is the Host header of this
    host's HTTP health checks (the check's path is per cluster, the Host is per endpoint).
    """
    health_check_config = None
    overrides = (health_check_address, health_check_port, health_check_hostname)
    if any(o is not None for o in overrides):
        if health_check_port is not None:
            _check_port("health_check_port", health_check_port)
        health_check_config = EndpointHealthCheckConfig(
            port_value=health_check_port or 0,
            hostname=health_check_hostname or "",
            address=(
                socket_address(health_check_address, health_check_port or port)
                if health_check_address is not None
                else None
            ),
        )
    return LbEndpoint(
        endpoint=Endpoint(
            address=socket_address(address, port), health_check_config=health_check_config
        ),
        health_status=health_status,
        metadata=_metadata(metadata) if metadata else None,
    )


def load_assignment(cluster_name: str, endpoints: Sequence[LbEndpoint]) -> ClusterLoadAssignment:
    """The EDS resource for `cluster_name`. No endpoints is valid: the cluster routes nowhere."""
    if not cluster_name:
        raise ValueError("cluster_name: must not be empty")
    return ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[LocalityLbEndpoints(lb_endpoints=list(endpoints))] if endpoints else [],
    )
