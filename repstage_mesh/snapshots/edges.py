"""The snapshot workflow's I/O edges: hooks, Envoy's connection counters, the action's target.

- Hooks are the operator's (`hooks:` by name, a command or a URL with its own timeout); they run
  with `failover/promote.py`'s runners (a command's process group is killed at its timeout).
- `EnvoyAdminCounters` reads `GET /clusters?format=json` of every configured Envoy admin and sums
  the drained member's `cx_active` in the service's read cluster: the member stays listed there
  as DRAINING while it drains, so its per-host counters are still Envoy's own. An admin that does
  not answer proves nothing (the drain keeps waiting until its timeout).
- `NoCounters`: no Envoy admin configured; the drain rests on the proxies' ACKs alone, and its
  step says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import aiohttp

from repstage_mesh.config.operator import Secrets, hook_environment
from repstage_mesh.core import naming
from repstage_mesh.core.models import HookSpec, Member, ServiceSpec, SnapshotEntry
from repstage_mesh.decide.steps import PromoteResult
from repstage_mesh.failover.promote import post_http_hook, run_command_hook
from repstage_mesh.failover.timeouts import bounded
from repstage_mesh.snapshots.actions.base import SnapshotTarget

__all__ = ["ConnectionCounter", "EnvoyAdminCounters", "NoCounters", "run_hook", "target_of"]

_RUNNING: set[asyncio.Future[PromoteResult]] = set()  # hooks whose waiter was cancelled run on


class ConnectionCounter(Protocol):
    async def active(self, service: str, member: Member) -> tuple[int | None, str]:
        """(connections through the mesh to `member`, how it was measured); None: unknown."""
        ...


class NoCounters:
    async def active(self, service: str, member: Member) -> tuple[int | None, str]:
        return 0, "not measured (snapshots.envoy_admins is empty): proxies' ACKs only"


def _stat(stats: Sequence[Mapping[str, Any]], name: str) -> int:
    for stat in stats:
        if stat.get("name") == name:
            return int(stat.get("value", 0) or 0)  # proto3 JSON leaves a zero out
    return 0


def cx_active(clusters: Mapping[str, Any], cluster: str, member: Member) -> int | None:
    """`cx_active` of `member` in `cluster` of one Envoy's /clusters?format=json; None: not listed."""
    for status in clusters.get("cluster_statuses", []):
        if status.get("name") != cluster:
            continue
        for host in status.get("host_statuses", []):
            socket = host.get("address", {}).get("socket_address", {})
            if socket.get("address") == member.address and int(socket.get("port_value", 0)) == member.port:
                return _stat(host.get("stats", []), "cx_active")
    return None


class EnvoyAdminCounters:
    def __init__(self, admins: Sequence[str], timeout: float = 1.0) -> None:
        self.admins = tuple(admins)
        self.timeout = timeout

    async def active(self, service: str, member: Member) -> tuple[int | None, str]:
        total, parts = 0, []
        cluster = naming.read_cluster(service)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            for admin in self.admins:
                try:
                    async with session.get(f"http://{admin}/clusters", params={"format": "json"}) as response:
                        body = await response.json(content_type=None)
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                    return None, f"envoy admin {admin}: {exc!r}"
                count = cx_active(body, cluster, member)
                parts.append(f"{admin}: {'not listed' if count is None else count}")
                total += count or 0
        return total, "cx_active " + ", ".join(parts)


async def run_hook(
    spec: HookSpec, values: Mapping[str, str], secrets: Secrets | None = None, *, name: str = "hook"
) -> PromoteResult:
    """Run a hook (command, in its minimal environment; else URL); a hook with neither fails."""
    if spec.command:
        env = hook_environment(spec, secrets if secrets is not None else Secrets({}))
        run = asyncio.ensure_future(run_command_hook(spec.command, values, spec.timeout, env, name=name))
        _RUNNING.add(run)
        run.add_done_callback(_RUNNING.discard)
        # A cancelled caller (this node stopped leading) leaves the hook to end or be killed at
        # its timeout: cancelling the wait alone would orphan the process with no timeout at all.
        return await asyncio.shield(run)
    if spec.url:
        try:
            body = {"action": "snapshot", **values}
            return await bounded(post_http_hook(spec.url, body, spec.timeout, name=name), spec.timeout + 1.0)
        except TimeoutError:
            return PromoteResult(False, detail=f"hook url: no answer within {spec.timeout:g} s")
    return PromoteResult(False, detail="hook has neither command nor url")


def hook_values(spec: ServiceSpec, entry: SnapshotEntry) -> dict[str, str]:
    member = spec.member(entry.member)
    return {
        "service": spec.name, "member": entry.member, "address": member.address if member else "",
        "port": str(member.port) if member else "", "epoch": str(entry.epoch), "role": entry.role.value,
        "snapshot": entry.id, "old_primary": "",
    }


def target_of(spec: ServiceSpec, entry: SnapshotEntry, secrets: Secrets | None = None) -> SnapshotTarget:
    """What the action is given: the member's address, the service's kind, the probe's
    credentials (its `password_secret`, only when that secret may be sent to this member)."""
    member = spec.member(entry.member)
    assert member is not None
    probe = spec.leadership.probe
    credentials: dict[str, str] = {"database": probe.database}
    if probe.user:
        credentials["user"] = probe.user
    password = secrets.for_host(probe.password_secret, member.address) if secrets is not None else None
    if password is not None:
        credentials["password"] = password
    kind = spec.protocol.value if spec.protocol.value in ("redis", "postgres") else "tcp"
    return SnapshotTarget(
        service=spec.name, member=member.name, host=member.address, port=member.port, kind=kind,
        role=entry.role.value, epoch=entry.epoch, snapshot_id=entry.id, credentials=credentials,
    )
