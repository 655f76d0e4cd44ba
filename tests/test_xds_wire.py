"""Our hand framing must be what betterproto2 (the reference encoder) parses back."""

from __future__ import annotations

from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryResponse, DiscoveryResponse
from hypothesis import given
from hypothesis import strategies as st

from repstage_mesh.xds import resources as res
from repstage_mesh.xds import wire
from repstage_mesh.xds.cache import EncodedResource, Snapshot

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=40)


@given(st.integers(min_value=0, max_value=2**63))
def test_varint_matches_protobuf(value: int) -> None:
    data = wire.varint(value)
    decoded, shift = 0, 0
    for byte in data:
        decoded |= (byte & 0x7F) << shift
        shift += 7
    assert decoded == value
    assert all(b & 0x80 for b in data[:-1]) and not data[-1] & 0x80


@given(st.lists(names, min_size=0, max_size=5, unique=True), st.text(max_size=20), st.text(max_size=10))
def test_sotw_response_parses(cluster_names: list[str], version: str, nonce: str) -> None:
    items = [EncodedResource.from_message(ClusterLoadAssignment(cluster_name=n)) for n in cluster_names]
    data = wire.sotw_body(version, (i.any_bytes for i in items), res.ENDPOINT) + wire.sotw_tail(nonce, "cp-1")
    parsed = DiscoveryResponse.parse(data)
    assert parsed.version_info == version
    assert parsed.nonce == nonce
    assert parsed.type_url == res.ENDPOINT
    assert parsed.control_plane is not None and parsed.control_plane.identifier == "cp-1"
    assert [r.type_url for r in parsed.resources] == [res.ENDPOINT] * len(items)
    assert [ClusterLoadAssignment.parse(r.value).cluster_name for r in parsed.resources] == cluster_names


@given(st.lists(names, max_size=4, unique=True), st.lists(names, max_size=4), st.text(max_size=10))
def test_delta_response_parses(cluster_names: list[str], removed: list[str], nonce: str) -> None:
    items = [EncodedResource.from_message(ClusterLoadAssignment(cluster_name=n)) for n in cluster_names]
    data = wire.delta_response("7", (i.delta_bytes for i in items), res.ENDPOINT, removed, nonce, "cp")
    parsed = DeltaDiscoveryResponse.parse(data)
    assert parsed.system_version_info == "7"
    assert parsed.nonce == nonce
    assert parsed.removed_resources == removed
    assert [r.name for r in parsed.resources] == cluster_names
    assert [r.version for r in parsed.resources] == [i.version for i in items]
    for r in parsed.resources:
        assert r.resource is not None
        assert ClusterLoadAssignment.parse(r.resource.value).cluster_name == r.name


def test_snapshot_memoises_body_and_refuses_dangling_references() -> None:
    cla = ClusterLoadAssignment(cluster_name="a")
    snap = Snapshot.build(3, {res.ENDPOINT: {"a": cla}})
    items = tuple(snap.get(res.ENDPOINT).values())
    body = snap.sotw_body(res.ENDPOINT, items, "3-x")
    assert snap.sotw_body(res.ENDPOINT, items, "3-x") is body
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType

    try:
        Snapshot.build(4, {res.CLUSTER: {"b": Cluster(name="b", type=ClusterDiscoveryType.EDS)}})
    except ValueError as exc:
        assert "missing" in str(exc) and "'b'" in str(exc)
    else:  # pragma: no cover - the assertion below documents the failure
        raise AssertionError("a cluster without its load assignment must be refused")


# --- requests: our wire scan must read what betterproto2 writes ---------------------------------

from envoy_data_plane.envoy.config.core.v3 import Node  # noqa: E402
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryRequest, DiscoveryRequest  # noqa: E402
from envoy_data_plane.google.rpc import Status  # noqa: E402

from repstage_mesh.xds.server import parse_delta, parse_sotw  # noqa: E402

texts = st.text(max_size=30)
type_urls = st.sampled_from(["", *res.ADS_ORDER])  # others are refused (tests/test_xds_limits.py)


@given(texts, st.lists(names, max_size=4), type_urls, texts, st.one_of(st.none(), st.tuples(st.integers(0, 16), texts)),
       st.booleans())
def test_parse_sotw_matches_betterproto2(version: str, resource_names: list[str], type_url: str, nonce: str,
                                         error: tuple[int, str] | None, with_node: bool) -> None:
    msg = DiscoveryRequest(
        version_info=version, resource_names=resource_names, type_url=type_url, response_nonce=nonce,
        error_detail=Status(code=error[0], message=error[1]) if error else None,
        node=Node(id="edge-1", cluster="c", user_agent_name="envoy") if with_node else None,
    )
    parsed = parse_sotw(bytes(msg))
    assert (parsed.version_info, list(parsed.resource_names), parsed.type_url, parsed.response_nonce) == (
        version, resource_names, type_url, nonce)
    assert parsed.error == (None if error is None else (error[1] or f"code {error[0]}"))
    assert (parsed.node is not None) == with_node
    if with_node:
        assert parsed.node is not None and (parsed.node.id, parsed.node.cluster) == ("edge-1", "c")


@given(type_urls, st.lists(names, max_size=3), st.lists(names, max_size=3),
       st.dictionaries(names, texts, max_size=3), texts, st.one_of(st.none(), texts))
def test_parse_delta_matches_betterproto2(type_url: str, sub: list[str], unsub: list[str], initial: dict[str, str],
                                          nonce: str, error: str | None) -> None:
    msg = DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=sub, resource_names_unsubscribe=unsub,
        initial_resource_versions=initial, response_nonce=nonce,
        error_detail=Status(code=3, message=error) if error is not None else None,
    )
    parsed = parse_delta(bytes(msg))
    assert (parsed.type_url, list(parsed.subscribe), list(parsed.unsubscribe), dict(parsed.initial_versions),
            parsed.response_nonce) == (type_url, sub, unsub, initial, nonce)
    assert parsed.error == (None if error is None else (error or "code 3"))


# --- the node: read by the wire scan, as betterproto2 reads it -----------------------------------

import pytest  # noqa: E402
from envoy_data_plane.google.protobuf import Struct  # noqa: E402

from repstage_mesh.xds.limits import XdsLimits  # noqa: E402
from repstage_mesh.xds.requests import NodeReading, node_info, parse_node  # noqa: E402

_meta_values = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))


@given(texts, texts, texts, st.one_of(st.none(), st.dictionaries(st.text(max_size=6), _meta_values, max_size=3)))
def test_parse_node_matches_betterproto2(ident: str, cluster: str, agent: str, meta: dict[str, object] | None) -> None:
    node = Node(id=ident, cluster=cluster, user_agent_name=agent,
                metadata=Struct.from_dict(meta) if meta is not None else None)
    assert parse_node(bytes(node)) == node_info(Node.parse(bytes(node)))


def test_parse_node_cuts_the_user_agent_between_characters_and_drops_big_metadata() -> None:
    limits = XdsLimits(max_node_id_bytes=7, max_node_metadata_bytes=40)
    node = Node(id="edge-1", user_agent_name="é" * 10, metadata=Struct.from_dict({"k": "v" * 60}))
    reading = NodeReading()
    info = parse_node(bytes(node), limits, reading)
    assert info is not None and info.user_agent == "ééé"  # 7 bytes cut to 6: no half character
    assert info.metadata == {} and reading.dropped_metadata > 40


def test_parse_node_merges_metadata_given_twice_and_refuses_an_id_that_is_not_utf8() -> None:
    one, two = bytes(Node(metadata=Struct.from_dict({"a": "1"}))), bytes(Node(metadata=Struct.from_dict({"b": "2"})))
    info = parse_node(one + two + bytes(Node(id="edge-2")))
    assert info is not None and info.metadata == {"a": "1", "b": "2"} and info.id == "edge-2"
    with pytest.raises(UnicodeDecodeError):
        parse_node(b"\x0a\x02\xff\xfe")
