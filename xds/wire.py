"""Protobuf wire framing for the few xDS messages we send, so a response is assembled from
bytes encoded once and shared by every stream (encode once, fan out).

Protobuf serialisation of a message is the concatenation of its fields, so a
`DiscoveryResponse` is `version_info + resources... + type_url + nonce`: everything but the
nonce is the same for every stream that gets the same resources. The tests check every
function here against betterproto2's own encoder and parser.
"""

from __future__ import annotations

from collections.abc import Iterable

_LEN = 2  # wire type "length-delimited"


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or sub-message)."""
    return varint((number << 3) | _LEN) + varint(len(payload)) + payload


def string_field(number: int, text: str) -> bytes:
    return field(number, text.encode()) if text else b""


def encode_any(type_url: str, value: bytes) -> bytes:
    """google.protobuf.Any{type_url=1, value=2} without betterproto2's slow Any.pack."""
    return string_field(1, type_url) + (field(2, value) if value else b"")


def encode_delta_resource(name: str, version: str, any_bytes: bytes) -> bytes:
    """envoy.service.discovery.v3.Resource{version=1, resource=2, name=3}."""
    return string_field(1, version) + field(2, any_bytes) + string_field(3, name)


def control_plane(identifier: str) -> bytes:
    """config.core.v3.ControlPlane{identifier=1}."""
    return string_field(1, identifier)


def sotw_body(version: str, any_resources: Iterable[bytes], type_url: str) -> bytes:
    """DiscoveryResponse without nonce: version_info=1, resources=2 (Any), type_url=4."""
    parts = [string_field(1, version)]
    parts.extend(field(2, item) for item in any_resources)
    parts.append(string_field(4, type_url))
    return b"".join(parts)


def sotw_tail(nonce: str, control_plane_id: str = "") -> bytes:
    """The per-stream part of a DiscoveryResponse: nonce=5, control_plane=6."""
    tail = string_field(5, nonce)
    if control_plane_id:
        tail += field(6, control_plane(control_plane_id))
    return tail


def delta_response(
    system_version: str,
    encoded_resources: Iterable[bytes],
    type_url: str,
    removed: Iterable[str],
    nonce: str,
    control_plane_id: str = "",
) -> bytes:
    """DeltaDiscoveryResponse: system_version_info=1, resources=2 (Resource), type_url=4,
    nonce=5, removed_resources=6, control_plane=7."""
    parts = [string_field(1, system_version)]
    parts.extend(field(2, item) for item in encoded_resources)
    parts.append(string_field(4, type_url))
    parts.append(string_field(5, nonce))
    parts.extend(field(6, name.encode()) for name in removed)
    if control_plane_id:
        parts.append(field(7, control_plane(control_plane_id)))
    return b"".join(parts)
