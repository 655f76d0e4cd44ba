"""The ledger of acknowledged writes a restore drill compares a snapshot with.

Format: JSON lines, one acknowledged write per line, appended by the writer after the database
acknowledged it:

    {"key": "w:17", "value": "17", "acked_at": 1764734400.123, "position": "5123"}
    {"key": "w:18", "value": "18", "acked_at": 1764734400.125, "position": "0/3000148", "table": "kv"}

- `key`, `value`: strings. Redis: a string key set with SET. PostgreSQL: a row of `table`
  (columns `key text primary key, value text`; `table` may be `schema.table`).
- `acked_at`: Unix time (seconds) of the acknowledgement.
- `position`: where the write starts in the replication stream. Redis: the primary's
  `master_repl_offset` read by `INFO replication` inside the same MULTI/EXEC as the write (so
  nothing comes between); optional `replid` (that INFO's `master_replid`) must then equal the
  snapshot's. PostgreSQL: the LSN at which the transaction's commit record starts (e.g. from
  `pg_walinspect.pg_get_wal_records_info` on the primary, matched by xid). A write is in a
  snapshot when its position is before the snapshot's point (Redis `master_repl_offset`,
  PostgreSQL `end_lsn`); for a snapshot with no position (a filesystem command) when
  `acked_at` is at or before its `finished_at`.

Later lines for the same key supersede earlier ones. Sans-IO: `parse_ledger` and `compare` do
no I/O; `read_ledger` reads a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repstage_mesh.snapshots.actions.errors import SnapshotActionFailed

SAMPLE = 20  # keys listed per kind of difference in a result (counts are always whole)


@dataclass(frozen=True)
class LedgerEntry:
    key: str
    value: str
    acked_at: float
    position: str | None = None
    table: str | None = None
    replid: str | None = None


def parse_lsn(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    try:
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise SnapshotActionFailed(f"{lsn!r} is not an LSN (like 0/3000148)") from None


def _entry(raw: Any, where: str) -> LedgerEntry:
    if not isinstance(raw, dict):
        raise SnapshotActionFailed(f"{where}: expected a JSON object")
    for name in ("key", "value"):
        if not isinstance(raw.get(name), str):
            raise SnapshotActionFailed(f"{where}: field {name!r} must be a string")
    acked = raw.get("acked_at")
    if not isinstance(acked, int | float) or isinstance(acked, bool):
        raise SnapshotActionFailed(f"{where}: field 'acked_at' must be a number (Unix seconds)")
    optional = {name: raw.get(name) for name in ("position", "table", "replid")}
    for name, value in optional.items():
        if value is not None and not isinstance(value, str | int):
            raise SnapshotActionFailed(f"{where}: field {name!r} must be a string")
    return LedgerEntry(raw["key"], raw["value"], float(acked),
                       *(None if v is None else str(v) for v in optional.values()))


def parse_ledger(lines: Iterable[str], source: str = "ledger") -> list[LedgerEntry]:
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise SnapshotActionFailed(f"{source} line {number}: not JSON ({exc})") from None
        entries.append(_entry(raw, f"{source} line {number}"))
    return entries


def read_ledger(path: Path) -> list[LedgerEntry]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_ledger(f, str(path))
    except OSError as exc:
        raise SnapshotActionFailed(f"cannot read the ledger {path}: {exc}") from exc


def ledger_line(entry: LedgerEntry) -> str:
    """One line of the format above (what a writer appends)."""
    raw = {k: v for k, v in entry.__dict__.items() if v is not None}
    return json.dumps(raw, separators=(",", ":")) + "\n"


def included_by(kind: str, point: Mapping[str, str]) -> Callable[[LedgerEntry], bool]:
    """Whether a ledger entry falls at or before a snapshot's point."""
    if kind == "redis":
        offset = int(point["master_repl_offset"])
        replid = point.get("master_replid")

        def redis_included(entry: LedgerEntry) -> bool:
            if entry.position is None:
                raise SnapshotActionFailed(f"ledger entry {entry.key!r} has no position")
            if entry.replid and replid and entry.replid != replid:
                raise SnapshotActionFailed(
                    f"ledger entry {entry.key!r} is on replication id {entry.replid}, "
                    f"the snapshot on {replid}: their offsets cannot be compared"
                )
            return int(entry.position) < offset

        return redis_included
    if kind == "postgres":
        stop = parse_lsn(point["end_lsn"])

        def postgres_included(entry: LedgerEntry) -> bool:
            if entry.position is None:
                raise SnapshotActionFailed(f"ledger entry {entry.key!r} has no position")
            return parse_lsn(entry.position) < stop

        return postgres_included
    finished = float(point["finished_at"])
    return lambda entry: entry.acked_at <= finished


@dataclass
class Comparison:
    expected: int = 0  # keys whose last write at or before the point is known
    matched: int = 0
    missing: list[str] = field(default_factory=list)  # a write at/before the point is absent
    extra: list[str] = field(default_factory=list)  # a write after the point is present
    unexplained: list[str] = field(default_factory=list)  # a value no ledger write produced
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.counts.get("missing") or self.counts.get("extra")
                    or self.counts.get("unexplained"))

    def as_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "matched": self.matched, "counts": self.counts,
                "missing": self.missing[:SAMPLE], "extra": self.extra[:SAMPLE],
                "unexplained": self.unexplained[:SAMPLE]}


def compare(entries: Iterable[LedgerEntry], included: Callable[[LedgerEntry], bool],
            restored: Mapping[str, str | None]) -> Comparison:
    """Compare the restored value of every ledger key with the ledger up to the point."""
    before: dict[str, str] = {}
    superseded: dict[str, set[str]] = {}  # earlier values of a key, before the point
    after: dict[str, set[str]] = {}
    for entry in entries:
        if included(entry):
            if entry.key in before:
                superseded.setdefault(entry.key, set()).add(before[entry.key])
            before[entry.key] = entry.value
        else:
            after.setdefault(entry.key, set()).add(entry.value)
    result = Comparison(expected=len(before))
    for key in sorted(set(before) | set(after)):
        value = restored.get(key)
        if key in before and value == before[key]:
            result.matched += 1
        elif value is not None and value in after.get(key, ()):
            result.extra.append(key)
        elif key in before and (value is None or value in superseded.get(key, ())):
            result.missing.append(key)
        elif value is not None:
            result.unexplained.append(key)
    result.counts = {"missing": len(result.missing), "extra": len(result.extra),
                     "unexplained": len(result.unexplained)}
    return result
