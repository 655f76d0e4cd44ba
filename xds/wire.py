"""Protobuf wire framing for the few xDS messages we send, so a response is assembled from
bytes encoded once and shared by every stream (encode once, fan out).

Protobuf serialisation of a message is the concatenation of its fields, so a
`DiscoveryResponse` is `version_info + resources... + type_url + nonce`: everything but the
nonce is the same for every stream that gets the same resources. The tests check every
function here against betterproto2's own encoder and parser.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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


RESOURCE_TYPE = "type.googleapis.com/envoy.service.discovery.v3.Resource"


def duration(seconds: float) -> bytes:
    """google.protobuf.Duration{seconds=1, nanos=2} (non-negative)."""
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    out = varint(1 << 3) + varint(whole) if whole else b""
    return out + (varint(2 << 3) + varint(nanos) if nanos else b"")


def encode_ttl_resource(name: str, version: str, any_bytes: bytes, ttl: float) -> bytes:
    """envoy.service.discovery.v3.Resource{version=1, resource=2, name=3, ttl=6}: a resource
    Envoy drops `ttl` seconds after it last received it (a lease)."""
    return encode_delta_resource(name, version, any_bytes) + field(6, duration(ttl))


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


# --- decoding: requests are read by a wire scan (betterproto2's parse costs ~40 µs each) ---------


def iter_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field: varints as int, length-delimited
    fields as bytes; fixed-width fields are returned as their raw bytes."""
    i, n = 0, len(data)
    while i < n:
        key, i = _read_varint(data, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _read_varint(data, i)
            yield number, wire_type, value
        elif wire_type == _LEN:
            length, i = _read_varint(data, i)
            if i + length > n:
                raise ValueError("truncated length-delimited field")
            yield number, wire_type, data[i : i + length]
            i += length
        elif wire_type == 1:
            yield number, wire_type, data[i : i + 8]
            i += 8
        elif wire_type == 5:
            yield number, wire_type, data[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} (field {number})")


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def decode_status(data: bytes) -> str:
    """google.rpc.Status{code=1, message=2} as Envoy's error text ("code N" when empty)."""
    code, message = 0, ""
    for number, _, value in iter_fields(data):
        if number == 1 and isinstance(value, int):
            code = value
        elif number == 2 and isinstance(value, bytes):
            message = value.decode()
    return message or f"code {code}"


def decode_map_entry(data: bytes) -> tuple[str, str]:
    key = value = ""
    for number, _, raw in iter_fields(data):
        if isinstance(raw, bytes):
            if number == 1:
                key = raw.decode()
            elif number == 2:
                value = raw.decode()
    return key, value
