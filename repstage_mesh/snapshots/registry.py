"""What the snapshot runner is given by the node: the actions' factory: `repstage_mesh.snapshots.actions.build_action(kind, settings)` when the
actions package provides it (branch snapact), else an action that fails with that reason."""

from __future__ import annotations

import importlib
from typing import Any

from repstage_mesh.config import SnapshotSettings
from repstage_mesh.core.models import HookSpec
from repstage_mesh.core.observations import MemberStatus
from repstage_mesh.decide import Decider
from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotAction, SnapshotTarget
from repstage_mesh.snapshots.choice import MemberReport

__all__ = ["UnavailableAction", "build_snapshot_action", "member_reports", "operator_hook"]


class UnavailableAction:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult:
        raise RuntimeError(self.reason)


def build_snapshot_action(kind: str, settings: SnapshotSettings) -> SnapshotAction:
    try:
        actions = importlib.import_module("repstage_mesh.snapshots.actions")
        build = actions.build_action
    except (ImportError, AttributeError):
        return UnavailableAction(f"no snapshot action for kind {kind!r} is installed (repstage_mesh.snapshots.actions.build_action)")
    action: SnapshotAction = build(kind, settings)
    return action


def operator_hook(settings: Any, name: str) -> HookSpec | None:
    """A hook of the operator's `hooks:` section by name (None when there is no such hook or,
    before branch apisec's `hooks:` section, no section at all)."""
    hooks = getattr(settings, "hooks", None) or {}
    spec = hooks.get(name)
    return spec if isinstance(spec, HookSpec) else None


def member_reports(decider: Decider, service: str) -> dict[str, MemberReport]:
    """What the leader's sources say of each member (healthy replica? offset)."""
    return {
        m: MemberReport(replica=v.status is MemberStatus.REPLICA, offset=v.offset)
        for m, v in decider.member_views(service).items()
    }
