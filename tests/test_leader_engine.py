"""LeaderEngine with in-memory doubles: a fake seat, a recording runner, recording sources.

The engine follows leadership by events (`leadership_changed`) and retries a failed
confirmation by itself after CONFIRM_RETRY. Tests wait on conditions with a deadline
(`eventually`), never on a bare sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import pytest
from fakes import eventually, orders_spec

from repstage_mesh.core.models import (
    LeadershipMode,
    LeadershipSource,
    LeadershipSpec,
    MeshState,
    PutService,
    ServiceSpec,
    ServiceState,
)
from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.core.state import apply
from repstage_mesh.decide import Decider, ProxyAcks
from repstage_mesh.failover import engine as engine_module
from repstage_mesh.failover.engine import CONFIRM_TIMEOUT, LeaderEngine, LeaderSeat
from repstage_mesh.failover.runner import FailoverRunner

DEADLINE = 3.0
LOST = "this node is no longer the Raft leader"



def with_service(state: MeshState, spec: ServiceSpec) -> MeshState:
    new, outcome = apply(state, PutService(spec=spec), state.index + 1)
    assert outcome.ok
    return new


class FakeSeat:
    """The node as the engine sees it: flags for leadership and readiness, a confirmation that
    answers from a script (then True), and a count of how often the engine looked."""

    def __init__(self, state: MeshState) -> None:
        self.mesh = state
        self.leader = False
        self.is_ready = True
        self.answers: list[bool] = []
        self.confirms: list[float] = []
        self.looks = 0

    def believes_leader(self) -> bool:
        self.looks += 1
        return self.leader

    async def confirm(self, timeout: float) -> bool:
        self.confirms.append(timeout)
        return self.answers.pop(0) if self.answers else True

    def seat(self) -> LeaderSeat:
        return LeaderSeat(
            node_id="n1", state=lambda: self.mesh, ready=lambda: self.is_ready,
            believes_leader=self.believes_leader, confirm_leadership=self.confirm,
        )


class FakeRunner:
    """Records what the engine asks of the failover runner."""

    def __init__(self) -> None:
        self.states: list[MeshState] = []
        self.observed: list[Observation] = []
        self.starts = 0
        self.closes: list[str] = []

    def on_state(self, state: MeshState) -> None:
        self.states.append(state)

    def observe(self, obs: Observation) -> None:
        self.observed.append(obs)

    def start(self) -> None:
        self.starts += 1

    async def close(self, reason: str = "the failover runner stopped") -> None:
        self.closes.append(reason)


class FakeSource:
    """A leadership source: records the services it is given and its starts and stops."""

    def __init__(self) -> None:
        self.services: list[list[str]] = []
        self.calls: list[str] = []
        self.running = False

    def set_services(self, services: Iterable[ServiceState | ServiceSpec]) -> None:
        self.services.append(sorted(s.name for s in services))
        self.calls.append("set_services")

    async def start(self) -> None:
        self.calls.append("start")
        self.running = True

    async def stop(self) -> None:
        self.calls.append("stop")
        self.running = False


class Rig:
    def __init__(self) -> None:
        self.seat = FakeSeat(with_service(MeshState(), orders_spec()))
        self.runner = FakeRunner()
        self.sources = [FakeSource(), FakeSource()]
        self.hooked: list[Observation] = []
        self.engine = LeaderEngine(self.seat.seat(), self.runner, on_observation=self.hooked.append)  # type: ignore[arg-type]
        for source in self.sources:
            self.engine.add_source(source)

    async def look_again(self) -> None:
        """Signal a leadership change and wait until the engine has looked at the seat."""
        looks = self.seat.looks
        self.engine.leadership_changed()
        await eventually(lambda: self.seat.looks > looks, "the engine looks at the seat")

    async def lead(self) -> None:
        self.seat.leader = True
        self.engine.leadership_changed()
        await eventually(lambda: self.engine.active, "the engine activates")


@pytest.fixture
async def rig() -> Any:
    rig = Rig()
    rig.engine.start()
    try:
        yield rig
    finally:
        await rig.engine.stop()


def obs(member: str = "a", status: MemberStatus = MemberStatus.PRIMARY) -> Observation:
    return Observation("orders", member, status, at=time.monotonic(), source="probe:tcp")


# --- activation ---------------------------------------------------------------------------------


async def test_not_leader_starts_nothing(rig: Rig) -> None:
    await rig.look_again()
    assert not rig.engine.active
    assert rig.seat.confirms == []
    assert rig.runner.starts == 0 and rig.runner.closes == []
    assert all(s.calls == [] for s in rig.sources)


async def test_leader_but_not_ready_starts_nothing_until_ready(rig: Rig) -> None:
    rig.seat.leader, rig.seat.is_ready = True, False
    await rig.look_again()
    assert not rig.engine.active and rig.seat.confirms == [] and rig.runner.starts == 0

    rig.seat.is_ready = True
    rig.engine.leadership_changed()  # what the node does when it becomes ready
    await eventually(lambda: rig.engine.active, "the engine activates once ready")
    assert rig.seat.confirms == [CONFIRM_TIMEOUT]


async def test_becoming_leader_confirms_then_starts_sources_and_runner(rig: Rig) -> None:
    await rig.lead()
    assert rig.seat.confirms == [CONFIRM_TIMEOUT]
    for source in rig.sources:
        assert source.calls == ["set_services", "start"]
        assert source.services == [["orders"]]
    assert rig.runner.starts == 1
    assert rig.runner.states[-1] is rig.seat.mesh  # the runner's decider is current before it starts
    assert rig.runner.closes == []


async def test_failed_confirmation_is_retried_without_a_new_event(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "CONFIRM_RETRY", 0.02)
    rig.seat.answers = [False, False]
    rig.seat.leader = True
    rig.engine.leadership_changed()  # the only event
    await eventually(lambda: len(rig.seat.confirms) >= 1, "a first confirmation")
    await eventually(lambda: rig.engine.active, "activation after the retries succeed")
    assert len(rig.seat.confirms) == 3  # False, False, then True: no more after success
    assert rig.runner.starts == 1
    assert all(s.calls == ["set_services", "start"] for s in rig.sources)


async def test_nothing_starts_while_confirmation_keeps_failing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "CONFIRM_RETRY", 0.02)
    rig.seat.answers = [False] * 1000
    rig.seat.leader = True
    rig.engine.leadership_changed()
    await eventually(lambda: len(rig.seat.confirms) >= 3, "the confirmation is retried")
    assert not rig.engine.active
    assert rig.runner.starts == 0 and all(s.calls == [] for s in rig.sources)

    rig.seat.leader = False  # stepped down: the retries end
    await rig.look_again()
    asked = len(rig.seat.confirms)
    looks = rig.seat.looks
    # a negative check: over many retry periods, neither a look nor a confirmation happens
    await asyncio.sleep(10 * engine_module.CONFIRM_RETRY)
    assert rig.seat.looks == looks and len(rig.seat.confirms) == asked
    assert not rig.engine.active and rig.runner.closes == []


# --- deactivation -------------------------------------------------------------------------------


async def test_losing_leadership_closes_runner_and_stops_sources(rig: Rig) -> None:
    await rig.lead()
    rig.seat.leader = False
    rig.engine.leadership_changed()
    await eventually(lambda: not rig.engine.active, "the engine deactivates")
    assert rig.runner.closes == [LOST]
    for source in rig.sources:
        assert source.calls == ["set_services", "start", "stop"]
        assert not source.running

    # leading again: confirmed and started again, from the then current state
    rig.seat.mesh = with_service(rig.seat.mesh, orders_spec(name="billing", listen_port=15010, read_port=None))
    await rig.lead()
    assert rig.runner.starts == 2 and len(rig.seat.confirms) == 2
    assert all(s.services[-1] == ["billing", "orders"] and s.running for s in rig.sources)


async def test_not_ready_any_more_deactivates(rig: Rig) -> None:
    await rig.lead()
    rig.seat.is_ready = False
    rig.engine.leadership_changed()
    await eventually(lambda: not rig.engine.active, "the engine deactivates")
    assert rig.runner.closes == [LOST]


async def test_stop_deactivates_and_ends_the_follow_task(rig: Rig) -> None:
    await rig.lead()
    follow = rig.engine._follow
    assert follow is not None and not follow.done()
    await rig.engine.stop()
    assert follow.done()
    assert not rig.engine.active
    assert rig.runner.closes == ["node stopping"]
    assert all(s.calls[-1] == "stop" and not s.running for s in rig.sources)
    await rig.engine.stop()  # idempotent (the fixture stops it again)
    assert rig.runner.closes == ["node stopping"]


async def test_stop_while_inactive_closes_nothing(rig: Rig) -> None:
    await rig.look_again()
    await rig.engine.stop()
    assert rig.engine._follow is not None and rig.engine._follow.done()
    assert rig.runner.closes == [] and all(s.calls == [] for s in rig.sources)


# --- state and observations -----------------------------------------------------------------------


async def test_on_state_while_inactive_reaches_only_the_runner(rig: Rig) -> None:
    state = with_service(rig.seat.mesh, orders_spec(name="billing", listen_port=15010, read_port=None))
    rig.engine.on_state(state)
    assert rig.runner.states == [state]
    assert all(s.calls == [] for s in rig.sources)


async def test_on_state_while_active_updates_the_sources(rig: Rig) -> None:
    await rig.lead()
    state = with_service(rig.seat.mesh, orders_spec(name="billing", listen_port=15010, read_port=None))
    rig.engine.on_state(state)
    assert rig.runner.states[-1] is state
    for source in rig.sources:
        assert source.services == [["orders"], ["billing", "orders"]]


async def test_observe_feeds_the_hook_always_and_the_runner_only_while_active(rig: Rig) -> None:
    before = obs("a")
    rig.engine.observe(before)
    assert rig.hooked == [before] and rig.runner.observed == []

    await rig.lead()
    during = obs("b", MemberStatus.REPLICA)
    rig.engine.observe(during)
    assert rig.hooked == [before, during] and rig.runner.observed == [during]

    rig.seat.leader = False
    rig.engine.leadership_changed()
    await eventually(lambda: not rig.engine.active, "the engine deactivates")
    after = obs("a", MemberStatus.DOWN)
    rig.engine.observe(after)
    assert rig.hooked == [before, during, after] and rig.runner.observed == [during]


# --- with the real FailoverRunner and Decider ---------------------------------------------------


# --- sources that fail or are slow to start ---------------------------------------------------


async def test_a_source_that_fails_to_start_is_undone_and_retried(rig: Rig) -> None:
    failures = [RuntimeError("consul agent unreachable")]
    start = rig.sources[1].start

    async def flaky() -> None:
        if failures:
            raise failures.pop()
        await start()

    rig.sources[1].start = flaky  # type: ignore[method-assign]
    rig.seat.leader = True
    rig.engine.leadership_changed()
    # the first source was started, then stopped again when the second one failed ...
    await eventually(lambda: rig.sources[0].calls[:3] == ["set_services", "start", "stop"], "undone")
    assert not rig.engine.active and rig.runner.starts == 0
    # ... and the engine tries again by itself (no new event) and gets there
    await eventually(lambda: rig.engine.active, "the engine activates on the retry")
    assert rig.sources[0].running and rig.sources[1].running and rig.runner.starts == 1
    assert not rig.engine._follow.done()  # type: ignore[union-attr]


async def test_stop_while_a_source_is_starting_stops_the_started_ones() -> None:
    rig = Rig()
    gate = asyncio.Event()

    async def never() -> None:
        await gate.wait()

    rig.sources[1].start = never  # type: ignore[method-assign]
    rig.engine.start()
    rig.seat.leader = True
    rig.engine.leadership_changed()
    await eventually(lambda: rig.sources[0].running, "the first source started")
    await rig.engine.stop()
    assert not rig.sources[0].running and rig.sources[0].calls[-1] == "stop"
    assert not rig.engine.active and rig.runner.starts == 0


async def test_a_state_applied_while_sources_start_reaches_them(rig: Rig) -> None:
    gate = asyncio.Event()
    start = rig.sources[0].start

    async def slow() -> None:
        await gate.wait()
        await start()

    rig.sources[0].start = slow  # type: ignore[method-assign]
    rig.seat.leader = True
    rig.engine.leadership_changed()
    await eventually(lambda: len(rig.seat.confirms) == 1 and rig.sources[0].services, "starting")
    newer = with_service(rig.seat.mesh, orders_spec(name="billing", listen_port=15010, read_port=None))
    rig.seat.mesh = newer
    rig.engine.on_state(newer)
    gate.set()
    await eventually(lambda: rig.engine.active, "the engine activates")
    assert [source.services[-1] for source in rig.sources] == [["billing", "orders"]] * 2


class Promoter:
    async def promote(self, *args: Any) -> Any:
        raise AssertionError("no promotion expected")

    async def repoint(self, *args: Any) -> Any:
        raise AssertionError("no repoint expected")

    async def positions(self, spec: Any, members: Any, timeout: float) -> dict[str, int | None]:
        return dict.fromkeys(members)

    def hook_timeout(self, spec: Any) -> float | None:
        return None


async def test_real_runner_ticks_only_while_leading_and_abandons_plans_on_loss() -> None:
    spec = orders_spec(leadership=LeadershipSpec(source=LeadershipSource.PROBE, mode=LeadershipMode.ORCHESTRATE))
    seat = FakeSeat(with_service(MeshState(), spec))
    confirms: list[float] = []

    async def confirm(timeout: float) -> bool:
        confirms.append(timeout)
        return True

    async def commit(envelope: Any, timeout: float) -> Any:
        raise AssertionError("nothing should be committed")

    async def await_proxies(min_index: int, timeout: float) -> ProxyAcks:
        return ProxyAcks({})

    runner = FailoverRunner(Decider("n1", settle=0.0), commit, confirm, await_proxies, Promoter())
    engine = LeaderEngine(seat.seat(), runner)
    source = FakeSource()
    engine.add_source(source)
    engine.start()
    try:
        seat.leader = True
        engine.leadership_changed()
        await eventually(lambda: engine.active, "the engine activates")
        assert runner.decider.state is seat.mesh
        ticker = runner._ticker
        assert ticker is not None and not ticker.done()

        # a switchover waiting for catch-up (positions stay unknown), then leadership is lost
        now = time.monotonic()
        engine.observe(Observation("orders", "a", MemberStatus.PRIMARY, now, "probe:tcp"))
        engine.observe(Observation("orders", "b", MemberStatus.REPLICA, now, "probe:tcp"))
        switchover = asyncio.create_task(runner.switchover("orders", "b", timeout=30.0))
        await eventually(lambda: runner.decider.running("orders") is not None, "the switchover runs")

        seat.leader = False
        engine.leadership_changed()
        await eventually(lambda: not engine.active, "the engine deactivates")
        assert ticker.done() and runner._ticker is None
        record = await asyncio.wait_for(switchover, DEADLINE)
        assert record.status == "failed"
        assert record.reason is not None and LOST in record.reason
        assert source.calls == ["set_services", "start", "stop"]
    finally:
        await engine.stop()
