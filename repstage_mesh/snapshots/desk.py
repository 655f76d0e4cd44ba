"""What every node answers about snapshots (`POST/GET /v1/services/{name}/snapshots[/{id}]`):
a follower carries a request to the leader; reads answer from the replicated state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from repstage_mesh.core.errors import NotReady
from repstage_mesh.core.models import MeshState
from repstage_mesh.snapshots.runner import SnapshotRunner

__all__ = ["SnapshotDesk"]

Call = Callable[[str, str, str, dict[str, Any]], Awaitable[Any]]


class SnapshotDesk:
    def __init__(
        self,
        runner: SnapshotRunner,
        state: Callable[[], MeshState],
        leader_api: Callable[[], str | None],
        call: Call,
        deciding: Callable[[], bool],
    ) -> None:
        self.runner = runner
        self._state = state
        self._leader_api = leader_api
        self._call = call
        self._deciding = deciding

    async def start(self, service: str, member: str) -> dict[str, Any]:
        """Start a snapshot of `service` (`member`: "replica", "primary" or a member's name) on
        the leader; the answer is the committed intent, the rest runs in the background."""
        api = self._leader_api()
        if api is not None:
            path = f"/v1/services/{quote(service, safe='')}/snapshots"
            return dict(await self._call(api, "POST", path, {"member": member}))
        if not self._deciding():
            raise NotReady("this node leads but has not started deciding yet; retry shortly")
        entry = await self.runner.start(service, member)
        return entry.model_dump(mode="json")

    def list(self, service: str) -> list[dict[str, Any]] | None:
        """The replicated snapshots of `service`, newest first (None: no such service)."""
        state = self._state()
        if state.service(service) is None and not any(s.service == service for s in state.snapshots):
            return None
        return [s.model_dump(mode="json") for s in reversed(state.snapshots) if s.service == service]

    def get(self, service: str, snapshot_id: str) -> dict[str, Any] | None:
        entry = self._state().snapshot(snapshot_id)
        return entry.model_dump(mode="json") if entry is not None and entry.service == service else None
