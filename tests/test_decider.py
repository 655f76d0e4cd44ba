"""The failover decider: plans, candidate choice, hysteresis, switchover, and properties."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from repstage_mesh.core.errors import DecisionRefused
from repstage_mesh.core.models import (
    LeadershipMode,
    LeadershipSource,
    LeadershipSpec,
    Member,
    MeshState,
    PutService,
    ServiceSpec,
    SetPrimary,
)
from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.core.state import apply
from repstage_mesh.decide import (
    AwaitProxies,
    Commit,
    CommitResult,
    ConfirmLeadership,
    Decider,
    Done,
    Positions,
    Promote,
    PromoteResult,
    ProxyAcks,
    ReadPositions,
    Repoint,
    Step,
    StepFailed,
    StepResult,
)

P, R, D, U = MemberStatus.PRIMARY, MemberStatus.REPLICA, MemberStatus.DOWN, MemberStatus.UNKNOWN
NAMES = ("a", "b", "c")


def spec(
    mode: LeadershipMode = LeadershipMode.ORCHESTRATE,
    *,
    interval: float = 5.0,
    max_lag: int | None = None,
    primary: str | None = "a",
    source: LeadershipSource = LeadershipSource.PROBE,
) -> ServiceSpec:
    members = tuple(Member(name=n, address="127.0.0.1", port=7001 + i) for i, n in enumerate(NAMES))
    return ServiceSpec(
        name="cache", listen_port=6379, members=members, primary=primary,
        leadership=LeadershipSpec(source=source, mode=mode, min_failover_interval=interval,
                                  max_lag_bytes=max_lag, ack_deadline=1.0),
    )


@dataclass
class Harness:
    """Executes steps against the real state machine; knobs say how each step answers."""

    spec: ServiceSpec
    settle: float = 0.2
    leader: bool = True
    promote_ok: dict[str, bool] = field(default_factory=dict)
    proxies: tuple[str, ...] = ("envoy-1", "envoy-2")
    state: MeshState = field(default_factory=MeshState)
    executed: list[Step] = field(default_factory=list)
    commits: list[tuple[SetPrimary, int, str | None]] = field(default_factory=list)
    positions: Callable[[float], dict[str, int | None]] = lambda now: {}
    acks: ProxyAcks | None = None  # what AwaitProxies answers instead of "all ACKed"
    decider: Decider = field(init=False)

    def __post_init__(self) -> None:
        self.decider = Decider("n1", settle=self.settle, catchup_timeout=3.0)
        self.commit(PutService(spec=self.spec))

    def commit(self, command: PutService | SetPrimary) -> CommitResult:
        self.state, outcome = apply(self.state, command, self.state.index + 1)
        self.decider.on_state(self.state)
        if not outcome.ok:
            assert outcome.rejection is not None
            return CommitResult(False, message=outcome.rejection.message, code=outcome.rejection.code)
        if isinstance(command, SetPrimary) and outcome.result["changed"]:
            self.commits.append((command, outcome.result["epoch"], command.member))
        return CommitResult(True, epoch=outcome.result["epoch"])

    def answer(self, step: Step, now: float) -> StepResult:
        if isinstance(step, ConfirmLeadership):
            return self.leader
        if isinstance(step, Commit):
            return self.commit(step.command)
        if isinstance(step, AwaitProxies):
            if self.acks is not None:
                return self.acks
            return ProxyAcks(acked={p: now + 0.001 * (i + 1) for i, p in enumerate(self.proxies)})
        if isinstance(step, Promote | Repoint):
            ok = self.promote_ok.get(step.member, True)
            return PromoteResult(ok, detail="ok" if ok else "refused")
        if isinstance(step, ReadPositions):
            return Positions({m: self.positions(now).get(m) for m in step.members})
        return None

    def run(self, steps: list[Step], now: float) -> list[Step]:
        """Execute steps (and the steps they lead to) until only Done remains."""
        queue = list(steps)
        out: list[Step] = []
        while queue:
            step = queue.pop(0)
            out.append(step)
            if isinstance(step, Done):
                continue
            self.executed.append(step)
            if isinstance(step, ReadPositions):
                now += step.delay  # the executor waits the poll interval
            queue.extend(self.decider.step_done(step, self.answer(step, now), now))
        return out

    def see(self, member: str, status: MemberStatus, at: float, offset: int | None = None,
            upstream: str | None = None) -> list[Step]:
        obs = Observation("cache", member, status, at, "probe:redis", "", offset, upstream)
        return self.run(self.decider.observe(obs), at)

    def tick(self, now: float) -> list[Step]:
        return self.run(self.decider.tick(now), now)

    @property
    def primary(self) -> str | None:
        svc = self.state.service("cache")
        assert svc is not None
        return svc.primary


def kinds(steps: list[Step]) -> list[str]:
    return [type(s).__name__ for s in steps]


def healthy(h: Harness, at: float = 0.0, offsets: tuple[int, int, int] = (100, 100, 100)) -> None:
    h.see("a", P, at, offsets[0])
    h.see("b", R, at, offsets[1])
    h.see("c", R, at, offsets[2])


# --- follow mode --------------------------------------------------------------------------------


def test_follow_primary_down_and_another_claims_primary_is_break_before_make() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW))
    healthy(h)
    assert h.tick(1.0) == []
    h.see("b", P, 1.0, 120)
    steps = h.see("a", D, 1.25)
    assert kinds(steps) == ["ConfirmLeadership", "Commit", "AwaitProxies", "Commit", "AwaitProxies", "Done"]
    fence, route = steps[1], steps[3]
    assert isinstance(fence, Commit) and fence.command.member is None
    assert isinstance(route, Commit) and route.command.member == "b"
    assert route.command.epoch == fence.command.epoch + 1 if fence.command.epoch else False
    assert h.primary == "b"
    assert [m for _, _, m in h.commits] == [None, "b"]
    rec = h.decider.records()[0]
    assert rec.status == "done" and rec.old_primary == "a" and rec.new_primary == "b"
    names = [e.name for e in rec.timeline]
    for expected in ("detected", "decided", "leadership_confirmed", "fenced", "proxies_fenced",
                     "committed", "acked", "first_routable", "done"):
        assert expected in names
    assert names.index("fenced") < names.index("proxies_fenced") < names.index("committed")
    assert rec.write_unavailable_ms is not None and rec.write_unavailable_ms >= 0
    json.dumps(rec.as_dict())  # JSON-serialisable


def test_follow_unsettled_claimer_fences_first_and_is_routed_once_settled() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW))
    healthy(h)
    h.see("b", P, 1.0, 120)
    steps = h.see("a", D, 1.1)  # b claims primary for only 0.1 s: fence now, route to b later
    assert kinds(steps) == ["ConfirmLeadership", "Commit", "AwaitProxies", "Done"]
    assert h.primary is None
    steps = h.tick(1.25)
    assert kinds(steps) == ["ConfirmLeadership", "Commit", "AwaitProxies", "Done"]
    assert h.primary == "b"


def test_follow_primary_down_nobody_claims_primary_fails_closed_then_fills() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW))
    healthy(h)
    steps = h.see("a", D, 1.0)
    assert kinds(steps) == ["ConfirmLeadership", "Commit", "AwaitProxies", "Done"]
    assert h.primary is None
    assert h.decider.records()[0].kind == "fail_closed"
    # a replica is promoted by someone else: routed once it has settled, without a second fence
    assert h.see("c", P, 1.5, 130) == []
    steps = h.tick(1.8)
    assert kinds(steps) == ["ConfirmLeadership", "Commit", "AwaitProxies", "Done"]
    assert h.primary == "c"


def test_follow_split_brain_keeps_current_unless_it_is_behind() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW, interval=0.0))
    healthy(h, offsets=(500, 400, 400))
    h.see("b", P, 1.0, 450)  # b claims primary but a is ahead: no flap
    assert h.tick(2.0) == [] and h.primary == "a"
    steps = h.see("b", P, 2.1, 900)  # b is now ahead of a (a is the isolated old primary)
    assert kinds(steps)[:4] == ["ConfirmLeadership", "Commit", "AwaitProxies", "Commit"]
    assert h.primary == "b"
    # a replicating from b also counts as superseded
    h2 = Harness(spec(LeadershipMode.FOLLOW, interval=0.0))
    healthy(h2, offsets=(500, 400, 400))
    h2.see("b", P, 1.0)
    assert h2.tick(2.0) == [] and h2.primary == "a"
    h2.see("a", R, 2.0, None, upstream="127.0.0.1:7002")  # demoted by its orchestrator
    assert h2.primary == "b"
    assert h2.tick(2.1) == [] and h2.primary == "b"


def test_unknown_primary_is_kept_not_guessed() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW))
    h.see("b", P, 0.0, 100)
    assert h.tick(5.0) == [] and h.primary == "a"


def test_announce_source_is_never_decided() -> None:
    h = Harness(spec(LeadershipMode.ORCHESTRATE, source=LeadershipSource.ANNOUNCE))
    healthy(h)
    assert h.see("a", D, 1.0) == [] and h.tick(10.0) == [] and h.primary == "a"


# --- orchestrate mode ---------------------------------------------------------------------------


def test_orchestrate_promotes_the_replica_with_the_highest_offset() -> None:
    h = Harness(spec())
    healthy(h, offsets=(300, 200, 250))
    steps = h.see("a", D, 1.0)
    assert kinds(steps) == ["ConfirmLeadership", "Commit", "AwaitProxies", "Promote", "Commit",
                            "AwaitProxies", "Done"]
    promote = steps[3]
    assert isinstance(promote, Promote) and promote.member == "c" and promote.old_primary == "a"
    assert h.primary == "c"
    assert [m for _, _, m in h.commits] == [None, "c"]


def test_orchestrate_ties_go_to_member_order_and_down_is_refused() -> None:
    h = Harness(spec())
    healthy(h, offsets=(300, 250, 250))
    h.see("a", D, 1.0)
    assert h.primary == "b"
    h = Harness(spec())
    healthy(h, offsets=(300, 280, 250))
    h.see("b", D, 0.5)
    h.see("a", D, 1.0)
    assert h.primary == "c"


def test_orchestrate_refuses_replicas_further_behind_than_max_lag() -> None:
    h = Harness(spec(max_lag=50))
    healthy(h, offsets=(1000, 900, 920))
    steps = h.see("a", D, 1.0)
    assert not any(isinstance(s, Promote) for s in steps)
    assert h.primary is None  # fail closed: no eligible replica
    rec = h.decider.records()[0]
    assert rec.kind == "fail_closed" and "max_lag_bytes" in rec.cause


def test_failed_promotion_tries_the_next_candidate_then_stays_closed() -> None:
    h = Harness(spec(), promote_ok={"c": False})
    healthy(h, offsets=(300, 200, 250))
    steps = h.see("a", D, 1.0)
    promoted = [s.member for s in steps if isinstance(s, Promote)]
    assert promoted == ["c", "b"] and h.primary == "b"
    h = Harness(spec(), promote_ok={"b": False, "c": False})
    healthy(h)
    steps = h.see("a", D, 1.0)
    assert h.primary is None and [m for _, _, m in h.commits] == [None]
    rec = h.decider.records()[0]
    assert rec.status == "failed" and "every candidate" in rec.reason
    assert [e.name for e in rec.timeline].count("promote_failed") == 2


def test_old_primary_that_comes_back_is_repointed() -> None:
    h = Harness(spec())
    healthy(h, offsets=(300, 200, 250))
    h.see("a", D, 1.0)
    assert h.primary == "c"
    h.see("c", P, 1.1, 260)
    assert h.see("a", P, 2.0, 300) == []  # not settled yet
    steps = h.tick(2.3)
    assert len(steps) == 1 and isinstance(steps[0], Repoint)
    assert steps[0].member == "a" and steps[0].new_primary == "c"
    assert h.primary == "c"  # nothing committed for it
    assert h.tick(2.4) == []  # rate-limited


def test_a_replica_following_the_wrong_primary_is_repointed() -> None:
    h = Harness(spec())
    healthy(h, offsets=(300, 200, 250))
    h.see("a", D, 1.0)
    assert h.primary == "c"
    h.see("c", P, 1.1, 260)
    h.see("b", R, 1.1, 200, upstream="127.0.0.1:7001")  # still following the dead a
    steps = h.tick(1.4)
    assert [(s.member, s.new_primary) for s in steps if isinstance(s, Repoint)] == [("b", "c")]
    h.see("b", R, 1.5, 260, upstream="127.0.0.1:7003")
    assert h.tick(5.0) == []


def test_several_claimers_without_a_committed_primary_stay_closed_unless_one_is_ahead() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW, primary=None))
    h.see("a", P, 0.0)
    h.see("b", P, 0.0)
    h.see("c", R, 0.0)
    assert h.tick(1.0) == [] and h.primary is None
    assert "several members claim primary" in h.decider.status()["cache"]["blocked"]
    h.see("b", P, 1.1, 50)
    h.tick(1.2)
    assert h.primary == "b"


def test_no_commit_without_confirmed_leadership() -> None:
    h = Harness(spec(), leader=False)
    healthy(h)
    steps = h.see("a", D, 1.0)
    assert kinds(steps) == ["ConfirmLeadership", "Done"]
    assert h.primary == "a" and h.commits == []
    assert "stale leader" in h.decider.records()[0].reason
    assert h.tick(1.1) == []  # backs off before asking again
    h.leader = True
    steps = h.tick(1.6)
    assert kinds(steps)[:2] == ["ConfirmLeadership", "Commit"] and h.primary == "b"


def test_state_moved_while_confirming_aborts_the_plan() -> None:
    h = Harness(spec())
    healthy(h)
    steps = h.decider.observe(Observation("cache", "a", D, 1.0, "probe:redis"))
    assert kinds(steps) == ["ConfirmLeadership"]
    h.commit(SetPrimary(service="cache", member="b", cause="announce"))  # someone else moved it
    nxt = h.decider.step_done(steps[0], True, 1.01)
    assert kinds(nxt) == ["Done"] and not nxt[0].ok  # type: ignore[union-attr]


def test_stale_epoch_claims_are_refused_by_the_state_machine() -> None:
    h = Harness(spec())
    healthy(h)
    steps = h.decider.observe(Observation("cache", "a", D, 1.0, "probe:redis"))
    fence = h.decider.step_done(steps[0], True, 1.0)[0]
    assert isinstance(fence, Commit)
    h.commit(SetPrimary(service="cache", member="b", cause="announce"))
    result = h.commit(fence.command)
    assert not result.ok and result.code == "stale_epoch"
    assert kinds(h.decider.step_done(fence, result, 1.0)) == ["Done"]
    assert h.primary == "b"


def test_commit_outcome_unknown_ends_the_plan_and_it_is_retried_from_committed_state() -> None:
    h = Harness(spec())
    healthy(h)
    steps = h.decider.observe(Observation("cache", "a", D, 1.0, "probe:redis"))
    fence = h.decider.step_done(steps[0], True, 1.0)[0]
    assert kinds(h.decider.step_done(fence, StepFailed("timeout", unknown=True), 1.1)) == ["Done"]
    steps = h.tick(2.0)  # never emitted a second fence at once; a new plan starts later
    assert kinds(steps)[0] == "ConfirmLeadership" and h.primary == "b"


# --- hysteresis -----------------------------------------------------------------------------------


def test_flapping_primary_causes_one_failover_per_interval_follow() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW, interval=5.0))
    healthy(h)
    t = 1.0
    while t < 4.9:
        h.see("a", D, t)
        h.tick(t + 0.1)
        h.see("a", P, t + 0.2, 100)
        h.tick(t + 0.5)
        t += 0.6
    fences = [c for c, _, m in h.commits if m is None]
    assert len(fences) == 1
    h.see("a", D, 5.5)
    h.tick(6.1)
    assert len([c for c, _, m in h.commits if m is None]) == 2


def test_flapping_promoted_replica_does_not_cause_a_storm_orchestrate() -> None:
    h = Harness(spec(interval=5.0))
    healthy(h, offsets=(300, 200, 250))
    h.see("a", D, 1.0)
    assert h.primary == "c"
    h.see("c", P, 1.1, 260)
    for i in range(10):
        h.see("c", D, 1.5 + i * 0.3)
        h.tick(1.6 + i * 0.3)
        h.see("c", P, 1.7 + i * 0.3, 260)
    promotions = [s for s in h.executed if isinstance(s, Promote)]
    assert len(promotions) == 1
    assert "hysteresis" in h.decider.status()["cache"]["blocked"] or h.primary == "c"


# --- switchover -----------------------------------------------------------------------------------


def test_switchover_waits_for_catch_up_then_break_before_make() -> None:
    h = Harness(spec())
    healthy(h, offsets=(1000, 900, 800))
    # b catches up at t=1.3; writes stop reaching a once it is fenced, b then matches a's last offset
    h.positions = lambda now: {"a": 1000 if now < 1.3 else 1010, "b": 900 if now < 1.3 else 1010}
    rid, steps = h.decider.switchover("cache", "b", 1.0)
    steps = h.run(steps, 1.0)
    names = kinds(steps)
    first_confirm = names.index("ConfirmLeadership")
    assert set(names[:first_confirm]) == {"ReadPositions"} and first_confirm >= 6  # polled ~0.3 s
    assert names[first_confirm:] == ["ConfirmLeadership", "Commit", "AwaitProxies", "ReadPositions",
                                     "Promote", "Commit", "AwaitProxies", "Done"]
    assert h.primary == "b"
    assert [m for _, _, m in h.commits] == [None, "b"]
    rec = h.decider.record(rid)
    assert rec is not None and rec.status == "done" and rec.mode == "switchover"
    events = [e.name for e in rec.timeline]
    assert events.count("caught_up") == 2
    assert events.index("caught_up") < events.index("fenced") < events.index("promoted")
    assert rec.write_unavailable_ms is not None and 0 <= rec.write_unavailable_ms <= 1000


def test_switchover_times_out_without_changing_anything() -> None:
    h = Harness(spec())
    healthy(h, offsets=(1000, 900, 800))
    h.positions = lambda now: {"a": 1000, "b": 950}
    rid, steps = h.decider.switchover("cache", "b", 1.0, timeout=2.0)
    steps = h.run(steps, 1.0)
    assert kinds(steps)[-1] == "Done" and "ConfirmLeadership" not in kinds(steps)
    rec = h.decider.record(rid)
    assert rec is not None and rec.status == "failed" and "did not catch up" in rec.reason
    assert "lag 50" in rec.reason and rec.duration_ms is not None and rec.duration_ms >= 2000
    assert h.primary == "a" and h.commits == []


def test_switchover_that_falls_behind_after_fencing_restores_the_old_primary() -> None:
    h = Harness(spec())
    healthy(h)
    calls = itertools.count()
    # caught up at first; after fencing the old primary turns out ahead (writes in flight)
    h.positions = lambda now: {"a": 100 if next(calls) == 0 else 500, "b": 100}
    _, steps = h.decider.switchover("cache", "b", 1.0, timeout=1.0)
    h.run(steps, 1.0)
    assert h.primary == "a" and [m for _, _, m in h.commits] == [None, "a"]
    rec = h.decider.records()[0]
    assert rec.status == "failed" and "old primary restored" in rec.reason
    assert not any(isinstance(s, Promote) for s in h.executed)


def test_switchover_with_failed_promotion_restores_the_old_primary() -> None:
    h = Harness(spec(), promote_ok={"b": False})
    healthy(h)
    h.positions = lambda now: {"a": 100, "b": 100}
    _, steps = h.decider.switchover("cache", "b", 1.0)
    h.run(steps, 1.0)
    assert h.primary == "a" and [m for _, _, m in h.commits] == [None, "a"]
    assert h.decider.records()[0].status == "failed"


@pytest.mark.parametrize(
    ("service", "target", "field", "code"),
    [("nope", "b", "service", "not_found"), ("cache", "zz", "to", "not_found"),
     ("cache", "a", "to", "conflict")],
)
def test_switchover_refuses_bad_requests(service: str, target: str, field: str, code: str) -> None:
    h = Harness(spec())
    healthy(h)
    with pytest.raises(DecisionRefused) as err:
        h.decider.switchover(service, target, 1.0)
    assert err.value.field == field and err.value.code == code
    assert h.decider.records() == []


def test_switchover_refused_in_follow_mode_and_while_a_plan_runs() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW))
    healthy(h)
    with pytest.raises(DecisionRefused, match="follow mode"):
        h.decider.switchover("cache", "b", 1.0)
    h = Harness(spec())
    healthy(h)
    h.decider.switchover("cache", "b", 1.0)
    with pytest.raises(DecisionRefused, match="already running"):
        h.decider.switchover("cache", "c", 1.0)


def test_records_are_bounded() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW, interval=0.0))
    h.decider = Decider("n1", settle=0.0, history=3)
    h.decider.on_state(h.state)
    healthy(h)
    h.leader = False
    for i in range(6):
        h.tick(1.0 + i)
        h.see("a", D, 1.0 + i)
    assert len(h.decider.records()) == 3


# --- properties -------------------------------------------------------------------------------------


class DeciderMachine(RuleBasedStateMachine):
    """Random observations, time, leadership, promotion outcomes and external announcements; steps
    are executed one at a time, interleaved with everything else."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = LeadershipMode.ORCHESTRATE
        self.h: Harness | None = None
        self.now = 0.0
        self.pending: list[Step] = []
        self.confirmed_records: set[str] = set()
        self.epochs: dict[int, str | None] = {}
        self.auto_moves: list[float] = []

    @initialize(mode=st.sampled_from(list(LeadershipMode)))
    def start(self, mode: LeadershipMode) -> None:
        self.mode = mode
        self.h = Harness(spec(mode, interval=3.0), settle=0.2)
        for name, status in zip(NAMES, (P, R, R), strict=True):
            self._queue(self.h.decider.observe(Observation("cache", name, status, 0.0, "probe", "", 3)))

    def _queue(self, steps: list[Step]) -> None:
        self.pending.extend(s for s in steps if not isinstance(s, Done))

    @rule(member=st.sampled_from(NAMES), status=st.sampled_from([P, R, D, U]),
          offset=st.one_of(st.none(), st.integers(0, 5)))
    def observe(self, member: str, status: MemberStatus, offset: int | None) -> None:
        assert self.h is not None
        self._queue(self.h.decider.observe(
            Observation("cache", member, status, self.now, "probe", "", offset)))

    @rule(dt=st.sampled_from([0.05, 0.3, 1.0, 3.5]))
    def advance(self, dt: float) -> None:
        assert self.h is not None
        self.now += dt
        self._queue(self.h.decider.tick(self.now))

    @rule()
    @precondition(lambda self: bool(self.pending))
    def drain(self) -> None:
        for _ in range(20):
            if not self.pending:
                break
            self.execute(True, True)

    @rule(leader=st.booleans(), ok=st.booleans())
    @precondition(lambda self: bool(self.pending))
    def execute(self, leader: bool, ok: bool) -> None:
        assert self.h is not None
        h = self.h
        step = self.pending.pop(0)
        if isinstance(step, ConfirmLeadership):
            result: StepResult = leader
            if leader:
                self.confirmed_records.add(step.record_id)
        elif isinstance(step, Commit):
            # no Commit from a plan whose leadership was not confirmed
            assert step.record_id in self.confirmed_records
            svc = h.state.service("cache")
            assert svc is not None
            before = svc.primary
            result = h.commit(step.command)
            if isinstance(result, CommitResult) and result.ok:
                after = h.primary
                assert result.epoch is not None
                # one primary per epoch, and never straight from one member to another
                assert self.epochs.setdefault(result.epoch, after) == after
                assert not (before is not None and after is not None and before != after)
                record = h.decider.record(step.record_id)
                manual = record is not None and record.kind == "switchover"
                if before is not None and after != before and not manual:
                    self.auto_moves.append(self.now)
                event(f"commit {'fence' if after is None else 'route'}")
        elif isinstance(step, Promote | Repoint):
            result = PromoteResult(ok)
        elif isinstance(step, AwaitProxies):
            result = ProxyAcks({"p1": self.now})
        elif isinstance(step, ReadPositions):
            result = Positions({m: 3 if ok else None for m in step.members})
        else:
            result = None
        self._queue(h.decider.step_done(step, result, self.now))

    @rule(to=st.sampled_from(NAMES), timeout=st.sampled_from([0.2, 2.0]))
    def switchover(self, to: str, timeout: float) -> None:
        assert self.h is not None
        try:
            _, steps = self.h.decider.switchover("cache", to, self.now, timeout=timeout)
        except DecisionRefused:
            return
        event("switchover started")
        self._queue(steps)

    @rule(member=st.sampled_from((*NAMES, None)))
    def announce(self, member: str | None) -> None:
        assert self.h is not None
        svc = self.h.state.service("cache")
        assert svc is not None
        before = svc.primary
        ok = self.h.commit(SetPrimary(service="cache", member=member, cause="announce")).ok
        if ok and before is not None and self.h.primary not in (None, before):
            self.auto_moves.clear()  # an external move, not the decider's

    @invariant()
    def hysteresis(self) -> None:
        # automatic moves away from a primary: at most one per min_failover_interval (3 s)
        moves = self.auto_moves
        for earlier, later in itertools.pairwise(moves):
            assert later - earlier >= 3.0 - 1e-9, moves

    @invariant()
    def one_plan_at_a_time(self) -> None:
        plans = {s.record_id for s in self.pending if not isinstance(s, Repoint)}
        assert len(plans) <= 1


TestDeciderMachine = DeciderMachine.TestCase
TestDeciderMachine.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_backoff_doubles_for_failovers_in_a_row_and_resets_after_quiet() -> None:
    from repstage_mesh.decide.policy import MAX_BACKOFF
    from repstage_mesh.decide.policy import backoff as _backoff
    from repstage_mesh.decide.policy import count_failover as _count_failover
    from repstage_mesh.decide.view import ServiceView as _Service

    assert _backoff(4.0, 0) == 4.0 and _backoff(4.0, 1) == 4.0
    assert _backoff(4.0, 2) == 8.0 and _backoff(4.0, 3) == 16.0
    assert _backoff(4.0, 50) == 4.0 * MAX_BACKOFF
    from repstage_mesh.core.models import LeadershipSpec, Member, ServiceSpec, ServiceState

    s = _Service()
    svc = ServiceState(spec=ServiceSpec(
        name="cache", listen_port=1, members=(Member(name="a", address="127.0.0.1", port=2),),
        leadership=LeadershipSpec(min_failover_interval=4.0)))
    _count_failover(s, svc, 100.0)
    assert s.streak == 1
    _count_failover(s, svc, 105.0)  # within 2 x 4 s
    assert s.streak == 2
    _count_failover(s, svc, 118.0)  # within 2 x 8 s
    assert s.streak == 3
    _count_failover(s, svc, 200.0)  # quiet for longer than 2 x 16 s: a new streak
    assert s.streak == 1


def test_a_node_that_leads_again_does_not_act_on_what_it_saw_in_its_last_term() -> None:
    # Found by the chaos suite: leader, then not leader while another leader failed over to b,
    # then leader again. Its old views (b REPLICA, a PRIMARY) must not fail over back to a.
    h = Harness(spec())
    healthy(h)
    h.decider.abandon(1.0, "this node is no longer the Raft leader")
    h.commit(SetPrimary(service="cache", member="b"))  # the other leader's failover
    assert h.primary == "b"
    assert h.tick(10.0) == [] and h.primary == "b"  # nothing known yet: keep, do not guess
    h.see("a", R, 11.0, 100, upstream="b")
    h.see("b", P, 11.0, 100)
    assert h.tick(20.0) == [] and h.primary == "b"


def test_a_nacked_fence_and_an_unreachable_node_are_recorded_as_risks_with_envoys_error() -> None:
    h = Harness(spec(LeadershipMode.FOLLOW))
    h.acks = ProxyAcks(acked={"envoy-1#1": 0.5}, missed=("cp-2/envoy-2#4", "cp-3:unreachable"),
                       nacked={"cp-2/envoy-2#4": "cds: duplicate cluster"}, unreachable=("cp-3",))
    healthy(h)
    h.see("b", P, 1.0, 120)
    h.see("a", D, 1.25)
    rec = h.decider.records()[0]
    assert rec.status == "done" and rec.missed_fence == ("cp-2/envoy-2#4", "cp-3:unreachable")
    [fenced] = [e for e in rec.timeline if e.name == "proxies_fenced"]
    assert fenced.detail["nacked"] == {"cp-2/envoy-2#4": "cds: duplicate cluster"}
    assert fenced.detail["unreachable"] == ["cp-3"]
    [missed] = [e for e in rec.timeline if e.name == "route_missed"]
    assert missed.detail["nacked"] == {"cp-2/envoy-2#4": "cds: duplicate cluster"}
    json.dumps(rec.as_dict())
