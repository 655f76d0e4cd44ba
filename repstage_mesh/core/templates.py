"""The operator's snapshot command templates (`snapshots.commands`): which placeholders an argv
element may hold. Shared by the config check (a bad template is a config error naming its
field) and the command action that fills it in (snapshots/actions/command_action.py)."""

from __future__ import annotations

from collections.abc import Sequence
from string import Formatter

SNAPSHOT_PLACEHOLDERS = frozenset(
    {"service", "member", "host", "port", "kind", "role", "epoch", "snapshot_id"}
)


def template_problem(template: Sequence[str]) -> str | None:
    """What is wrong with an argv template (`[index]: why`), or None."""
    if not template:
        return "the template is empty"
    for index, element in enumerate(template):
        try:
            names = {name for _, name, _, _ in Formatter().parse(element) if name is not None}
        except ValueError as exc:
            return f"[{index}]: {exc}"
        unknown = names - SNAPSHOT_PLACEHOLDERS
        if unknown:
            return f"[{index}]: unknown placeholder {sorted(unknown)}; known: {sorted(SNAPSHOT_PLACEHOLDERS)}"
    return None
