"""Abusive xDS clients (issue 13): what an attacker reaching the xDS port can send. Used by
integration/test_xds_abuse.py (the acceptance sizes) and bench/xds_abuse.py."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from repstage_mesh.xds import resources as res
from tests.xds_client import CLUSTERS, AdsClient, delta_request, sotw_request


@dataclass
class Abuse:
    unknown_types: int = 10_000
    huge_type_url_bytes: int = 1024 * 1024
    resource_names: int = 1_000_000
    streams_from_one_peer: int = 5_000


@dataclass
class Outcome:
    codes: dict[str, str] = field(default_factory=dict)
    streams_refused: int = 0
    streams_served: int = 0
    holders: list[AdsClient] = field(default_factory=list)  # kept open: never-ACKing, future claim

    def as_dict(self) -> dict[str, Any]:
        return {"codes": self.codes, "streams_refused": self.streams_refused, "streams_served": self.streams_served}


async def _code(client: AdsClient) -> str:
    code, details = await client.status(timeout=30)
    return f"{code.name}: {details[:120]}"


async def unknown_types(channel: aio.Channel, count: int) -> str:
    client = AdsClient(channel)
    for i in range(count):
        client.send(sotw_request(f"type.googleapis.com/evil.Type{i}", node_id="evil-types" if i == 0 else None))
    try:
        return await _code(client)
    finally:
        client.close()


async def huge_type_url(channel: aio.Channel, size: int) -> str:
    client = AdsClient(channel)
    client.send(sotw_request("type.googleapis.com/" + "x" * size, node_id="evil-huge"))
    try:
        return await _code(client)
    finally:
        client.close()


async def many_names(channel: aio.Channel, count: int) -> tuple[str, str]:
    """All in one request (over the request size), then as Delta subscriptions in chunks."""
    one = AdsClient(channel)
    one.send(sotw_request(res.ENDPOINT, names=tuple(f"n{i}" for i in range(count)), node_id="evil-names"))
    chunked = AdsClient(channel, delta=True)
    chunk = 5_000
    for start in range(0, count, chunk):
        names = tuple(f"n{i}" for i in range(start, min(start + chunk, count)))
        chunked.send(delta_request(res.ENDPOINT, subscribe=names, node_id="evil-names-delta" if start == 0 else None))
    try:
        return await _code(one), await _code(chunked)
    finally:
        one.close()
        chunked.close()


async def many_streams(channel: aio.Channel, count: int) -> tuple[int, int, list[AdsClient]]:
    clients = [AdsClient(channel) for _ in range(count)]
    for i, client in enumerate(clients):
        client.send(sotw_request(CLUSTERS, node_id=f"evil-stream-{i}"))

    async def first(client: AdsClient) -> bool:
        try:
            await client.receive(timeout=60)
            return True
        except (EOFError, grpc.RpcError):
            return False

    served = await asyncio.gather(*(first(c) for c in clients))
    refused = [c for c, ok in zip(clients, served, strict=True) if not ok]
    for c in refused:
        c.close()
    return sum(served), len(refused), [c for c, ok in zip(clients, served, strict=True) if ok]


async def holders(channel: aio.Channel) -> list[AdsClient]:
    """A Delta client that never ACKs, and a SotW client claiming a version from the future;
    both stay connected."""
    never = AdsClient(channel, delta=True)
    never.send(delta_request(CLUSTERS, node_id="evil-never-acks"))
    future = AdsClient(channel)
    future.send(sotw_request(CLUSTERS, version="999999999-x", node_id="evil-future"))
    await never.receive(timeout=30)  # it was sent something, and will never answer
    return [never, future]


async def run(address: str, abuse: Abuse) -> Outcome:
    out = Outcome()
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.use_local_subchannel_pool", 1)]
    channel = aio.insecure_channel(address, options=options)
    out.codes["unknown_types"] = await unknown_types(channel, abuse.unknown_types)
    out.codes["huge_type_url"] = await huge_type_url(channel, abuse.huge_type_url_bytes)
    out.codes["names_one_request"], out.codes["names_delta_chunks"] = await many_names(channel, abuse.resource_names)
    out.holders = await holders(channel)
    served, refused, kept = await many_streams(channel, abuse.streams_from_one_peer)
    out.streams_served, out.streams_refused = served, refused
    for client in kept:
        client.close()
    out.holders.append(_ChannelKeeper(channel))  # type: ignore[arg-type]
    return out


class _ChannelKeeper:
    """Closes the channel with the holders."""

    def __init__(self, channel: aio.Channel) -> None:
        self.channel = channel

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().create_task(self.channel.close())
