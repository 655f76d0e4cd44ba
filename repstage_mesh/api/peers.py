"""The client side of our own REST API, as one control-plane node calls another: carrying a
request to the Raft leader (`PeerClient`). (How far the other nodes' proxies are during a
failover: `api/progress.PeerProgress`.)

Answers come back as domain results and domain errors: a 2xx answer's JSON, or
`ApiRequestError` with the peer's status, code, message, field and details, or
`ApiUnreachable` when there was no usable answer.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiohttp

from repstage_mesh.core.errors import ApiRequestError, ApiUnreachable

FORWARDED_HEADER = "X-Repstage-Forwarded-By"  # set on a forwarded request: the forwarding node's id
# The timeout chain of a switchover (README "Timeouts"): the leader holds the request at most
# `wait` seconds (api.switchover_wait caps it) and then answers, finished or not; a follower
# that forwards it waits `wait + FORWARD_MARGIN`; the CLI waits `wait + 2 * FORWARD_MARGIN`.
FORWARD_MARGIN = 5.0
READ_FORWARD_TIMEOUT = 5.0  # seconds for a forwarded GET /v1/failovers[/{id}] (the CLI waits 10)
# Seconds an idle kept-alive connection to a peer is kept: well below aiohttp's server default
# (75 s), so this side always closes first and a request never meets a connection the peer is
# closing (which would turn a forwarded write into "no answer: it may have been carried out").
IDLE_KEEPALIVE = 15.0


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
    """Carries a request to another node's REST API: one hop. The request is marked with
    FORWARDED_HEADER (this node's id), so the receiver never forwards it again, and carries
    the caller's own Authorization header, so the receiver checks the caller's token."""

    def __init__(self, node_id: str, tls: ssl.SSLContext | None = None) -> None:
        self.node_id = node_id
        self.tls = tls  # HTTPS with this context when the cluster's API uses TLS (api.tls)
        self.scheme = "https" if tls is not None else "http"
        # One session, kept-alive connections: a forwarded write costs no TCP (or TLS) handshake
        # and no new session (measured: the forward hop was most of a follower's announce).
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> aiohttp.ClientSession:
        session, loop = self._session, asyncio.get_running_loop()
        if session is None or session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(keepalive_timeout=IDLE_KEEPALIVE, limit=0)
            session, self._loop = aiohttp.ClientSession(connector=connector), loop
            self._session = session
        return session

    async def close(self) -> None:
        """Close the kept-alive connections (the node calls it when it stops)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def call(
        self, api: str, method: str, path: str, body: Any = None, *,
        authorization: str | None = None, timeout: float = READ_FORWARD_TIMEOUT,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """`method path` on the node whose API answers at `api` (HOST:PORT). `path` must be
        quoted already. Raises ApiRequestError (the peer's error answer), ApiUnreachable (no
        connection: the request never reached the peer) or ApiNoAnswer (sent, but no usable
        answer within `timeout`: it may have been carried out). `headers` are added (e.g. a
        caller's W3C traceparent)."""
        headers = {**(headers or {}), FORWARDED_HEADER: self.node_id}
        if authorization:
            headers["Authorization"] = authorization
        try:
            async with self._client().request(
                method, f"{self.scheme}://{api}{path}", json=body, headers=headers,
                ssl=self.tls if self.tls is not None else True, timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            raise ApiUnreachable(f"{method} {path} on {api}: cannot connect ({exc})") from exc
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise ApiNoAnswer(f"{method} {path} on {api}: no answer within {timeout:g} s ({exc!r})") from exc
        if status >= 400:
            raise _error_of(status, answer)
        return answer


class ApiNoAnswer(ApiUnreachable):
    """A request was sent to a peer but no usable answer came back (timeout, connection lost,
    not JSON): what it asked for may or may not have been carried out."""
