"""Reading xDS requests off the wire, within the limits (`limits.XdsLimits`).

Requests are read by a wire scan (betterproto2's parse costs ~40 µs each), the node too; only
its metadata (a `google.protobuf.Struct`) is parsed with envoy-data-plane. Not importing
`config.core.v3` keeps an xDS worker's start ~0.4 s of CPU shorter. Repeated fields are counted while
they are read, so a request naming a million resources is refused after `max_resource_names`
of them, without building the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from envoy_data_plane.google.protobuf import Struct

from . import wire
from .limits import LimitExceeded, XdsLimits, check_name, check_type_url, count_or_raise
from .protocol import DeltaRequest, NodeInfo, SotwRequest

if TYPE_CHECKING:
    from envoy_data_plane.envoy.config.core.v3 import Node

DEFAULT_LIMITS = XdsLimits()
MAX_VERSION_BYTES = 128
_NODE_ID, _NODE_CLUSTER, _NODE_METADATA, _NODE_USER_AGENT = 1, 2, 3, 6


class NodeReading:
    """What was cut while reading a request (the server counts it): the size of node metadata
    that was dropped, whether a NACK's error text was cut."""

    dropped_metadata: int = 0
    cut_error: bool = False


def _error(value: bytes, limits: XdsLimits, reading: NodeReading | None) -> str:
    text = wire.decode_status(value)
    if len(text) > limits.max_error_detail_bytes:
        text = text[: limits.max_error_detail_bytes] + "..."
        if reading is not None:
            reading.cut_error = True
    return text


def node_info(node: Node | None) -> NodeInfo | None:
    if node is None:
        return None
    metadata: dict[str, object] = {}
    if node.metadata is not None:
        try:
            metadata = dict(node.metadata.to_dict())
        except Exception:  # metadata is informative only
            metadata = {}
    return NodeInfo(id=node.id, cluster=node.cluster, metadata=metadata, user_agent=node.user_agent_name)


def parse_node(data: bytes, limits: XdsLimits = DEFAULT_LIMITS, reading: NodeReading | None = None) -> NodeInfo | None:
    """config.core.v3.Node within the limits: an id or cluster over `max_node_id_bytes` is
    refused; metadata over `max_node_metadata_bytes` is dropped (neither stored nor echoed);
    the user agent is cut to `max_node_id_bytes`."""
    fields = {_NODE_ID: "", _NODE_CLUSTER: "", _NODE_USER_AGENT: ""}
    metadata: list[bytes] = []
    for number, wire_type, value in wire.iter_fields(data):
        if not isinstance(value, bytes) or wire_type != 2:
            continue  # Node has no scalar field we read
        if number in (_NODE_ID, _NODE_CLUSTER) and len(value) > limits.max_node_id_bytes:
            what = "node.id" if number == _NODE_ID else "node.cluster"
            raise LimitExceeded(
                "node_id",
                f"{what} is {len(value)} bytes; the limit is {limits.max_node_id_bytes} "
                "(xds.limits.max_node_id_bytes)",
                "INVALID_ARGUMENT",
            )
        if number == _NODE_METADATA:
            if len(value) > limits.max_node_metadata_bytes:
                if reading is not None:
                    reading.dropped_metadata = len(value)
                continue
            metadata.append(value)  # a message given twice is the two merged, as protobuf reads it
        elif number == _NODE_USER_AGENT:  # cut to the limit, never inside a character
            fields[number] = value[: limits.max_node_id_bytes].decode("utf-8", errors="ignore")
        elif number in fields:
            fields[number] = value.decode()  # the last one wins; not UTF-8: refused, as protobuf
    struct = Struct.parse(b"".join(metadata)) if metadata else None
    meta: dict[str, object] = {}
    if struct is not None:
        try:
            meta = dict(struct.to_dict())
        except Exception:  # metadata is informative only
            meta = {}
    return NodeInfo(id=fields[_NODE_ID], cluster=fields[_NODE_CLUSTER], metadata=meta,
                    user_agent=fields[_NODE_USER_AGENT])


def parse_sotw(data: bytes, limits: XdsLimits = DEFAULT_LIMITS, reading: NodeReading | None = None) -> SotwRequest:
    """DiscoveryRequest{version_info=1, node=2, resource_names=3, type_url=4,
    response_nonce=5, error_detail=6}."""
    version = type_url = nonce = ""
    names: list[str] = []
    node: NodeInfo | None = None
    error: str | None = None
    for number, _, value in wire.iter_fields(data):
        if not isinstance(value, bytes):
            continue
        if number == 1:
            # Longer than any version this server issues (`<index>-<digest>`): not kept.
            version = value.decode() if len(value) <= MAX_VERSION_BYTES else ""
        elif number == 2:
            node = parse_node(value, limits, reading)
        elif number == 3:
            check_name(value, limits)
            names.append(value.decode())
            count_or_raise(len(names), limits.max_resource_names, "resource_names", "resource_names in one request")
        elif number == 4:
            type_url = value.decode()
            check_type_url(type_url, limits)
        elif number == 5:
            nonce = value.decode()
        elif number == 6:
            error = _error(value, limits, reading)
    return SotwRequest(type_url, version, nonce, tuple(names), error, node)


def parse_delta(data: bytes, limits: XdsLimits = DEFAULT_LIMITS, reading: NodeReading | None = None) -> DeltaRequest:
    """DeltaDiscoveryRequest{node=1, type_url=2, resource_names_subscribe=3,
    resource_names_unsubscribe=4, initial_resource_versions=5, response_nonce=6,
    error_detail=7}."""
    type_url = nonce = ""
    subscribe: list[str] = []
    unsubscribe: list[str] = []
    initial: dict[str, str] = {}
    node: NodeInfo | None = None
    error: str | None = None
    for number, _, value in wire.iter_fields(data):
        if not isinstance(value, bytes):
            continue
        if number == 1:
            node = parse_node(value, limits, reading)
        elif number == 2:
            type_url = value.decode()
            check_type_url(type_url, limits)
        elif number == 3:
            check_name(value, limits)
            subscribe.append(value.decode())
            count_or_raise(len(subscribe), limits.max_resource_names, "resource_names", "resource_names_subscribe in one request")
        elif number == 4:
            check_name(value, limits)
            unsubscribe.append(value.decode())
            count_or_raise(len(unsubscribe), limits.max_resource_names, "resource_names", "resource_names_unsubscribe in one request")
        elif number == 5:
            check_name(value, limits)  # key and version together
            key, version = wire.decode_map_entry(value)
            initial[key] = version
            count_or_raise(
                len(initial), limits.max_initial_resource_versions, "initial_resource_versions",
                "initial_resource_versions entries",
            )
        elif number == 6:
            nonce = value.decode()
        elif number == 7:
            error = _error(value, limits, reading)
    return DeltaRequest(type_url, tuple(subscribe), tuple(unsubscribe), initial, nonce, error, node)
