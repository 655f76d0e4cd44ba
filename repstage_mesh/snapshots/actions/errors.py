"""The errors of snapshot actions and restore drills (drawn in core/errors.py's tree)."""

from __future__ import annotations

from repstage_mesh.core.errors import MeshError


class SnapshotActionFailed(MeshError):
    """Taking, storing or restoring a snapshot failed; the message says what and why."""

    code = "snapshot_action_failed"


class SnapshotActionTimeout(SnapshotActionFailed, TimeoutError):
    """A command or a transfer ran past its timeout and was stopped (a command with its
    whole process group). Also a TimeoutError, so a caller that counts timeouts (the workflow's
    take_timeout metric) sees it as one."""

    code = "snapshot_action_timeout"
