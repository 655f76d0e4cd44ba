"""The client side of our own REST API, as one control-plane node calls another: carrying a
request to the Raft leader (`PeerClient`), and asking the other nodes how far their proxies
are during a failover (`PeerProxies`).

Answers come back as domain results and domain errors: a 2xx answer's JSON, or
`ApiRequestError` with the peer's status, code, message, field and details, or
`ApiUnreachable` when there was no usable answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from repstage_mesh.core.errors import ApiRequestError, ApiUnreachable
from repstage_mesh.core.models import NodeAddress

FORWARD_TIMEOUT = 660.0  # seconds: a forwarded switchover may wait for catch-up and proxies
PROXIES_TIMEOUT = 0.5  # seconds for one peer's GET /v1/proxies during a failover


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _error_of(status: int, body: Any) -> ApiRequestError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ApiRequestError(status, "http_error", f"the peer answered HTTP {status}")
    return ApiRequestError(
        status,
        str(error.get("code") or "http_error"),
        str(error.get("message") or f"the peer answered HTTP {status}"),
        error.get("field"),
        list(error.get("details") or []),
    )


class PeerClient:
    """Calls another node's REST API with this node's token."""

    def __init__(self, token: str | None, timeout: float = FORWARD_TIMEOUT) -> None:
        self.headers = _auth(token)
        self.timeout = timeout

    async def call(
        self, api: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        """`method path` on the node whose API answers at `api` (HOST:PORT); `headers` are
        added to this node's (e.g. a caller's W3C traceparent)."""
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as session, session.request(
                method, f"http://{api}{path}", json=body, headers={**(headers or {}), **self.headers}
            ) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise ApiUnreachable(f"{method} {path} on {api}: {exc!r}") from exc
        if status >= 400:
            raise _error_of(status, answer)
        return answer


class PeerProxies:
    """The other control-plane nodes' proxies, polled over their REST API during a failover
    (implements `failover.proxies.RemoteProxies`)."""

    def __init__(self, nodes: Sequence[NodeAddress], token: str | None) -> None:
        self.nodes = list(nodes)
        self.token = token
        self.done: set[str] = set()
        self.session: aiohttp.ClientSession | None = None

    async def pending(self, min_index: int, acked: dict[str, float]) -> list[str]:
        asking = [n for n in self.nodes if n.node_id not in self.done]
        if not asking:
            return []
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PROXIES_TIMEOUT), headers=_auth(self.token)
            )
        answers = await asyncio.gather(*(self._ask(n) for n in asking), return_exceptions=True)
        pending: list[str] = []
        for node, answer in zip(asking, answers, strict=True):
            if isinstance(answer, BaseException):
                pending.append(f"{node.node_id}:unreachable")
                continue
            behind = _behind(node.node_id, answer, min_index, acked)
            pending += behind
            if not behind:
                self.done.add(node.node_id)
        return pending

    async def _ask(self, node: NodeAddress) -> list[dict[str, Any]]:
        assert self.session is not None
        async with self.session.get(f"http://{node.api}/v1/proxies") as resp:
            if resp.status != 200:
                raise RuntimeError(f"{node.node_id}: /v1/proxies answered {resp.status}")
            return list(await resp.json())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _behind(node_id: str, proxies: list[dict[str, Any]], min_index: int, acked: dict[str, float]) -> list[str]:
    """Keys of `node_id`'s connected proxies not yet synced at `min_index`; records the others."""
    behind = []
    for proxy in proxies:
        if not proxy.get("connected"):
            continue
        key = f"{node_id}/{proxy.get('node_id')}#{proxy.get('stream_id')}"
        if key in acked:
            continue
        version = proxy.get("snapshot_version")
        if proxy.get("synced") and version is not None and int(version) >= min_index:
            acked[key] = time.monotonic()
        else:
            behind.append(key)
    return behind
