"""The steps the decider emits and the results their executor reports back.

A step is a request (confirm leadership, commit, wait for proxies, promote, re-point, read
positions, done); `Decider.step_done` takes the step together with its `StepResult`. Plain frozen
data, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from repstage_mesh.core.models import ServiceSpec, SetPrimary

__all__ = [
    "AwaitClose",
    "AwaitProxies",
    "Commit",
    "CommitResult",
    "ConfirmLeadership",
    "Done",
    "Positions",
    "Promote",
    "PromoteResult",
    "ProxyAcks",
    "ReadPositions",
    "Repoint",
    "Step",
    "StepFailed",
    "StepResult",
]


# --- steps: what the decider asks the node to do ----------------------------------------------


@dataclass(frozen=True)
class ConfirmLeadership:
    """Commit a no-op in the current term; result: bool (True only if still leader after it)."""

    service: str
    record_id: str


@dataclass(frozen=True)
class Commit:
    """Commit `command` through the Raft log; result: CommitResult (or StepFailed)."""

    service: str
    record_id: str
    command: SetPrimary


@dataclass(frozen=True)
class AwaitProxies:
    """Wait until every connected proxy ACKed a snapshot whose version (a Raft index) is at least
    `min_index`, or `deadline` seconds passed; result: ProxyAcks (never fails on the deadline)."""

    service: str
    record_id: str
    min_index: int
    deadline: float
    purpose: Literal["fence", "route"]


@dataclass(frozen=True)
class AwaitClose:
    """Wait `seconds` after the fence was ACKed: the time a proxy takes to close its open
    connections to the old primary (the health fence's check interval, plus a margin). Result:
    None. Used by announces, whose old primary may still be up and still take writes."""

    service: str
    record_id: str
    seconds: float


@dataclass(frozen=True)
class Promote:
    """Make `member` the primary of the data store and re-point the other members to it;
    result: PromoteResult. `epoch` is the fencing epoch (every claim at or below it is refused)."""

    service: str
    record_id: str
    spec: ServiceSpec
    member: str
    old_primary: str | None
    epoch: int


@dataclass(frozen=True)
class Repoint:
    """Make `member` (an old primary that came back claiming PRIMARY) a replica of
    `new_primary`; result: PromoteResult."""

    service: str
    record_id: str
    spec: ServiceSpec
    member: str
    new_primary: str


@dataclass(frozen=True)
class ReadPositions:
    """Read the replication positions (Redis offset, PostgreSQL LSN) of `members` now, after
    waiting `delay` seconds (a poll interval); result: Positions. Used by a switchover to wait for
    the target to catch up (observations carry offsets only now and then)."""

    service: str
    record_id: str
    spec: ServiceSpec
    members: tuple[str, ...]
    delay: float


@dataclass(frozen=True)
class Done:
    """The plan ended (nothing to execute)."""

    service: str
    record_id: str
    ok: bool
    reason: str


Step = ConfirmLeadership | Commit | AwaitProxies | AwaitClose | Promote | Repoint | ReadPositions | Done


# --- step results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitResult:
    """What a Commit produced. `epoch` is the committed epoch (the entry's Raft index) when ok."""

    ok: bool
    epoch: int | None = None
    message: str = ""
    code: str | None = None  # the Rejection code when the state machine refused it


@dataclass(frozen=True)
class ProxyAcks:
    """AwaitProxies' answer: when each proxy ACKed (same clock as `now`), and who did not."""

    acked: dict[str, float] = field(default_factory=dict)
    missed: tuple[str, ...] = ()  # behind at the deadline, NACKed ones and `<node>:unreachable`
    nacked: dict[str, str] = field(default_factory=dict)  # proxy -> Envoy's error: not fenced
    unreachable: tuple[str, ...] = ()  # control-plane nodes that could not be asked


@dataclass(frozen=True)
class PromoteResult:
    ok: bool
    detail: str = ""
    repointed: tuple[str, ...] = ()  # members now replicating from the new primary
    failed: tuple[str, ...] = ()  # members that could not be re-pointed (down: Repoint later)
    needs_rejoin: tuple[str, ...] = ()  # members an operator must re-join (PostgreSQL)


@dataclass(frozen=True)
class Positions:
    """ReadPositions' answer: each member's position, None when it could not be read."""

    offsets: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class StepFailed:
    """A step raised or ran out of time. `unknown` = a commit may or may not have been applied."""

    message: str
    unknown: bool = False


StepResult = bool | CommitResult | ProxyAcks | PromoteResult | Positions | StepFailed | None
