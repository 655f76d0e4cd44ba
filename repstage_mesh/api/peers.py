"""The client side of our own REST API, as one control-plane node calls another: carrying a
request to the Raft leader (`PeerClient`). (How far the other nodes' proxies are during a
failover: `api/progress.PeerProgress`.)

Answers come back as domain results and domain errors: a 2xx answer's JSON, or
`ApiRequestError` with the peer's status, code, message, field and details, or
`ApiUnreachable` when there was no usable answer.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from repstage_mesh.core.errors import ApiRequestError, ApiUnreachable

FORWARD_TIMEOUT = 660.0  # seconds: a forwarded switchover may wait for catch-up and proxies


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

    async def call(self, api: str, method: str, path: str, body: Any = None) -> Any:
        """`method path` on the node whose API answers at `api` (HOST:PORT)."""
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as session, session.request(
                method, f"http://{api}{path}", json=body, headers=self.headers
            ) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise ApiUnreachable(f"{method} {path} on {api}: {exc!r}") from exc
        if status >= 400:
            raise _error_of(status, answer)
        return answer
