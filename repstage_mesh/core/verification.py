"""Restore drills in the replicated state (issue 16, item 6): a snapshot's `verification` and
the command that starts or ends one (`VerifySnapshot`, applied by `core/state.py`). Apart from
`models.py` so that the snapshot record's own module stays small; `models.py` re-exports both."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


VerificationStatus = Literal["running", "ok", "failed", "interrupted"]


class SnapshotVerification(_Frozen):
    """A restore drill of a completed snapshot (issue 16, item 6), run by the Raft leader.

    `drill` names one attempt: only the attempt that is `running` may be ended (`ok`, `failed`,
    or `interrupted` when a new leader finds it running after the old one died). The counts and
    the first keys of `missing`/`extra`/`unexplained` are the ledger comparison (`compared`:
    the service has a ledger configured); `restored`: the scratch server came up on it."""

    drill: str = Field(min_length=1, max_length=200)
    status: VerificationStatus = "running"
    node: str = Field(default="", max_length=200, description="the leader that runs it")
    requested: Literal["request", "schedule"] = "request"
    started_at: float = Field(default=0.0, ge=0)
    finished_at: float = Field(default=0.0, ge=0)
    duration_s: float = Field(default=0.0, ge=0)
    restored: bool = False
    compared: bool = False
    expected: int = Field(default=0, ge=0, description="ledger keys written at or before the point")
    matched: int = Field(default=0, ge=0)
    counts: dict[str, int] = Field(default_factory=dict, description="missing, extra, unexplained")
    missing: tuple[str, ...] = Field(default=(), max_length=20)
    extra: tuple[str, ...] = Field(default=(), max_length=20)
    unexplained: tuple[str, ...] = Field(default=(), max_length=20)
    error: str = Field(default="", max_length=2000)

    @property
    def running(self) -> bool:
        return self.status == "running"


class VerifySnapshot(_Frozen):
    """Start or end a restore drill of a snapshot (recorded as the entry's `verification`).
    Starting (`status` running) is refused unless the snapshot completed and no drill of it
    runs; ending is refused unless `drill` is the running attempt. Changes no routing."""

    kind: Literal["verify_snapshot"] = "verify_snapshot"
    id: str = Field(min_length=1, max_length=200)
    verification: SnapshotVerification
