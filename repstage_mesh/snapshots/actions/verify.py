"""Restore drills: restore a snapshot into a scratch server and compare it with the ledger.

`verify_snapshot(record, ledger_path)` is what `repstage-mesh snapshot verify ID` calls. The
record is the snapshot's record, as a mapping (the REST answer) or an object, with `kind`,
`artifact` and `point` (the `ActionResult` fields; they may also sit under `result`). Without a
ledger the drill proves the snapshot restores and counts what it holds. The answer,
`VerifyResult`, is what the workflow records with the snapshot (`as_dict()`); a drill never
raises for a failed restore or a difference, it says so in the result (`ok`, `error`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from redis.exceptions import RedisError

from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed
from repstage_mesh.snapshots.actions.ledger import (
    LedgerEntry,
    compare,
    included_by,
    read_ledger,
)
from repstage_mesh.snapshots.actions.scratch import (
    ScratchOptions,
    postgres_values,
    redis_values,
    scratch_postgres,
    scratch_redis,
)
from repstage_mesh.snapshots.actions.storage import fetch

DEFAULT_TABLE = "repstage_ledger"


@dataclass
class VerifyResult:
    ok: bool
    kind: str
    artifact: str
    point: dict[str, str]
    restored: bool = False  # the scratch server came up on the snapshot
    compared: bool = False  # a ledger was given and compared
    comparison: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    started_at: float = 0.0
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _field(record: Any, name: str) -> Any:
    for source in (record, _get(record, "result")):
        value = _get(source, name)
        if value:  # "" and {} too: a record that has not completed has no artifact yet
            return value
    raise SnapshotActionFailed(f"the snapshot record has no {name!r} (has it completed?)")


def _get(source: Any, name: str) -> Any:
    if source is None:
        return None
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


async def _restored_values(kind: str, files: Path, point: Mapping[str, str],
                           entries: list[LedgerEntry], options: ScratchOptions
                           ) -> dict[str, str | None]:
    keys = [entry.key for entry in entries]
    if kind == "redis":
        async with scratch_redis(files, options) as client:
            return await redis_values(client, keys)
    if kind == "postgres":
        async with scratch_postgres(files, options) as conninfo:
            values: dict[str, str | None] = {}
            tables = sorted({entry.table or DEFAULT_TABLE for entry in entries})
            for table in tables:
                mine = [e.key for e in entries if (e.table or DEFAULT_TABLE) == table]
                values.update(await postgres_values(conninfo, table, mine))
            return values
    raise SnapshotActionFailed(f"no restore drill for kind {kind!r} (only redis and postgres)")


async def verify_snapshot(
    record: Any,
    ledger_path: Path | str | None,
    *,
    s3_endpoint_url: str | None = None,
    options: ScratchOptions | None = None,
) -> VerifyResult:
    """Restore the snapshot of `record` into a scratch server; compare with the ledger."""
    started = time.time()
    result = VerifyResult(False, str(_get(record, "kind") or ""), "", {}, started_at=started)
    try:
        result.kind = str(_field(record, "kind"))
        result.artifact = str(_field(record, "artifact"))
        result.point = {str(k): str(v) for k, v in dict(_field(record, "point")).items()}
        entries = read_ledger(Path(ledger_path)) if ledger_path is not None else []
        try:
            included = included_by(result.kind, result.point)
        except KeyError as exc:  # e.g. a redis service snapshotted by the operator's command
            raise SnapshotActionFailed(f"the snapshot's point has no {exc}: no {result.kind} restore "
                                       f"drill for it (point: {sorted(result.point)})") from None
        with tempfile.TemporaryDirectory(prefix="repstage-verify-") as tmp:
            files = await fetch(result.artifact, Path(tmp), s3_endpoint_url)
            values = await _restored_values(result.kind, files, result.point, entries,
                                            options or ScratchOptions())
        result.restored = True
        if ledger_path is not None:
            comparison = compare(entries, included, values)
            result.compared = True
            result.comparison = comparison.as_dict()
            result.ok = comparison.ok
            if not comparison.ok:
                result.error = f"the restore differs from the ledger: {comparison.counts}"
        else:
            result.ok = True
    except SnapshotActionFailed as exc:
        result.error = str(exc)
    except (OSError, psycopg.Error, RedisError) as exc:
        result.error = f"restore drill failed: {exc}"
    result.duration_s = round(time.time() - started, 3)
    return result
