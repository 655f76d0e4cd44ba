"""What every node answers about snapshots (`POST/GET /v1/services/{name}/snapshots[/{id}]`):
a follower carries a request to the leader; reads answer from the replicated state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

from repstage_mesh.core.errors import NotReady
from repstage_mesh.core.models import MeshState
from repstage_mesh.snapshots.drills import DrillRunner
from repstage_mesh.snapshots.points import PointRunner
from repstage_mesh.snapshots.runner import SnapshotRunner

__all__ = ["SnapshotDesk"]

Call = Callable[..., Awaitable[Any]]  # api/peers.PeerClient.call
FORWARD_TIMEOUT = 30.0  # seconds a follower waits for the leader to commit a carried intent


class SnapshotDesk:
    def __init__(
        self,
        runner: SnapshotRunner,
        state: Callable[[], MeshState],
        call: Call,
        deciding: Callable[[], bool],
        leader_api: Callable[[Any], str | None],
        points: PointRunner | None = None,
        drills: DrillRunner | None = None,
    ) -> None:
        self.points = points
        self.drills = drills
        self._leader_api = leader_api
        self.runner = runner
        self._state = state
        self._call = call
        self._deciding = deciding

    async def start(self, service: str, member: str, caller: Any) -> dict[str, Any]:
        """Start a snapshot of `service` (`member`: "replica", "primary" or a member's name) on
        the leader (a follower carries it there, one hop, with the caller's own Authorization;
        `caller` is the API's `Caller`); the answer is the committed intent, the rest runs in
        the background."""
        leader_api = self._leader_api(caller)
        authorization = getattr(caller, "authorization", None)
        if leader_api is not None:
            path = f"/v1/services/{quote(service, safe='')}/snapshots"
            return dict(await self._call(leader_api, "POST", path, {"member": member},
                                         authorization=authorization, timeout=FORWARD_TIMEOUT))
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

    async def verify(self, service: str, snapshot_id: str, caller: Any) -> dict[str, Any]:
        """Start a restore drill of a completed snapshot on the leader (a follower carries it
        there, as `start`); the answer is the entry with its running `verification`."""
        leader_api = self._leader_api(caller)
        if leader_api is not None:
            path = f"/v1/services/{quote(service, safe='')}/snapshots/{quote(snapshot_id, safe='')}/verify"
            return dict(await self._call(leader_api, "POST", path, None,
                                         authorization=getattr(caller, "authorization", None), timeout=FORWARD_TIMEOUT))
        if not self._deciding() or self.drills is None:
            raise NotReady("this node leads but has not started deciding yet; retry shortly")
        entry = await self.drills.start(service, snapshot_id)
        return entry.model_dump(mode="json")

    async def start_point(self, services: Sequence[str], member: str, caller: Any) -> dict[str, Any]:
        """A consistent point over `services`, on the leader (carried there like `start`)."""
        leader_api = self._leader_api(caller)
        if leader_api is not None:
            body = {"services": list(services), "consistent": True, "member": member}
            return dict(await self._call(leader_api, "POST", "/v1/consistent-points", body,
                                         authorization=getattr(caller, "authorization", None), timeout=FORWARD_TIMEOUT))
        if not self._deciding() or self.points is None:
            raise NotReady("this node leads but has not started deciding yet; retry shortly")
        return (await self.points.start(list(services), member)).model_dump(mode="json")

    def points_list(self) -> Sequence[dict[str, Any]]:
        return [h.model_dump(mode="json") for h in reversed(self._state().holds)]

    def point(self, hold_id: str) -> dict[str, Any] | None:
        entry = self._state().hold(hold_id)
        return entry.model_dump(mode="json") if entry is not None else None
