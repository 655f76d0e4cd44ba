"""The snapshot actions' and restore drills' part of the `snapshots:` section (issue 16).

`SnapshotSettings` (sections.py) builds on `SnapshotActionFields`: the operator's command
templates (per service or per kind), how Redis and PostgreSQL copies are made, and
`snapshots.verify` (where each service's ledger lives, the drill's scratch server and an
optional schedule). A ledger path is only ever the operator's: a request cannot name a file.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from repstage_mesh.core.models import Name
from repstage_mesh.core.templates import template_problem

__all__ = ["SnapshotActionFields", "SnapshotVerifySettings"]


def _absolute(value: str) -> str:
    if "\0" in value or not PurePosixPath(value).is_absolute():
        raise ValueError(f"expected an absolute path, got {value!r}")
    return value


def _template(value: tuple[str, ...]) -> tuple[str, ...]:
    problem = template_problem(value)
    if problem is not None:
        raise ValueError(f"bad snapshot command template: {problem}")
    return value


AbsolutePath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_absolute)]
CommandTemplate = Annotated[tuple[Annotated[str, Field(max_length=4096)], ...], AfterValidator(_template)]
UserName = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SnapshotVerifySettings(_Section):
    """Restore drills (`repstage-mesh snapshot verify SERVICE ID`, `POST .../verify`)."""

    ledgers: dict[Name, AbsolutePath] = Field(
        default_factory=dict,
        description="service name -> absolute path of its ledger of acknowledged writes (JSON lines) "
        "on the leader; a service without one: the drill proves the snapshot restores",
    )
    every: float | None = Field(
        default=None, ge=10, le=30 * 86_400,
        description="seconds between scheduled drills (the leader verifies each service's newest completed, "
        "unverified snapshot); unset: no schedule",
    )
    timeout: float = Field(default=1800.0, gt=0, le=86_400, description="seconds one drill may take as a whole")
    start_timeout: float = Field(
        default=120.0, gt=0, le=86_400, description="seconds the scratch server may take to come up on the snapshot"
    )
    run_as: UserName | None = Field(
        default=None, description="OS user of the scratch PostgreSQL when the node runs as root (default: postgres)"
    )
    pg_user: UserName = Field(default="postgres", description="the restored PostgreSQL's superuser the drill reads as")
    redis_server: AbsolutePath | None = Field(default=None, description="path of redis-server (default: from PATH)")
    concurrency: int = Field(
        default=1, ge=1, le=16,
        description="drills run at once on the leader; more are refused (409, repstage_snapshot_limits_total"
        "{limit=\"verify_concurrency\"})",
    )


class SnapshotActionFields(_Section):
    commands: dict[Name, CommandTemplate] = Field(
        default_factory=dict,
        description="argv templates of filesystem snapshots, by service name or by kind (redis, postgres, tcp); "
        "a service's own entry wins over its kind's; placeholders {service} {member} {host} {port} {kind} "
        "{role} {epoch} {snapshot_id}",
    )
    redis_local_rdb: bool = Field(
        default=False, description="Redis: BGSAVE and copy the member's RDB file (the node shares its file system) "
        "instead of the replication transfer",
    )
    pg_bindir: AbsolutePath | None = Field(
        default=None, description="directory of pg_basebackup, pg_waldump and postgres (default: the newest "
        "/usr/lib/postgresql/*/bin, then PATH)",
    )
    verify: SnapshotVerifySettings = Field(default_factory=SnapshotVerifySettings)

    def command_for(self, service: str, kind: str) -> tuple[str, ...] | None:
        """The operator's template for a member of `service` of `kind`, if any."""
        return self.commands.get(service) or self.commands.get(kind)
