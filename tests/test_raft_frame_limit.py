"""The frame limit before Raft authentication (raft/guard.py), at its boundary, on a real
socket: a peer that has not proven the password may declare at most
`unauthenticated_frame_limit` bytes; one byte more and the connection is dropped and counted."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from repstage_mesh.raft.store import ReplicatedStore
from repstage_mesh.telemetry.metrics import MeshMetrics
from tests.fakes import eventually

LIMIT = 4096


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReplicatedStore]:
    address = f"127.0.0.1:{free_port()}"
    refused: list[int] = []
    # a lone member of a 2-node cluster: it binds its Raft port, its peer never comes
    with ReplicatedStore(
        "n1", address, ["127.0.0.1:9"], tmp_path / "n1", password="frame-limit-password",
        unauthenticated_frame_limit=LIMIT, on_frame_refused=refused.append,
    ) as node:
        node.refused_sizes = refused  # type: ignore[attr-defined]
        yield node


def connect(store: ReplicatedStore) -> socket.socket:
    assert store.self_address is not None
    host, port = store.self_address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


async def test_a_frame_over_the_limit_is_dropped_before_it_is_buffered(store: ReplicatedStore) -> None:
    with connect(store) as sock:
        sock.sendall(struct.pack("i", LIMIT + 1) + b"x" * 100)
        assert closed_by_peer(sock)
    await eventually(lambda: store.frames_refused == 1, "the refusal is counted")
    assert store.refused_sizes == [LIMIT + 1]  # type: ignore[attr-defined]
    assert store.status()["frames_refused"] == 1


async def test_a_frame_at_the_limit_is_read_then_fails_authentication(store: ReplicatedStore) -> None:
    with connect(store) as sock:
        sock.sendall(struct.pack("i", LIMIT) + b"x" * LIMIT)
        assert closed_by_peer(sock)  # pysyncobj's own check: the frame does not decrypt
    assert store.frames_refused == 0


async def test_a_negative_length_is_dropped(store: ReplicatedStore) -> None:
    with connect(store) as sock:
        sock.sendall(struct.pack("i", -5) + b"x" * 10)
        assert closed_by_peer(sock)
    await eventually(lambda: store.frames_refused == 1, "the refusal is counted")


async def test_the_refusal_is_a_prometheus_counter(store: ReplicatedStore) -> None:
    registry = CollectorRegistry()
    MeshMetrics(registry, "n1", raft_status=store.status)
    assert b"repstage_raft_frames_refused_total 0.0" in generate_latest(registry)
    with connect(store) as sock:
        sock.sendall(struct.pack("i", 1 << 30))
        assert closed_by_peer(sock)
    await eventually(lambda: store.frames_refused == 1, "the refusal is counted")
    assert b"repstage_raft_frames_refused_total 1.0" in generate_latest(registry)
