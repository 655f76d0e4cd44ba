"""Snapshot actions: take a consistent copy of one member, store it, and prove it restores.

`build_action(kind, settings)` gives the action for a member kind (`redis`, `postgres`; `tcp`
or any kind with an operator-defined `command` template gets the filesystem command action);
`verify_snapshot(record, ledger_path)` runs a restore drill (see `verify.py` and `ledger.py`).
Nothing here knows Raft, the workflow or HTTP: the workflow (snapshots/) decides who and when.
"""

from __future__ import annotations

from collections.abc import Sequence

from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotAction, SnapshotTarget
from repstage_mesh.snapshots.actions.command_action import CommandAction
from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed, SnapshotActionTimeout
from repstage_mesh.snapshots.actions.postgres_action import PostgresAction
from repstage_mesh.snapshots.actions.redis_action import RedisAction
from repstage_mesh.snapshots.actions.settings import ActionSettings
from repstage_mesh.snapshots.actions.storage import open_storage
from repstage_mesh.snapshots.actions.verify import VerifyResult, verify_snapshot

__all__ = [
    "ActionResult",
    "ActionSettings",
    "SnapshotAction",
    "SnapshotActionFailed",
    "SnapshotActionTimeout",
    "SnapshotTarget",
    "VerifyResult",
    "build_action",
    "verify_snapshot",
]


def build_action(
    kind: str,
    settings: ActionSettings,
    *,
    command: Sequence[str] | None = None,
    pg_bindir: str | None = None,
    redis_local_rdb: bool = False,
) -> SnapshotAction:
    """The action for members of `kind`. A `command` template (the operator's filesystem
    snapshot) takes precedence over the built-in ones; SnapshotActionFailed for a kind with
    neither (and for a bad storage URL or template), so a bad config fails before any snapshot.
    `redis_local_rdb`: BGSAVE and copy the member's file (the mesh shares its file system)
    instead of the default transfer over the network."""
    if command:
        return CommandAction(command)
    storage = open_storage(settings.storage, settings.s3_endpoint_url, settings.take_timeout)
    if kind == "redis":
        return RedisAction(storage, local_rdb=redis_local_rdb)
    if kind == "postgres":
        return PostgresAction(storage, pg_bindir)
    raise SnapshotActionFailed(
        f"no snapshot action for kind {kind!r}: define a snapshot command template for it"
    )
