"""Filesystem snapshots by a command the operator defines (btrfs, zfs, LVM, a cloud CLI).

The template is an argv list, never a shell line; each element may hold placeholders
{service} {member} {host} {port} {kind} {role} {epoch} {snapshot_id}. Example:
`["zfs", "snapshot", "tank/redis@{snapshot_id}"]` or
`["ssh", "{host}", "btrfs", "subvolume", "snapshot", "-r", "/data", "/snaps/{snapshot_id}"]`.
It runs with a minimal environment (PATH, LANG), its own process group, and is killed with
that group at the timeout. The snapshot stays where the tool made it: the artifact is the last
line of its standard output when that line is a URI (`zfs://tank/redis@s1`), otherwise
`command://<member>/<snapshot id>`. Its point is the time the command finished: a filesystem
snapshot has no replication position, so a drill compares it by acknowledgement time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from repstage_mesh.core.templates import SNAPSHOT_PLACEHOLDERS, template_problem
from repstage_mesh.snapshots.actions.base import ActionResult, SnapshotTarget
from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed
from repstage_mesh.snapshots.actions.process import run_argv

PLACEHOLDERS = SNAPSHOT_PLACEHOLDERS


def check_template(template: Sequence[str]) -> None:
    """SnapshotActionFailed naming the element with an unknown placeholder or bad braces."""
    problem = template_problem(template)
    if problem is not None:
        raise SnapshotActionFailed(f"snapshot command{'' if problem.startswith('[') else ': '}{problem}")


class CommandAction:
    def __init__(self, template: Sequence[str]) -> None:
        check_template(template)
        self.template = list(template)

    def argv(self, target: SnapshotTarget) -> list[str]:
        values = {
            "service": target.service, "member": target.member, "host": target.host,
            "port": str(target.port), "kind": target.kind, "role": target.role,
            "epoch": str(target.epoch), "snapshot_id": target.snapshot_id,
        }
        return [element.format(**values) for element in self.template]

    async def take(self, target: SnapshotTarget, timeout: float) -> ActionResult:
        done = await run_argv(self.argv(target), timeout, what="snapshot command")
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        artifact = lines[-1] if lines and "://" in lines[-1] else (
            f"command://{target.member}/{target.snapshot_id}"
        )
        return ActionResult(artifact, {"finished_at": f"{time.time():.6f}"}, 0)
