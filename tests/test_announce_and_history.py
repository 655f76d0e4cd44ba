"""Issue 14 item 1 (announce parity, fencing tokens) and issue 11 item 5 (the failover history
replicated through Raft; repoints coalesced), at the levels below the node: the state machine,
the decider, the runner and the history publisher."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakes import eventually, orders_spec
from test_decider import D, Harness, P, R, healthy, spec

from repstage_mesh.core.errors import DecisionRefused
from repstage_mesh.core.models import (
    CommandEnvelope,
    FailoverEntry,
    LeadershipMode,
    LeadershipSource,
    MeshState,
    Outcome,
    PutService,
    RecordFailover,
    SetPrimary,
)
from repstage_mesh.core.state import apply, decode_state, encode_state, replay
from repstage_mesh.decide import AwaitClose, AwaitProxies, Commit, PromoteResult, Repoint
from repstage_mesh.failover.history import HistoryPublisher
from repstage_mesh.failover.runner import FailoverRunner

# --- the state machine ------------------------------------------------------------------------


def _orders() -> MeshState:
    state, _ = replay([PutService(spec=orders_spec())])
    return state


def test_claimed_epoch_is_a_monotonic_fencing_token() -> None:
    """The issue's example: a claim of 100 answered epoch 12, and a later claim of 50 was accepted."""
    state = _orders()
    state, out = apply(state, SetPrimary(service="orders", member="a", token=100), state.index + 1)
    assert out.ok and state.services["orders"].claim == 100
    for claim in (50, 100):
        after, out = apply(state, SetPrimary(service="orders", member="b", token=claim), state.index + 1)
        assert not out.ok and out.rejection is not None and out.rejection.code == "stale_epoch"
        assert out.rejection.field == "epoch" and after.services == state.services
    state, out = apply(state, SetPrimary(service="orders", member="b", token=101), state.index + 1)
    assert out.ok and state.services["orders"].primary == "b" and state.services["orders"].claim == 101
    # our epoch stays the Raft index of the commit, whatever the caller claimed
    assert state.services["orders"].epoch == state.index


def test_a_newer_claim_of_the_same_primary_is_kept_without_a_routing_change() -> None:
    state = _orders()
    last = state.last_change
    state, out = apply(state, SetPrimary(service="orders", member="a", token=3), state.index + 1)
    assert out.ok and out.result["changed"] is False
    assert state.services["orders"].claim == 3 and state.last_change == last


def _entry(n: int, rev: int = 1, status: str = "running") -> FailoverEntry:
    return FailoverEntry(id=f"cp-1-{n}", rev=rev, record={"id": f"cp-1-{n}", "status": status})


def test_history_is_bounded_and_never_goes_back() -> None:
    state = _orders()
    last = state.last_change
    for n in range(1, 6):
        state, out = apply(state, RecordFailover(entry=_entry(n), keep=3, key=f"k{n}", keep_keys=2), state.index + 1)
    assert out.result["dropped"] == 1 and out.result["keys_dropped"] == 1
    assert [e.id for e in state.failovers] == ["cp-1-3", "cp-1-4", "cp-1-5"]  # the oldest dropped
    assert state.request_keys == (("k4", "cp-1-4"), ("k5", "cp-1-5"))
    assert state.last_change == last  # routing did not change: no new xDS version
    state, _ = apply(state, RecordFailover(entry=_entry(4, rev=3, status="done"), keep=3), state.index + 1)
    state, out = apply(state, RecordFailover(entry=_entry(4, rev=2), keep=3), state.index + 1)  # late
    assert out.result["changed"] is False
    assert state.failover("cp-1-4") == _entry(4, rev=3, status="done")
    assert state.request_key("k4") == "cp-1-4" and state.request_key("k1") is None
    assert decode_state(encode_state(state)) == state


# --- the decider ----------------------------------------------------------------------------------


def follow_harness() -> Harness:
    h = Harness(spec(LeadershipMode.FOLLOW, source=LeadershipSource.ANNOUNCE))
    healthy(h)
    return h


def test_announce_is_break_before_make_with_a_close_wait() -> None:
    h = follow_harness()
    record_id, steps = h.decider.announce("cache", "b", 1.0, token=7, cause="patroni", close_wait=0.11)
    out = h.run(steps, 1.0)
    names = [type(s).__name__ for s in out]
    assert names == ["Commit", "AwaitProxies", "AwaitClose", "Commit", "AwaitProxies", "Done"]
    fence, route = (s for s in out if isinstance(s, Commit))
    assert fence.command.member is None and fence.command.token == 7  # the claim rides the first commit
    assert route.command.member == "b" and route.command.token is None
    close = next(s for s in out if isinstance(s, AwaitClose))
    assert close.seconds == pytest.approx(0.11)
    rec = h.decider.record(record_id)
    assert rec is not None and rec.status == "done" and rec.kind == "announce" and rec.claim == 7
    events = [e.name for e in rec.timeline]
    assert events.index("proxies_fenced") < events.index("connections_closed") < events.index("committed")
    assert h.primary == "b" and h.state.services["cache"].claim == 7


def test_announce_refusals_change_nothing() -> None:
    h = follow_harness()
    h.run(h.decider.announce("cache", "b", 1.0, token=7)[1], 1.0)
    before = h.state
    for member, token, code in (("c", 7, "stale_epoch"), ("c", 3, "stale_epoch"), ("zz", 8, "not_found")):
        with pytest.raises(DecisionRefused) as caught:
            h.decider.announce("cache", member, 2.0, token=token)
        assert caught.value.code == code
    assert h.state == before and len(h.decider.records()) == 1


def test_announce_without_fence_and_of_the_current_primary() -> None:
    h = follow_harness()
    out = h.run(h.decider.announce("cache", "b", 1.0, fence=False)[1], 1.0)
    assert [type(s).__name__ for s in out] == ["Commit", "Done"]  # answers once committed
    assert h.primary == "b"
    epoch = h.state.services["cache"].epoch
    record_id, steps = h.decider.announce("cache", "b", 2.0, token=9)
    h.run(steps, 2.0)
    rec = h.decider.record(record_id)
    assert rec is not None and rec.status == "done"
    assert h.state.services["cache"].epoch == epoch and h.state.services["cache"].claim == 9


def _stray_harness() -> Harness:
    h = Harness(spec())
    healthy(h, offsets=(300, 200, 250))
    h.see("a", D, 1.0)
    assert h.primary == "c"
    h.see("c", P, 1.1, 260)
    return h


def test_a_member_that_cannot_be_repointed_gets_one_record_and_backs_off() -> None:
    h = _stray_harness()
    h.promote_ok["a"] = False  # every re-point of a fails
    h.see("a", P, 2.0, 300)
    repoints: list[Repoint] = []
    now = 2.3
    while now < 40.0:
        repoints += [s for s in h.tick(now) if isinstance(s, Repoint)]
        now += 0.1
    records = [r for r in h.decider.records() if r.kind == "repoint"]
    assert len(records) == 1, [r.id for r in records]  # one record per outage
    rec = records[0]
    assert rec.status == "running" and rec.attempts == len(repoints)
    # 2, 4, 8, 16, 30 s apart: 6 tries in ~38 s instead of 19
    assert 4 <= len(repoints) <= 7, len(repoints)
    assert [e.name for e in rec.timeline].count("attempt_failed") == 1  # one event per new error
    h.promote_ok["a"] = True
    now += 30.0
    h.tick(now)
    assert rec.status == "done" and rec.attempts == len(repoints) + 1


def test_one_repoint_in_flight_per_member() -> None:
    h = _stray_harness()
    h.see("a", P, 2.0, 300)
    first = [s for s in h.decider.tick(2.3) if isinstance(s, Repoint)]
    assert len(first) == 1
    assert [s for s in h.decider.tick(10.0) if isinstance(s, Repoint)] == []  # still in flight
    h.decider.step_done(first[0], PromoteResult(True, "ok"), 10.1)
    rec = h.decider.record(first[0].record_id)
    assert rec is not None and rec.status == "done" and rec.attempts == 1


def test_a_repoint_record_ends_when_the_member_follows_the_primary() -> None:
    h = _stray_harness()
    h.promote_ok["a"] = False
    h.see("a", P, 2.0, 300)
    h.tick(2.3)
    (rec,) = [r for r in h.decider.records() if r.kind == "repoint"]
    h.see("a", R, 3.0, 300, upstream="127.0.0.1:7003")  # someone else re-joined it
    h.tick(3.1)
    assert rec.status == "done" and "no longer" in rec.reason


# --- the runner and the publisher ---------------------------------------------------------------


class Store:
    """Commits with the real state machine; `gate` holds Repoint/commit steps when set."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.history: list[RecordFailover] = []

    async def submit(self, envelope: CommandEnvelope, timeout: float) -> Outcome:
        command = envelope.command
        self.h.state, outcome = apply(self.h.state, command, self.h.state.index + 1)
        self.h.decider.on_state(self.h.state)
        if isinstance(command, RecordFailover):
            self.history.append(command)
        return outcome


class SlowRepoints:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def promote(self, *args: Any) -> PromoteResult:
        return PromoteResult(True, "ok")

    async def repoint(self, *args: Any) -> PromoteResult:
        self.started.set()
        await self.release.wait()
        return PromoteResult(False, "timed out")

    async def positions(self, *args: Any) -> dict[str, int | None]:
        return {}

    def hook_timeout(self, spec: Any) -> float | None:
        return None


async def test_a_hanging_repoint_does_not_delay_an_announce_and_history_is_committed() -> None:
    h = _stray_harness()
    store = Store(h)
    promoter = SlowRepoints()
    publisher = HistoryPublisher(store.submit, keep=10)

    async def proxies(min_index: int, deadline: float) -> Any:
        return h.answer(AwaitProxies("cache", "", min_index, deadline, "route"), 0.0)

    async def confirm(timeout: float) -> bool:
        return True

    runner = FailoverRunner(h.decider, store.submit, confirm, proxies, promoter, history=publisher)
    h.see("a", P, 2.0, 300)
    runner.dispatch(h.decider.tick(2.3))  # a re-point that hangs
    await asyncio.wait_for(promoter.started.wait(), 5)
    record = await asyncio.wait_for(runner.announce("cache", "b", close_wait=0.0), 5)
    assert record.status == "done" and h.primary == "b"
    promoter.release.set()
    await runner.idle(5)
    await publisher.close()
    by_id = {e.id: e for e in h.state.failovers}
    assert by_id[record.id].record["status"] == "done"  # committed at its end
    revs = [c.entry.rev for c in store.history if c.entry.id == record.id]
    assert revs[0] == 1 and len(revs) >= 3  # start, major steps, end
    repoint = next(e for e in h.state.failovers if e.record["kind"] == "repoint")
    assert repoint.record["attempts"] == 1


async def test_a_new_leader_ends_the_records_left_running() -> None:
    h = follow_harness()
    state = h.state
    state, _ = apply(state, RecordFailover(entry=FailoverEntry(
        id="cp-9-1", rev=2, record={"id": "cp-9-1", "node": "cp-9", "status": "running"})), state.index + 1)
    h.state = state
    h.decider.on_state(state)
    store = Store(h)
    publisher = HistoryPublisher(store.submit)
    assert publisher.interrupted(state, lambda _id: False, "cp-1") == ["cp-9-1"]
    await publisher.close()
    entry = h.state.failover("cp-9-1")
    assert entry is not None and entry.rev == 3 and entry.record["status"] == "failed"
    assert "interrupted" in entry.record["reason"] and "cp-9" in entry.record["reason"]


def test_record_ids_skip_those_the_replicated_history_holds() -> None:
    h = follow_harness()
    state, _ = apply(h.state, RecordFailover(entry=FailoverEntry(id="n1-1", rev=1, record={})), h.state.index + 1)
    h.state = state
    h.decider.on_state(state)
    record_id, _ = h.decider.announce("cache", "b", 1.0)
    assert record_id == "n1-2"  # a restarted node does not reuse n1-1


async def test_the_publisher_keeps_one_commit_in_flight_and_sends_only_the_newest_after_it() -> None:
    gate = asyncio.Event()
    sent: list[RecordFailover] = []

    async def submit(envelope: CommandEnvelope, timeout: float) -> Outcome:
        assert isinstance(envelope.command, RecordFailover)
        sent.append(envelope.command)
        await gate.wait()
        return Outcome(ok=True, result={"dropped": 0})

    h = follow_harness()
    publisher = HistoryPublisher(submit, keep=7, keep_keys=9)
    record_id, _ = h.decider.announce("cache", "b", 1.0, key="k")
    record = h.decider.record(record_id)
    assert record is not None
    publisher.changed(record)
    publisher.changed(record)  # nothing new: no commit
    for name in ("fenced", "proxies_fenced", "committed"):
        record.event(name, 1.1)
        publisher.changed(record)  # queued behind the first; each replaces the one before
    await eventually(lambda: len(sent) == 1, "the first commit is in flight")
    assert [c.entry.rev for c in sent] == [1]
    gate.set()
    await publisher.close()
    assert [c.entry.rev for c in sent] == [1, 4]  # the newest only
    assert sent[-1].entry.record["timeline"][-1]["name"] == "committed"
    assert {(c.keep, c.keep_keys, c.key) for c in sent} == {(7, 9, "k")}
