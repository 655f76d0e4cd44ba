"""What leadership sources report, and the debouncing of raw probe results (sans-IO).

An `Observation` is one source's view of one member at one moment: primary, replica, down or
unknown, with the replication position (Redis offset or PostgreSQL LSN as an int) when the source
knows it. Sources (probes, Consul) produce them; the decider consumes them.

`ProbeTracker` turns a member's raw probe results (`ProbeResult`) into Observations with
HAProxy-style hysteresis: a member is DOWN after `fall` consecutive failed probes and takes a new
up status (PRIMARY, REPLICA or UNKNOWN-but-up) after `rise` consecutive successful probes that
agree on it. It emits only when the debounced status changes, when a stable member's upstream
changes, and at most every `offset_refresh` seconds to carry a moved offset. No I/O, no clock:
the caller passes `now`.

A refused connection (a killed process: the kernel answers RST at once) and a silent one (a
stopped process or a partition: the probe times out) are told apart. Every failure counts toward
`fall`; but `refused_fall` consecutive REFUSED results (each one already confirmed by the prober
on a fresh connection) are conclusive on their own: with the default 2, a refused probe and one
quick retry (`confirming` tells the runner to probe again after `retry_interval` rather than
the interval) mark a killed member DOWN, while a silent member keeps `fall` x interval (a lost
probe or a pause is no reason to fail over). The DOWN observation's `cause` says which rule
decided (REFUSED, or the last failure's kind) and its `detail` starts with that kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from repstage_mesh.core.models import LeadershipSource, ServiceSpec, ServiceState

__all__ = [
    "MemberStatus",
    "Observation",
    "ProbeOutcome",
    "ProbeResult",
    "ProbeTracker",
    "parse_lsn",
]


class MemberStatus(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"
    DOWN = "down"  # refused or silent `fall` times in a row (probe), failing checks (Consul)
    UNKNOWN = "unknown"  # up but role unknown (TCP probe), or no information (Consul unreachable)


@dataclass(frozen=True)
class Observation:
    """One source's view of one member. `at` is monotonic seconds."""

    service: str
    member: str
    status: MemberStatus
    at: float
    source: str  # "probe:redis", "probe:postgres", "probe:http", "probe:tcp", "consul"
    detail: str = ""
    offset: int | None = None  # Redis master_repl_offset / slave offset, or a PostgreSQL LSN
    upstream: str | None = None  # for a replica: the address:port it replicates from, if known
    # Monotonic time of the first probe result of the streak that established this status (for
    # DOWN: the first failed probe), i.e. when the change began; None when the source cannot say.
    since: float | None = None
    # For DOWN: why. REFUSED when refused connections decided (the process is gone), TIMEOUT or
    # ERROR when `fall` failures did (the last one's kind); None for other statuses and sources.
    cause: ProbeOutcome | None = None


class ProbeOutcome(StrEnum):
    OK = "ok"
    REFUSED = "refused"  # connection refused or reset: the process is gone
    TIMEOUT = "timeout"  # no answer within the probe timeout: stopped, hung or partitioned
    ERROR = "error"  # an answer that says the member cannot serve (auth failure, LOADING, ...)


@dataclass(frozen=True)
class ProbeResult:
    """One raw probe answer. For OK, `role` is PRIMARY, REPLICA or UNKNOWN (up, role unknown)."""

    outcome: ProbeOutcome
    role: MemberStatus | None = None
    offset: int | None = None
    upstream: str | None = None
    detail: str = ""
    latency: float = 0.0

    def __post_init__(self) -> None:
        if self.outcome is ProbeOutcome.OK:
            if self.role not in (MemberStatus.PRIMARY, MemberStatus.REPLICA, MemberStatus.UNKNOWN):
                raise ValueError(
                    f"role: an OK probe result needs primary, replica or unknown, got {self.role!r}"
                )
        elif self.role is not None:
            raise ValueError(f"role: a {self.outcome} probe result has no role")

    @classmethod
    def ok(
        cls,
        role: MemberStatus,
        *,
        offset: int | None = None,
        upstream: str | None = None,
        detail: str = "",
        latency: float = 0.0,
    ) -> ProbeResult:
        return cls(ProbeOutcome.OK, role, offset, upstream, detail, latency)

    @classmethod
    def failed(cls, outcome: ProbeOutcome, detail: str = "", latency: float = 0.0) -> ProbeResult:
        return cls(outcome, None, None, None, detail, latency)

    @property
    def succeeded(self) -> bool:
        return self.outcome is ProbeOutcome.OK


def parse_lsn(text: str) -> int:
    """PostgreSQL's 'X/Y' LSN (hex halves) as one int: (X << 32) + Y."""
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) + int(low, 16)


@dataclass
class _Streak:
    """The current run of agreeing probe results: up with one role, or failed."""

    status: MemberStatus | None = None  # DOWN for a failure run, the role for a success run
    length: int = 0
    started: float = 0.0  # when the streak's first probe started (its `now` minus its latency)
    kinds: list[str] = field(default_factory=list)  # failure kinds of a failure run, oldest first
    refused: int = 0  # consecutive REFUSED results at the end of a failure run


class ProbeTracker:
    """Debounces one member's probe results into Observations (interval/fall/rise hysteresis).

    The status starts as "nothing known" (`status is None`); the first debounced status is
    emitted whatever it is, including UNKNOWN for a TCP-probed member that is up.
    `refused_fall` (default: `fall`, i.e. no special rule) is how many consecutive REFUSED
    results are enough for DOWN; it only ever shortens `fall`.
    """

    def __init__(
        self,
        service: str,
        member: str,
        *,
        fall: int,
        rise: int,
        source: str,
        offset_refresh: float = 1.0,
        refused_fall: int | None = None,
    ) -> None:
        if refused_fall is not None and refused_fall < 1:
            raise ValueError(f"refused_fall: must be at least 1, got {refused_fall}")
        if fall < 1:
            raise ValueError(f"fall: must be at least 1, got {fall}")
        if rise < 1:
            raise ValueError(f"rise: must be at least 1, got {rise}")
        if offset_refresh < 0:
            raise ValueError(f"offset_refresh: must not be negative, got {offset_refresh}")
        self.service = service
        self.member = member
        self.fall = fall
        self.refused_fall = min(fall, refused_fall) if refused_fall is not None else fall
        self.rise = rise
        self.source = source
        self.offset_refresh = offset_refresh
        self._streak = _Streak()
        self._emitted: Observation | None = None
        self._latest: Observation | None = None
        self.probes = 0

    @property
    def status(self) -> MemberStatus | None:
        """The debounced status, None until the first one is established."""
        return self._emitted.status if self._emitted else None

    @property
    def confirming(self) -> bool:
        """The last result was REFUSED and the member is not DOWN yet: the next probe, a fresh
        connection, would confirm it (the runner then probes after `retry_interval`)."""
        streak = self._streak
        return (
            streak.status is MemberStatus.DOWN
            and streak.refused > 0
            and self.status is not MemberStatus.DOWN
        )

    @property
    def last_emitted(self) -> Observation | None:
        return self._emitted

    @property
    def latest(self) -> Observation | None:
        """The debounced status with the freshest offset/upstream seen (not necessarily emitted):
        what a switchover asks for when it waits for a replica to catch up."""
        return self._latest

    def feed(self, result: ProbeResult, now: float) -> Observation | None:
        """Take one probe result; return an Observation when there is something new to say."""
        self.probes += 1
        status = result.role if result.succeeded else MemberStatus.DOWN
        assert status is not None
        streak = self._streak
        if streak.status is status:
            streak.length += 1
        else:
            self._streak = streak = _Streak(status=status, length=1, started=now - result.latency)
        if not result.succeeded:
            streak.kinds.append(str(result.outcome))
            del streak.kinds[: -self.fall]
            streak.refused = streak.refused + 1 if result.outcome is ProbeOutcome.REFUSED else 0

        current = self.status
        if status is not current and self._earned(streak):
            return self._emit(self._observation(status, result, now))
        if status is current and current is not None:
            return self._refresh(result, now)
        return None

    def _earned(self, streak: _Streak) -> bool:
        """The streak is long enough for its status: rise successes, fall failures, or
        refused_fall refused connections in a row."""
        if streak.status is not MemberStatus.DOWN:
            return streak.length >= self.rise
        return streak.length >= self.fall or streak.refused >= self.refused_fall

    def _observation(self, status: MemberStatus, result: ProbeResult, now: float) -> Observation:
        if status is MemberStatus.DOWN:
            streak = self._streak
            kinds = streak.kinds[-self.fall :]
            head = f"{result.outcome}: {result.detail}" if result.detail else str(result.outcome)
            if streak.length < self.fall:  # the refused rule decided
                detail = f"{head} ({streak.refused} consecutive refused connections, each on a fresh connection)"
            else:
                detail = f"{head} ({len(kinds)} consecutive failures: {', '.join(kinds)})"
            return Observation(
                self.service,
                self.member,
                status,
                now,
                self.source,
                detail,
                since=streak.started,
                cause=result.outcome,
            )
        return Observation(
            self.service,
            self.member,
            status,
            now,
            self.source,
            result.detail,
            result.offset,
            result.upstream,
            since=self._streak.started,
        )

    def _refresh(self, result: ProbeResult, now: float) -> Observation | None:
        """Same debounced status: track offset/upstream, emit when the upstream changed or the
        offset moved and `offset_refresh` has passed since the last emission."""
        emitted = self._emitted
        assert emitted is not None
        if not result.succeeded:
            return None
        latest = replace(
            emitted, at=now, offset=result.offset, upstream=result.upstream, detail=result.detail
        )
        self._latest = latest
        if result.upstream != emitted.upstream:
            return self._emit(latest)
        if result.offset != emitted.offset and now - emitted.at >= self.offset_refresh:
            return self._emit(latest)
        return None

    def _emit(self, observation: Observation) -> Observation:
        self._emitted = observation
        self._latest = observation
        return observation


def specs_with_source(services: Iterable[Any], source: LeadershipSource) -> list[ServiceSpec]:
    """The specs (from ServiceStates or ServiceSpecs) whose leadership comes from `source`."""
    specs = (s.spec if isinstance(s, ServiceState) else s for s in services)
    return [spec for spec in specs if spec.leadership.source is source]
