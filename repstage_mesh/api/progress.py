"""Proxy progress across nodes, both sides: the endpoint `GET /v1/proxies/progress` (added with
`build_app(..., extra_operations=progress_operations())`) and `PeerProgress`, the client the
leader uses to wait on another node's proxies during a failover.

The endpoint is a long-poll: `?min_index=N&wait=S` answers as soon as every proxy connected to
this node holds a snapshot at or after N (woken by the ACK that does it, `xds/progress.py`),
or after S seconds with the proxies still behind and why (a NACK carries Envoy's error). The
answer is compact: the lowest index every proxy holds, and the proxies behind; `acked` lists
each proxy that reached N (seconds ago), so a failover record can name every node's proxies.
A peer's cost per change is one dict operation per open wait; `GET /v1/proxies` stays the
full table for people.
"""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, Field

from repstage_mesh.api.errors import ApiError
from repstage_mesh.api.http import ok, plane
from repstage_mesh.api.openapi import Operation
from repstage_mesh.core.errors import ApiUnreachable
from repstage_mesh.failover.proxies import Progress
from repstage_mesh.xds.progress import Behind

MAX_WAIT = 600.0  # seconds: the longest long-poll (the switchover timeout's bound)
PATH = "/v1/proxies/progress"


class BehindView(BaseModel):
    proxy: str = Field(description="<envoy node id>#<stream id>")
    synced_index: int = Field(description="the highest index the proxy was seen holding (-1: none yet)")
    state: str = Field(description="pending (a response in flight), behind, or nacked (Envoy refused it)")
    error: str | None = Field(default=None, description="Envoy's error text, for a NACK")


class ProgressView(BaseModel):
    """How far this node's proxies are (GET /v1/proxies/progress)."""

    node_id: str
    min_index: int
    satisfied: bool = Field(description="every connected proxy holds a snapshot at or after min_index")
    low_water: int | None = Field(description="the lowest index every connected proxy holds (null: none connected)")
    connected: int
    acked: dict[str, float] = Field(default_factory=dict, description="proxy -> seconds since it reached min_index")
    behind: list[BehindView] = Field(default_factory=list)


def _number(request: web.Request, name: str, kind: type[int] | type[float], low: float, high: float) -> Any:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError(400, "invalid", f"{name}: expected a number, got {raw!r}", name) from None
    if not low <= value <= high:
        raise ApiError(400, "invalid", f"{name}: must be between {low:g} and {high:g}, got {raw}", name)
    return value


async def proxy_progress(request: web.Request) -> web.Response:
    unknown = sorted(set(request.query) - {"min_index", "wait"})
    if unknown:
        raise ApiError(400, "invalid", f"{unknown[0]}: unknown query parameter (known: min_index, wait)", unknown[0])
    min_index = _number(request, "min_index", int, 0, 2**63 - 1)
    if min_index is None:
        raise ApiError(400, "invalid", "min_index: required (the Raft index to wait for)", "min_index")
    wait = _number(request, "wait", float, 0.0, MAX_WAIT) or 0.0
    answer = await plane(request).proxy_progress(min_index, wait)
    return ok(view_of(answer, min_index))


def view_of(answer: Progress, min_index: int) -> ProgressView:
    return ProgressView(
        node_id=answer.node_id, min_index=min_index, satisfied=answer.satisfied,
        low_water=answer.low_water, connected=answer.connected, acked=answer.acked_ago,
        behind=[BehindView(proxy=b.proxy, synced_index=b.synced_index, state=b.state, error=b.error or None)
                for b in answer.behind],
    )


def progress_of(view: ProgressView) -> Progress:
    return Progress(
        node_id=view.node_id, satisfied=view.satisfied, acked_ago=dict(view.acked),
        behind=[Behind(b.proxy, b.synced_index, b.state, b.error or "") for b in view.behind],
        low_water=view.low_water, connected=view.connected,
    )


def progress_operations() -> list[Operation]:
    return [
        Operation("GET", PATH, "proxyProgress", "Long-poll: do this node's proxies hold an index yet?",
                  proxy_progress, {200: ("this node's proxy progress", ProgressView)}, errors=(400,),
                  tag="proxies",
                  query_params={
                      "min_index": ("the Raft index to wait for (required)", {"type": "integer", "minimum": 0}),
                      "wait": (f"longest wait in seconds (default 0: answer at once; at most {MAX_WAIT:g})",
                               {"type": "number", "minimum": 0, "maximum": MAX_WAIT, "default": 0}),
                  },
                  description="Answers once every connected proxy holds a snapshot at or after min_index "
                  "(woken by the ACK), or after `wait` seconds. A NACKed proxy is behind, with Envoy's error. "
                  "The failover leader uses it to wait on every node's proxies."),
    ]  # fmt: skip


class PeerProgress:
    """Another node's proxy progress over its REST API (failover.proxies.RemoteProgress)."""

    def __init__(self, node_id: str, api: str, token: str | None, tls: ssl.SSLContext | None = None) -> None:
        self._node_id = node_id
        self.api = api
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.tls = tls  # HTTPS with this context when the cluster's API uses TLS (api.tls)
        self.scheme = "https" if tls is not None else "http"

    @property
    def node_id(self) -> str:
        return self._node_id

    async def progress(self, min_index: int, wait: float, timeout: float) -> Progress:
        url = f"{self.scheme}://{self.api}{PATH}"
        params = {"min_index": str(min_index), "wait": f"{min(wait, MAX_WAIT):.3f}"}
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout), headers=self.headers
            ) as session, session.get(
                url, params=params, ssl=self.tls if self.tls is not None else True
            ) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise ApiUnreachable(f"GET {PATH} on {self.node_id} ({self.api}): {exc!r}") from exc
        if status != 200:
            raise ApiUnreachable(f"GET {PATH} on {self.node_id} ({self.api}) answered HTTP {status}: {body}")
        return progress_of(ProgressView.model_validate(body))
