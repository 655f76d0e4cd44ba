"""The linearizability checker: hand-made histories, unknown results, and generated histories."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from integration.history import HistoryRecorder, load_history, main, save_history
from integration.linearizability import (
    Operation,
    PrimaryRegister,
    Register,
    check,
)

_ids = iter(range(1_000_000))


def op(name: str, call: float, ret: float | None, output: dict[str, Any] | None = None,
       key: str = "k", **inp: Any) -> Operation:
    return Operation(id=next(_ids), key=key, name=name, input=inp, output=output, call=call, ret=ret)


def w(value: Any, call: float, ret: float | None, key: str = "k") -> Operation:
    return op("write", call, ret, None if ret is None else {}, key=key, value=value)


def w_unknown(value: Any, call: float) -> Operation:
    return op("write", call, None, None, value=value)


def r(value: Any, call: float, ret: float, key: str = "k") -> Operation:
    return op("read", call, ret, {"value": value}, key=key)


REG = Register(initial=0)


# --- a plain register ---------------------------------------------------------------------------


def test_sequential_and_concurrent_register_histories_are_linearizable() -> None:
    assert check([w(1, 0, 1), r(1, 2, 3), w(2, 4, 5), r(2, 6, 7)], REG).ok is True
    # a read concurrent with a write may see either value
    assert check([w(1, 0, 10), r(0, 1, 2), r(1, 3, 4)], REG).ok is True
    assert check([w(1, 0, 10), r(1, 1, 2), r(1, 3, 4)], REG).ok is True
    # two concurrent writes, reads agree on one order
    assert check([w(1, 0, 10), w(2, 0, 10), r(2, 11, 12), r(2, 13, 14)], REG).ok is True


def test_stale_read_after_a_completed_write_is_caught_and_reported() -> None:
    write, stale = w(1, 0, 1), r(0, 2, 3)
    result = check([write, stale], REG)
    assert result.ok is False
    report = result.report()
    json.dumps(report)  # a person can keep and re-check it
    key = report["keys"]["k"]
    assert [o["id"] for o in key["longest_linearizable_prefix"]] == [write.id]
    assert key["cannot_place"]["id"] == stale.id
    assert key["state_after_prefix"] == {"value": 1}
    assert report["failing_keys"] == ["k"]
    assert len(report["history"]["k"]) == 2


def test_new_then_old_value_during_one_write_is_not_linearizable() -> None:
    # the write is still running, but once a read saw 1 no later read may see 0
    assert check([w(1, 0, 10), r(1, 1, 2), r(0, 3, 4)], REG).ok is False


def test_keys_are_checked_independently() -> None:
    good = [w(1, 0, 1, key="a"), r(1, 2, 3, key="a")]
    bad = [w(1, 0, 1, key="b"), r(0, 2, 3, key="b")]
    result = check(good + bad, REG)
    assert result.ok is False
    assert result.keys["a"].ok is True and result.keys["b"].ok is False
    assert result.report()["failing_keys"] == ["b"]


# --- unknown results ----------------------------------------------------------------------------


def test_an_unknown_write_may_take_effect_late_or_never() -> None:
    assert check([w_unknown(1, 0), r(0, 1, 2), r(0, 3, 4)], REG).ok is True  # never
    assert check([w_unknown(1, 0), r(0, 1, 2), r(1, 3, 4)], REG).ok is True  # late
    assert check([w_unknown(1, 0), r(1, 1, 2), r(1, 30, 40)], REG).ok is True
    # but only once, and not before it was invoked
    assert check([w_unknown(1, 0), r(1, 1, 2), r(0, 3, 4)], REG).ok is False
    assert check([r(1, 0, 1), w_unknown(1, 2)], REG).ok is False


def test_an_unknown_operation_needs_no_response_time() -> None:
    with_ret = op("write", 0, 5.0, None, value=1)  # a time-out time is recorded, and ignored
    assert check([with_ret, r(1, 6, 7)], REG).ok is True


# --- the primary register -----------------------------------------------------------------------

PRIMARY = PrimaryRegister()


def set_p(member: str | None, call: float, ret: float | None, epoch: int | None = None,
          expected: int | None = None, rejected: bool = False, key: str = "db") -> Operation:
    output: dict[str, Any] | None
    if ret is None:
        output = None
    elif rejected:
        output = {"rejected": "stale_epoch"}
    else:
        output = {"primary": member, "epoch": epoch}
    return op("set_primary", call, ret, output, key=key, member=member, expected_epoch=expected)


def read_p(member: str | None, epoch: int, call: float, ret: float, key: str = "db") -> Operation:
    return op("read", call, ret, {"primary": member, "epoch": epoch}, key=key)


def test_primary_register_accepts_system_assigned_growing_epochs() -> None:
    history = [
        set_p("a", 0, 1, epoch=5),
        read_p("a", 5, 2, 3),
        set_p("b", 4, 5, epoch=9),
        read_p("b", 9, 6, 7),
        set_p("b", 8, 9, epoch=9),  # re-asserting the primary changes nothing
        read_p("b", 9, 10, 11),
    ]
    assert check(history, PRIMARY).ok is True


def test_primary_register_rejects_a_wrong_epoch_or_primary_after_a_write() -> None:
    assert check([set_p("a", 0, 1, epoch=5), read_p("a", 4, 2, 3)], PRIMARY).ok is False
    assert check([set_p("a", 0, 1, epoch=5), read_p("b", 5, 2, 3)], PRIMARY).ok is False
    # epochs only grow
    assert check([set_p("a", 0, 1, epoch=5), set_p("b", 2, 3, epoch=5)], PRIMARY).ok is False
    assert check([set_p("a", 0, 1, epoch=5), set_p("b", 2, 3, epoch=4)], PRIMARY).ok is False
    # re-asserting the current primary keeps its epoch
    assert check([set_p("a", 0, 1, epoch=5), set_p("a", 2, 3, epoch=7)], PRIMARY).ok is False


def test_stale_claims_are_refused_only_when_the_epoch_is_not_greater() -> None:
    assert check([set_p("a", 0, 1, epoch=5), set_p("b", 2, 3, expected=5, rejected=True)],
                 PRIMARY).ok is True
    assert check([set_p("a", 0, 1, epoch=5), set_p("b", 2, 3, expected=6, rejected=True)],
                 PRIMARY).ok is False
    assert check([set_p("a", 0, 1, epoch=5), set_p("b", 2, 3, epoch=8, expected=5)],
                 PRIMARY).ok is False
    assert check([set_p("a", 0, 1, epoch=5), set_p("b", 2, 3, epoch=8, expected=6)],
                 PRIMARY).ok is True


def test_an_unknown_set_leaves_an_interval_of_epochs_that_later_answers_narrow() -> None:
    lost = set_p("a", 0, None)  # timed out: epoch unknown, maybe never applied
    assert check([lost, read_p("a", 17, 5, 6)], PRIMARY).ok is True
    assert check([lost, read_p(None, 0, 5, 6)], PRIMARY).ok is True  # never applied
    assert check([lost, read_p("a", 0, 5, 6)], PRIMARY).ok is False  # epochs grow
    # a later claim with expected epoch 3 succeeded: the lost write, if it happened, got 1 or 2
    ok = [lost, set_p("b", 5, 6, epoch=10, expected=3), read_p("b", 10, 7, 8)]
    assert check(ok, PRIMARY).ok is True
    # ... but a read cannot then show the lost write with epoch 4 before it
    bad = [lost, read_p("a", 4, 1, 2), set_p("b", 5, 6, epoch=10, expected=3)]
    assert check(bad, PRIMARY).ok is False
    # a stale refusal for expected 7 means the lost write happened with an epoch of 7 or more
    refused = [lost, set_p("b", 5, 6, expected=7, rejected=True)]
    assert check(refused, PRIMARY).ok is True
    assert check([*refused, read_p("a", 6, 7, 8)], PRIMARY).ok is False
    assert check([*refused, read_p("a", 7, 7, 8)], PRIMARY).ok is True


CLAIMS = PrimaryRegister(claims=True)


def test_claims_are_fencing_tokens_independent_of_the_epoch() -> None:
    """Issue 14: the API's claimed epoch is the caller's token, compared with earlier tokens."""
    assert check([set_p("a", 0, 1, epoch=5, expected=100), set_p("b", 2, 3, expected=50, rejected=True)],
                 CLAIMS).ok is True
    assert check([set_p("a", 0, 1, epoch=5, expected=100), set_p("b", 2, 3, epoch=9, expected=50)],
                 CLAIMS).ok is False  # the bug: a lower claim accepted
    assert check([set_p("a", 0, 1, epoch=5, expected=2), set_p("b", 2, 3, epoch=9, expected=3)],
                 CLAIMS).ok is True  # below our epoch, above the last claim: fine
    assert check([set_p("b", 0, 1, expected=1, rejected=True)], CLAIMS).ok is False  # nothing claimed yet
    # a claim of the current primary keeps the epoch and raises the claim
    assert check([set_p("a", 0, 1, epoch=5), set_p("a", 2, 3, epoch=5, expected=7),
                  set_p("b", 4, 5, expected=7, rejected=True)], CLAIMS).ok is True
    # a lost claim may or may not have raised it
    lost = set_p("b", 0, None, expected=10)
    assert check([lost, set_p("c", 5, 6, expected=9, rejected=True)], CLAIMS).ok is True
    assert check([lost, set_p("c", 5, 6, epoch=7, expected=9)], CLAIMS).ok is True


# --- generated histories ------------------------------------------------------------------------

MEMBERS = ["a", "b", "c", None]


@st.composite
def primary_histories(draw: st.DrawFn, unknowns: bool = True, max_ops: int = 40) -> list[Operation]:
    """A sequential run of a system that assigns growing epochs, with every operation given a
    random interval around its linearization point (so intervals overlap), some answers lost, and
    some lost writes that never took effect."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    n = draw(st.integers(1, max_ops))
    primary: str | None = None
    epoch = 0
    ops: list[Operation] = []
    for i in range(n):
        point = i * 10.0
        call = point - rnd.uniform(0, 25)
        ret = point + rnd.uniform(0, 25)
        kind = rnd.choice(["set", "claim", "read", "read"])
        if kind == "read":
            ops.append(read_p(primary, epoch, call, ret))
            continue
        member = rnd.choice(MEMBERS)
        expected = max(1, epoch + rnd.randint(-1, 2)) if kind == "claim" else None
        if expected is not None and expected <= epoch:
            ops.append(set_p(member, call, ret, expected=expected, rejected=True))
            continue
        if not (expected is None and member == primary):
            primary, epoch = member, epoch + rnd.randint(1, 3)
        lost = unknowns and rnd.random() < 0.15
        ops.append(set_p(member, call, None if lost else ret, epoch=epoch, expected=expected))
        if unknowns and rnd.random() < 0.1:  # a write that was lost before it reached the log
            ops.append(set_p(rnd.choice(MEMBERS), call, None))
    return ops


@settings(max_examples=300, deadline=None)
@given(primary_histories())
def test_generated_histories_from_a_sequential_run_are_linearizable(history: list[Operation]) -> None:
    result = check(history, PRIMARY)
    assert result.ok is True, json.dumps(result.report(), indent=1)


@settings(max_examples=300, deadline=None)
@given(primary_histories(), st.data())
def test_a_read_showing_a_primary_never_set_is_caught(history: list[Operation], data: st.DataObject) -> None:
    reads = [i for i, o in enumerate(history) if o.name == "read"]
    if not reads:
        return
    i = data.draw(st.sampled_from(reads))
    victim = history[i]
    assert victim.output is not None
    history[i] = read_p("ghost", int(victim.output["epoch"]), victim.call, victim.ret or victim.call)
    result = check(history, PRIMARY)
    assert result.ok is False
    assert result.report()["keys"]["db"]["cannot_place"]["output"]["primary"] == "ghost"


@settings(max_examples=300, deadline=None)
@given(primary_histories(unknowns=False), st.data())
def test_a_read_showing_an_epoch_never_committed_is_caught(history: list[Operation], data: st.DataObject) -> None:
    reads = [i for i, o in enumerate(history) if o.name == "read"]
    if not reads:
        return
    i = data.draw(st.sampled_from(reads))
    victim = history[i]
    assert victim.output is not None
    epochs = {int(o.output["epoch"]) for o in history if o.output and "epoch" in o.output}
    wrong = data.draw(st.integers(1, 200).filter(lambda e: e not in epochs))
    history[i] = read_p(victim.output["primary"], wrong, victim.call, victim.ret or victim.call)
    assert check(history, PRIMARY).ok is False


# --- cost ---------------------------------------------------------------------------------------


def test_hundreds_of_operations_per_key_check_quickly() -> None:
    rnd = random.Random(7)
    ops: list[Operation] = []
    for key in ("db", "cache"):
        primary: str | None = None
        epoch = 0
        for i in range(400):
            point = i * 10.0
            call, ret = point - rnd.uniform(0, 30), point + rnd.uniform(0, 30)  # ~6 concurrent
            if rnd.random() < 0.4:
                member = rnd.choice(MEMBERS)
                if member != primary:  # re-asserting the primary keeps its epoch
                    primary, epoch = member, epoch + rnd.randint(1, 3)
                lost = rnd.random() < 0.05
                ops.append(set_p(primary, call, None if lost else ret, epoch=epoch, key=key))
            else:
                ops.append(read_p(primary, epoch, call, ret, key=key))
    start = time.perf_counter()
    result = check(ops, PRIMARY)
    elapsed = time.perf_counter() - start
    print(f"800 operations on 2 keys checked in {elapsed * 1000:.0f} ms "
          f"({sum(k.explored for k in result.keys.values())} steps)")
    assert result.ok is True  # (how fast: bench figures, not a test; printed above)


def test_a_search_that_exceeds_its_budget_answers_unknown() -> None:
    # many concurrent writes of distinct values and a read that matches none: exponential
    history = [w(v, 0, 100) for v in range(1, 16)] + [r(99, 101, 102)]
    result = check(history, REG, max_explored=1000)
    assert result.ok is None
    assert result.keys["k"].ok is None


# --- recording and re-checking ------------------------------------------------------------------


def test_recorded_history_round_trips_through_a_file_and_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ticks = iter(range(100))
    recorder = HistoryRecorder(clock=lambda: float(next(ticks)))
    a = recorder.invoke("db", "set_primary", {"member": "a", "expected_epoch": None}, client="c1")
    recorder.ok(a, {"primary": "a", "epoch": 3})
    lost = recorder.invoke("db", "set_primary", {"member": "b", "expected_epoch": None}, client="c2")
    recorder.unknown(lost)
    read = recorder.invoke("db", "read", {}, client="c1")
    recorder.ok(read, {"primary": "a", "epoch": 3})
    recorder.invoke("db", "read", {}, client="c3")  # never answered: counts as unknown
    with pytest.raises(ValueError, match="op_id"):
        recorder.ok(a, {})

    ops = recorder.operations()
    assert [o.id for o in ops] == [0, 1, 2, 3]
    assert ops[1].unknown and ops[3].unknown and not ops[2].unknown
    path = tmp_path / "history.json"
    save_history(path, ops)
    model, loaded = load_history(path)
    assert model == "primary-register" and loaded == ops
    assert main([str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    bad = [*ops, Operation(id=9, key="db", name="read", input={}, output={"primary": "a", "epoch": 2},
                           call=50.0, ret=51.0)]
    save_history(path, bad)
    assert main([str(path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["keys"]["db"]["cannot_place"]["id"] == 9


def test_bad_operations_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="ret"):
        Operation(id=1, key="k", name="read", input={}, output={"value": 1}, call=2.0, ret=1.0)
    with pytest.raises(ValueError, match="ret is required"):
        Operation(id=1, key="k", name="read", input={}, output={"value": 1}, call=2.0, ret=None)
    twice = Operation(id=5, key="k", name="read", input={}, output={"value": 0}, call=0, ret=1)
    with pytest.raises(ValueError, match="unique"):
        check([twice, twice], REG)
    with pytest.raises(ValueError, match="model"):
        save_history("/nonexistent", [], model="nope")
