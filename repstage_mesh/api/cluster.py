"""Cluster-wide views (issue 15): what an operator sees of the whole cluster from any node.

- `gather_proxies`: every node's proxies, for `GET /v1/proxies?scope=cluster`. The answering
  node asks each other node's `GET /v1/proxies` (scope local) at once, each bounded by
  `api.peer_timeout`; a node that does not answer in time is listed as unreachable with why,
  never waited on longer. Each proxy row names the node that serves it (`control_plane`).
- `raft_view`: this node's Raft view with node ids instead of Raft addresses, and no quorum
  claimed while no leader is known (during an election).
- `member_health`: the members as the Raft leader's probes see them (health, since when,
  replication offset and lag behind the primary), for `GET /v1/members`.
- `ClusterViews`: what a node answers with, wired by node.py from its parts (its state and
  proxies, the decider's view, who leads, the peer client); the members' view is asked of the
  leader (one hop, the caller's token, within `api.peer_timeout`) and is this node's own
  (`leader: false`) when the leader cannot be asked.

`raft_view` and `member_health` are pure; times in answers are ages or Unix seconds, never
monotonic clocks.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from repstage_mesh.api.errors import ApiError
from repstage_mesh.api.failovers import caller
from repstage_mesh.api.http import ok, plane
from repstage_mesh.api.models import ProxyView
from repstage_mesh.api.openapi import ListOf, OneOf, Operation
from repstage_mesh.api.peers import PeerClient
from repstage_mesh.api.plane import Caller
from repstage_mesh.core.errors import MeshError, NotLeader
from repstage_mesh.core.models import MeshState, NodeAddress

PROXIES_PATH = "/v1/proxies"
MEMBERS_PATH = "/v1/members"
log = logging.getLogger(__name__)


# --- every node's proxies -------------------------------------------------------------------------


@dataclass
class NodeProxies:
    """One node's answer to the gathering: its proxies, or why it could not be asked."""

    node_id: str
    api: str
    reachable: bool
    proxies: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


class NodeReachView(BaseModel):
    node_id: str
    api: str = Field(description="HOST:PORT of the node's REST API (empty: never announced)")
    reachable: bool = Field(description="the node answered within api.peer_timeout")
    error: str | None = Field(default=None, description="why the node could not be asked")
    proxies: int = Field(description="proxies it reported (connected or recently disconnected)")


class ClusterProxies(BaseModel):
    """GET /v1/proxies?scope=cluster: every node's proxies, gathered by `node_id`."""

    scope: str = "cluster"
    node_id: str = Field(description="the node that gathered")
    nodes: list[NodeReachView] = Field(description="every known control-plane node, sorted by id")
    proxies: list[ProxyView] = Field(
        description="every reachable node's proxies; control_plane names the serving node"
    )


async def _ask(
    session: aiohttp.ClientSession, peer: NodeAddress, headers: Mapping[str, str], tls: ssl.SSLContext | None
) -> NodeProxies:
    scheme = "https" if tls is not None else "http"
    try:
        async with session.get(
            f"{scheme}://{peer.api}{PROXIES_PATH}", params={"scope": "local"}, headers=dict(headers),
            ssl=tls if tls is not None else True,
        ) as resp:
            body = await resp.json(content_type=None)
            status = resp.status
    except TimeoutError:
        return NodeProxies(peer.node_id, peer.api, False, error="no answer in time")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return NodeProxies(peer.node_id, peer.api, False, error=str(exc) or type(exc).__name__)
    if status != 200 or not isinstance(body, list):
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        return NodeProxies(peer.node_id, peer.api, False, error=f"HTTP {status}: {message or body}")
    rows = [{**row, "control_plane": row.get("control_plane") or peer.node_id} for row in body]
    return NodeProxies(peer.node_id, peer.api, True, rows)


async def gather_proxies(
    local: NodeProxies,
    peers: Iterable[NodeAddress],
    authorization: str | None,
    timeout: float,
    on_unreachable: Callable[[str], None] = lambda _node: None,
    tls: ssl.SSLContext | None = None,
) -> list[NodeProxies]:
    """`local` plus every peer's proxies, asked at once, each bounded by `timeout` seconds. The
    caller's Authorization header is passed on (the peer checks the caller's token); HTTPS with
    `tls` when the cluster's API uses TLS (api.tls)."""
    headers = {"Authorization": authorization} if authorization else {}
    asked = [p for p in peers if p.node_id != local.node_id]
    out = [local]
    if asked:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            out += await asyncio.gather(*(_ask(session, p, headers, tls) for p in asked if p.api))
        out += [NodeProxies(p.node_id, "", False, error="never announced its API") for p in asked if not p.api]
    for answer in out:
        if not answer.reachable:
            on_unreachable(answer.node_id)
    return sorted(out, key=lambda n: n.node_id)


def cluster_proxies_view(node_id: str, answers: Iterable[NodeProxies]) -> ClusterProxies:
    answers = list(answers)
    return ClusterProxies(
        node_id=node_id,
        nodes=[NodeReachView(node_id=a.node_id, api=a.api, reachable=a.reachable,
                             error=a.error or None, proxies=len(a.proxies)) for a in answers],
        proxies=[ProxyView.model_validate(p) for a in answers for p in a.proxies],
    )  # fmt: skip


# --- this node's Raft view, by node id ------------------------------------------------------------


def raft_view(raw: Mapping[str, Any], nodes: Mapping[str, NodeAddress]) -> dict[str, Any]:
    """`ReplicatedStore.status()` (plus the node's fields) with node ids for Raft addresses: the
    leader and each peer are named by node id (`leader_address` keeps the Raft address), a
    single node's missing address is left out, and quorum is only claimed with a leader known
    (pysyncobj may count a majority of connections during an election)."""
    by_raft = {n.raft: n.node_id for n in nodes.values() if n.raft}
    view = {k: v for k, v in raw.items() if not (k == "address" and v is None)}
    leader = raw.get("leader")
    if raw.get("is_leader"):
        view["leader"] = raw.get("node_id") or raw.get("node")
    elif leader is not None:
        view["leader"] = by_raft.get(str(leader), str(leader))
    view["leader_address"] = leader
    if "has_quorum" in raw:
        view["has_quorum"] = bool(raw["has_quorum"]) and view.get("leader") is not None
    view["peers"] = [
        {"node_id": by_raft.get(str(p.get("address"))), **p} if isinstance(p, Mapping) else p
        for p in raw.get("peers", [])
    ]
    return view


# --- members as the leader's probes see them ------------------------------------------------------


class MemberHealthView(BaseModel):
    model_config = ConfigDict(extra="allow")

    service: str
    member: str
    address: str
    port: int
    role: str = Field(description="primary or replica, as the replicated state says")
    health: str = Field(
        description="primary, replica, down or unknown as observed; unobserved: no source reports it"
    )
    since_seconds: float | None = Field(default=None, description="how long the member has had this health")
    offset: int | None = Field(default=None, description="replication offset (Redis) or LSN (PostgreSQL)")
    lag: int | None = Field(default=None, description="bytes behind the primary's offset (null: unknown)")
    upstream: str | None = Field(default=None, description="for a replica: the address it replicates from")
    detail: str = ""


class MembersView(BaseModel):
    """GET /v1/members: every service's members with what the leader's sources observe."""

    node_id: str = Field(description="the node whose observations these are (the Raft leader)")
    leader: bool = Field(description="false: no leader could be asked; only the leader probes, so health is unobserved")
    members: list[MemberHealthView]


def member_health(state: MeshState, observed: Mapping[str, Any], now: float) -> list[MemberHealthView]:
    """One row per member of every service: the replicated role beside the decider's view
    (`Decider.status()`, whose monotonic `since` becomes an age against `now`)."""
    rows = []
    for name in sorted(state.services):
        svc = state.services[name]
        seen = (observed.get(name) or {}).get("members") or {}
        primary_offset = (seen.get(svc.primary) or {}).get("offset") if svc.primary else None
        for member in svc.spec.members:
            view = seen.get(member.name) or {}
            offset = view.get("offset")
            since = view.get("since")
            lag = None
            if member.name == svc.primary and offset is not None:
                lag = 0
            elif offset is not None and primary_offset is not None:
                lag = max(0, int(primary_offset) - int(offset))
            rows.append(MemberHealthView(
                service=name, member=member.name, address=member.address, port=member.port,
                role="primary" if member.name == svc.primary else "replica",
                health=str(view.get("status")) if view.get("since") is not None else "unobserved",
                since_seconds=None if since is None else max(0.0, now - float(since)),
                offset=offset, lag=lag, upstream=view.get("upstream"), detail=str(view.get("detail") or ""),
            ))  # fmt: skip
    return rows


# --- what a node answers with (node.py wires it from its parts) -----------------------------------


class ClusterViews:
    """The cluster-wide views of one node: its proxies and every other node's, and the members'
    health as the leader observes it (asked of the leader, one hop, within `peer_timeout`)."""

    def __init__(
        self, node_id: str, state: Callable[[], MeshState], proxies: Callable[[], list[dict[str, Any]]],
        observed: Callable[[], Mapping[str, Any]], leader_api: Callable[[Caller], str | None],
        leads: Callable[[], bool], peers: PeerClient, peer_timeout: float,
        on_unreachable: Callable[[str], None], tls: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        self.node_id, self.state, self.local_proxies, self.observed = node_id, state, proxies, observed
        self.leader_api, self.leads, self.peers, self.peer_timeout = leader_api, leads, peers, peer_timeout
        self.on_unreachable, self.tls = on_unreachable, tls

    async def proxies(self, authorization: str | None) -> list[NodeProxies]:
        nodes = self.state().nodes
        mine = nodes.get(self.node_id)
        local = NodeProxies(self.node_id, mine.api if mine else "", True, self.local_proxies())
        return await gather_proxies(local, nodes.values(), authorization, self.peer_timeout, self.on_unreachable, self.tls)

    async def members(self, caller: Caller) -> dict[str, Any]:
        """The leader's answer (only it probes), or this node's when the leader cannot be asked
        (`leader: false`). A request forwarded here on a follower is refused (NotLeader)."""
        try:
            api = self.leader_api(caller)
            if api is not None:
                return dict(await self.peers.call(api, "GET", MEMBERS_PATH, authorization=caller.authorization,
                                                  timeout=self.peer_timeout))  # fmt: skip
        except NotLeader:
            raise
        except (MeshError, TypeError, ValueError) as exc:
            log.info("members: answering from this node, the leader could not be asked (%s)", exc)
        rows = member_health(self.state(), self.observed(), time.monotonic())
        return {"node_id": self.node_id, "leader": self.leads(), "members": [r.model_dump() for r in rows]}


# --- endpoints ------------------------------------------------------------------------------------


async def list_proxies(request: web.Request) -> web.Response:
    unknown = sorted(set(request.query) - {"scope"})
    if unknown:
        raise ApiError(400, "invalid", f"{unknown[0]}: unknown query parameter (known: scope)", unknown[0])
    scope = request.query.get("scope", "local")
    node = plane(request)
    if scope == "local":
        return ok([ProxyView.model_validate(p) for p in node.proxies()])
    if scope != "cluster":
        raise ApiError(400, "invalid", f"scope: expected local or cluster, got {scope!r}", "scope")
    answers = await node.cluster_views.proxies(request.headers.get("Authorization"))
    return ok(cluster_proxies_view(node.node_id, answers))


async def list_members(request: web.Request) -> web.Response:
    return ok(MembersView.model_validate(await plane(request).cluster_views.members(caller(request))))


def cluster_operations() -> list[Operation]:
    return [
        Operation("GET", PROXIES_PATH, "listProxies", "Envoy proxies and their xDS versions", list_proxies,
                  {200: ("scope=local: one item per proxy of this node; scope=cluster: every node's",
                         OneOf((ListOf(ProxyView), ClusterProxies)))},
                  errors=(400,), tag="proxies",
                  query_params={"scope": ("local (default): this node's proxies; cluster: every node's, "
                                          "each node asked within api.peer_timeout",
                                          {"type": "string", "enum": ["local", "cluster"], "default": "local"})},
                  description="scope=cluster answers an object: `nodes` (every control-plane node, "
                  "reachable or not, with why) and `proxies` (every reachable node's, `control_plane` "
                  "naming the node). A disconnected proxy is never synced."),
        Operation("GET", MEMBERS_PATH, "listMembers",
                  "Every service's members: role, observed health, replication offset and lag", list_members,
                  {200: ("one row per member", MembersView)}, errors=(503,), tag="services",
                  description="Observed by the Raft leader's sources (a follower asks the leader); "
                  "`leader: false` when no leader could be asked (health is then unobserved)."),
    ]  # fmt: skip
