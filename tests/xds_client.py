"""A raw ADS client for tests and benches: sends DiscoveryRequest / DeltaDiscoveryRequest
bytes (built with envoy-data-plane) over grpcio and reads the responses, so a test can be
the abusive client a real Envoy never is."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from grpc import aio

SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
CLUSTERS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def sotw_request(type_url: str = CLUSTERS, names: tuple[str, ...] = (), version: str = "", nonce: str = "",
                 node_id: str | None = None) -> bytes:
    return bytes(DiscoveryRequest(
        version_info=version, node=Node(id=node_id, cluster="test") if node_id else None,
        resource_names=list(names), type_url=type_url, response_nonce=nonce,
    ))


def delta_request(type_url: str = CLUSTERS, subscribe: tuple[str, ...] = (), nonce: str = "",
                  initial: dict[str, str] | None = None, node_id: str | None = None) -> bytes:
    return bytes(DeltaDiscoveryRequest(
        node=Node(id=node_id, cluster="test") if node_id else None, type_url=type_url,
        resource_names_subscribe=list(subscribe), initial_resource_versions=initial or {},
        response_nonce=nonce,
    ))


class AdsClient:
    """One ADS stream. `send` queues a request; `receive` waits for the next response;
    `status()` is the stream's end status once it ended."""

    def __init__(self, channel: aio.Channel, delta: bool = False) -> None:
        self.delta = delta
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        method = channel.stream_stream(DELTA if delta else SOTW)
        self.call = method(self._requests())

    async def _requests(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    def send(self, data: bytes) -> None:
        self._queue.put_nowait(data)

    async def receive(self, timeout: float = 5.0) -> DiscoveryResponse | DeltaDiscoveryResponse:
        async with asyncio.timeout(timeout):
            data = await self.call.read()
        if data is aio.EOF:
            raise EOFError(f"stream ended: {await self.call.code()} {await self.call.details()}")
        assert isinstance(data, bytes)
        return DeltaDiscoveryResponse.parse(data) if self.delta else DiscoveryResponse.parse(data)

    async def status(self, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
        async with asyncio.timeout(timeout):
            with contextlib.suppress(grpc.RpcError):
                while await self.call.read() is not aio.EOF:
                    pass  # the status comes after the responses still unread
            code = await self.call.code()
            details = await self.call.details()
        return code, details or ""

    def close(self) -> None:
        self._queue.put_nowait(None)
        with contextlib.suppress(Exception):
            self.call.cancel()


def raw_call(channel: aio.Channel, delta: bool = False) -> AdsClient:
    return AdsClient(channel, delta)
