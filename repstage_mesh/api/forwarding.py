"""Carrying a write to the Raft leader's API: one hop, the caller's own Authorization, and
the domain error that says what became of it when no answer came back (api/peers.PeerClient
does the HTTP). The node decides whether to forward (`Node._leader_api`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from repstage_mesh.api.peers import FORWARD_MARGIN, ApiNoAnswer, PeerClient
from repstage_mesh.api.plane import Caller
from repstage_mesh.core.errors import (
    ApiUnreachable,
    CommitTimeout,
    NoLeaderKnown,
    SwitchoverUnknown,
)
from repstage_mesh.core.models import Announcement

# seconds a follower waits for the leader to answer a carried announce: above the longest plan
# (two commits, two proxy waits at the longest ack_deadline, the close wait), below the CLI's
ANNOUNCE_TIMEOUT = 150.0


class Forwarder:
    """Carries announces and switchovers to the leader; `observe(outcome)` counts forwards."""

    def __init__(self, peers: PeerClient, observe: Callable[[str], None]) -> None:
        self.peers = peers
        self.observe = observe

    async def announce(self, api: str, service: str, announcement: Announcement, caller: Caller) -> dict[str, Any]:
        """Carry an announce to the leader at `api` (one hop), bounded by ANNOUNCE_TIMEOUT: a
        leader that gives no answer is CommitTimeout (504), one never reached NoLeaderKnown."""
        body: dict[str, Any] = {"member": announcement.member, "cause": announcement.cause,
                                "fence": announcement.fence}
        if announcement.token is not None:
            body["epoch"] = announcement.token
        if announcement.key is not None:
            body["idempotency_key"] = announcement.key
        path = f"/v1/services/{quote(service, safe='')}/primary"
        bound = ANNOUNCE_TIMEOUT
        try:
            async with asyncio.timeout(bound):
                return dict(await self.peers.call(
                    api, "POST", path, body, authorization=caller.authorization, timeout=bound,
                    headers=announcement.trace or {},
                ))
        except TimeoutError:
            raise CommitTimeout(f"the leader at {api} did not answer the announce within {bound:g} s") from None
        except ApiUnreachable as exc:
            if isinstance(exc.__cause__, aiohttp.ClientConnectorError):  # never reached the leader
                raise NoLeaderKnown(f"the leader's API at {api} cannot be reached: {exc}") from exc
            raise CommitTimeout(f"the announce was carried to the leader at {api}, which gave no answer: {exc}") from exc

    async def switchover(
        self, api: str, service: str, to: str, timeout: float | None, wait: float, caller: Caller
    ) -> dict[str, Any]:
        """Carry a switchover to the leader at `api` (one hop): it holds the request `wait`
        seconds at most; this node waits FORWARD_MARGIN longer."""
        body: dict[str, Any] = {"to": to, "wait": wait}
        if timeout is not None:
            body["timeout"] = timeout
        path = f"/v1/services/{quote(service, safe='')}/switchover"
        self.observe("forwarded")
        try:
            answer = await self.peers.call(
                api, "POST", path, body, authorization=caller.authorization, timeout=wait + FORWARD_MARGIN
            )
        except ApiNoAnswer as exc:
            self.observe("no_answer")
            raise SwitchoverUnknown(
                f"the switchover of {service} to {to} was carried to the leader at {api}, which "
                f"gave no answer ({exc}); it may be running or done there: see GET /v1/failovers "
                "on any node"
            ) from exc
        return dict(answer)
