"""A cross-service consistent point, sans-IO: events in, actions out (one action at a time).

The Raft leader runs one `PointWorkflow` per request (`snapshots/points.py` executes it):

    intent (StartHold: the services, each one's member, the window)
    one StartSnapshot per service (group = the point's id; the member's role and epoch)
    holding + hold_until (committed: every node renders the HTTP hold until then by itself)
    [http services] every proxy of every node ACKed the hold
    Pause: CLIENT PAUSE <ms left> WRITE on each Redis primary (Redis ends it by itself)
    TakePoints: each service's point while writes are held (a fork at the primary's offset)
    Unpause: CLIENT UNPAUSE on each primary (always, whatever happened)
    released (points, held_ms)      → the HTTP hold route goes
    FinishTakes (the transfers started at the point) → one UpdateSnapshot per service

A failure before the points are taken aborts the point (`aborted`) and fails its snapshots.
Nothing waits on the hold: its deadline is `hold_until` for the mesh and the pause's own
timeout for Redis. `resume_hold` is the decision of a new leader for a point left open.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from repstage_mesh.core.models import (
    HoldEntry,
    Role,
    SnapshotEntry,
    SnapshotStep,
    StartHold,
    StartSnapshot,
    UpdateHold,
    UpdateSnapshot,
)
from repstage_mesh.snapshots.actions.base import ActionResult
from repstage_mesh.snapshots.workflow import AwaitProxies, Committed, Done, Finished

__all__ = [
    "FinishTakes",
    "HoldCommit",
    "Pause",
    "PointPlan",
    "PointWorkflow",
    "PointsTaken",
    "ServicePlan",
    "TakePoints",
    "Taken",
    "Unpause",
    "resume_hold",
]


@dataclass(frozen=True)
class HoldCommit:
    command: StartHold | UpdateHold | StartSnapshot | UpdateSnapshot


@dataclass(frozen=True)
class Pause:
    """CLIENT PAUSE `ms` WRITE on the primary of each of `services` (Redis)."""

    services: tuple[str, ...]
    ms: int


@dataclass(frozen=True)
class TakePoints:
    """Each service's point while writes are held, by wall-clock `deadline` at the latest."""

    deadline: float


@dataclass(frozen=True)
class Unpause:
    services: tuple[str, ...]


@dataclass(frozen=True)
class FinishTakes:
    timeout: float


Action = HoldCommit | AwaitProxies | Pause | TakePoints | Unpause | FinishTakes | Finished


@dataclass(frozen=True)
class PointsTaken:
    now: float
    points: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Taken:
    now: float
    results: Mapping[str, ActionResult | str] = field(default_factory=dict)  # a str: why it failed


Event = Committed | Done | PointsTaken | Taken


@dataclass(frozen=True)
class ServicePlan:
    service: str
    member: str
    role: Role
    epoch: int
    kind: str  # "redis" | "http"
    snapshot_id: str
    reason: str = ""  # why this member


@dataclass(frozen=True)
class PointPlan:
    hold_id: str
    node: str
    services: tuple[ServicePlan, ...]
    window_ms: int
    take_timeout: float = 600.0
    ack_timeout: float = 5.0
    keep: int = 100
    trace: dict[str, str] | None = None

    @property
    def redis(self) -> tuple[str, ...]:
        return tuple(s.service for s in self.services if s.kind == "redis")

    @property
    def http(self) -> tuple[str, ...]:
        return tuple(s.service for s in self.services if s.kind == "http")


class Phase(StrEnum):
    INTENT = "intent"
    SNAPSHOTS = "snapshots"
    HOLD = "hold"
    ACK_HOLD = "ack_hold"
    PAUSE = "pause"
    POINTS = "points"
    UNPAUSE = "unpause"
    RELEASE = "release"
    TAKES = "takes"
    RECORD = "record"
    ABORT = "abort"
    DONE = "done"


@dataclass
class PointWorkflow:
    plan: PointPlan
    phase: Phase = Phase.INTENT
    started: int = 0  # snapshot intents committed
    recorded: int = 0
    hold_until: float = 0.0
    paused_at: float = 0.0
    held_ms: float = 0.0
    points: dict[str, dict[str, str]] = field(default_factory=dict)
    results: dict[str, ActionResult | str] = field(default_factory=dict)
    error: str = ""
    pending: list[SnapshotStep] = field(default_factory=list)

    def start(self, now: float) -> Action:
        p = self.plan
        entry = HoldEntry(
            id=p.hold_id, services=tuple(s.service for s in p.services), window_ms=p.window_ms,
            members={s.service: s.member for s in p.services}, leader=p.node, trace=p.trace,
            snapshots={s.service: s.snapshot_id for s in p.services},
            steps=(SnapshotStep(name="intent", at=now, ok=True, detail=f"by {p.node}"),),
        )
        return HoldCommit(StartHold(entry=entry, keep=p.keep))

    def handle(self, event: Event) -> Action:
        handler = getattr(self, f"_on_{self.phase.value}")
        action: Action = handler(event)
        return action

    # --- before the hold -----------------------------------------------------------------------

    def _on_intent(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            self.phase, self.error = Phase.DONE, f"intent refused: {event.detail}"
            return Finished("failed", self.error)
        return self._next_snapshot(event.now)

    def _next_snapshot(self, now: float) -> Action:
        self.phase = Phase.SNAPSHOTS
        if self.started < len(self.plan.services):
            s = self.plan.services[self.started]
            entry = SnapshotEntry(
                id=s.snapshot_id, service=s.service, member=s.member, role=s.role, epoch=s.epoch,
                kind=s.kind if s.kind == "redis" else "tcp", requested=f"consistent point: {s.reason}"[:64],
                lease_holder=self.plan.node, group=self.plan.hold_id, trace=self.plan.trace,
                steps=(SnapshotStep(name="intent", at=now, ok=True, detail=f"consistent point {self.plan.hold_id}"),),
            )
            return HoldCommit(StartSnapshot(entry=entry, keep=self.plan.keep))
        self.phase = Phase.HOLD
        self.hold_until = now + self.plan.window_ms / 1000
        return HoldCommit(UpdateHold(id=self.plan.hold_id, status="holding", hold_until=self.hold_until))

    def _on_snapshots(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            return self._abort(f"snapshot intent of {self.plan.services[self.started].service} refused: {event.detail}", event.now)
        self.started += 1
        return self._next_snapshot(event.now)

    def _on_hold(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            return self._abort(f"hold commit failed: {event.detail}", event.now)
        if self.plan.http:
            self.phase = Phase.ACK_HOLD
            return AwaitProxies(event.index, min(self.plan.ack_timeout, self._left(event.now)))
        return self._pause(event.now)

    def _on_ack_hold(self, event: Event) -> Action:
        assert isinstance(event, Done)
        self._step("proxies_acked_hold", event.now, event.ok, event.detail)
        if not event.ok:
            cap = "consistent_hold: " if event.now >= self.hold_until - 0.001 else ""
            return self._unpause_then_abort(f"{cap}the proxies did not ACK the hold: {event.detail}", event.now)
        return self._pause(event.now)

    def _left(self, now: float) -> float:
        return max(0.0, self.hold_until - now)

    def _pause(self, now: float) -> Action:
        self.paused_at = now
        ms = int(self._left(now) * 1000)
        if ms < 1:
            return self._unpause_then_abort("consistent_hold: the window ended before the pause", now)
        self.phase = Phase.PAUSE
        if not self.plan.redis:
            self.phase = Phase.POINTS
            return TakePoints(self.hold_until)
        return Pause(self.plan.redis, ms)

    # --- while writes are held -----------------------------------------------------------------

    def _on_pause(self, event: Event) -> Action:
        assert isinstance(event, Done)
        self._step("paused", event.now, event.ok, event.detail)
        if not event.ok:
            return self._unpause_then_abort(f"pause failed: {event.detail}", event.now)
        self.phase = Phase.POINTS
        return TakePoints(self.hold_until)

    def _on_points(self, event: Event) -> Action:
        assert isinstance(event, PointsTaken)
        self._step("points", event.now, not event.error, event.error or ", ".join(sorted(event.points)))
        if event.error:
            return self._unpause_then_abort(event.error, event.now)
        self.points = {k: dict(v) for k, v in event.points.items()}
        self.phase = Phase.UNPAUSE
        return Unpause(self.plan.redis)

    def _unpause_then_abort(self, error: str, now: float) -> Action:
        self.error = self.error or error
        self.phase = Phase.UNPAUSE
        return Unpause(self.plan.redis)

    def _on_unpause(self, event: Event) -> Action:
        assert isinstance(event, Done)
        self.held_ms = max(0.0, (event.now - self.paused_at) * 1000) if self.paused_at else 0.0
        self._step("unpaused", event.now, event.ok, event.detail)
        if self.error:
            return self._abort(self.error, event.now)
        self.phase = Phase.RELEASE
        return self._hold_update(status="released", points=self.points, held_ms=round(self.held_ms, 3))

    def _on_release(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        # Not landing changes no point: the deadline releases the mesh and Redis anyway.
        self.phase = Phase.TAKES
        return FinishTakes(self.plan.take_timeout)

    # --- after the hold ------------------------------------------------------------------------

    def _on_takes(self, event: Event) -> Action:
        assert isinstance(event, Taken)
        self.results = dict(event.results)
        self.phase = Phase.RECORD
        return self._record(event.now)

    def _record(self, now: float) -> Action:
        if self.recorded >= self.started:
            self.phase = Phase.DONE
            failed = [s for s, r in self.results.items() if isinstance(r, str)]
            if self.error:
                return Finished("aborted", self.error)
            return Finished("failed" if failed else "completed", "; ".join(f"{s}: {self.results[s]}" for s in failed))
        s = self.plan.services[self.recorded]
        result = self.results.get(s.service, self.error or "no point was taken")
        step = SnapshotStep(name="take", at=now, ok=not isinstance(result, str),
                            detail=(result if isinstance(result, str) else result.artifact)[:2000])
        if isinstance(result, str):
            command = UpdateSnapshot(id=s.snapshot_id, status="failed", error=result[:2000], steps=(step,))
        else:
            point = {**dict(result.point), **self.points.get(s.service, {}), "group": self.plan.hold_id}
            command = UpdateSnapshot(id=s.snapshot_id, status="completed", artifact=result.artifact,
                                     point=point, size_bytes=result.size_bytes, steps=(step,))
        return HoldCommit(command)

    def _on_record(self, event: Event) -> Action:
        assert isinstance(event, Committed)
        if not event.ok:
            s = self.plan.services[self.recorded]
            if not isinstance(self.results.get(s.service), str):
                self.results[s.service] = f"not completed: {event.detail}"
        self.recorded += 1
        return self._record(event.now)

    # --- the abort -----------------------------------------------------------------------------

    def _abort(self, error: str, now: float) -> Action:
        self.error = self.error or error
        self.phase = Phase.ABORT
        self.results = {}
        return self._hold_update(status="aborted", error=self.error[:2000])

    def _on_abort(self, event: Event) -> Action:
        assert isinstance(event, Committed)  # landed or not: the deadline releases anyway
        self.phase = Phase.RECORD
        return self._record(event.now)

    def _hold_update(self, **fields: object) -> Action:
        steps, self.pending = tuple(self.pending), []
        return HoldCommit(UpdateHold(id=self.plan.hold_id, steps=steps, **fields))  # type: ignore[arg-type]

    def _step(self, name: str, now: float, ok: bool, detail: str) -> None:
        self.pending.append(SnapshotStep(name=name, at=now, ok=ok, detail=detail[:2000]))


def resume_hold(entry: HoldEntry, node: str, now: float) -> tuple[tuple[str, ...], UpdateHold]:
    """What a new leader does with a point another leader left open: unpause the Redis
    primaries of its services (harmless if the pause already ended; the services' kinds are the
    caller's to filter), then commit it aborted."""
    why = f"interrupted: leader {entry.leader or '?'} stopped leading; {node} aborted it"
    step = SnapshotStep(name="takeover", at=now, ok=True, detail=why)
    return entry.services, UpdateHold(id=entry.id, status="aborted", leader=node, error=why, steps=(step,))
