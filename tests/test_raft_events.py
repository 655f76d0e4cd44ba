"""ReplicatedStore's `on_role_change`: pysyncobj's state changes, reported as "am I leader" changes.

The store tests run a real single-node store (no network, no peers; pysyncobj still elects it,
follower -> candidate -> leader, within about 0.7 s). Every store is closed, even on failure.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from repstage_mesh.core.models import CommandEnvelope, Noop
from repstage_mesh.raft.store import ReplicatedStore, leadership_change

FOLLOWER, CANDIDATE, LEADER = 0, 1, 2  # pysyncobj.syncobj._RAFT_STATE (test_pinned_internals checks)
ELECTION_DEADLINE = 5.0  # a single node leads after one election timeout (<= 0.7 s); slack for load
QUIET_PERIOD = 1.0  # longer than the longest election timeout: a re-election would show in it

StoreFactory = Callable[..., ReplicatedStore]


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[StoreFactory]:
    """Builds single-node stores, each in its own data dir under tmp_path; closes them all."""
    stores: list[ReplicatedStore] = []
    counter = itertools.count()

    def make(**kwargs: Any) -> ReplicatedStore:
        store = ReplicatedStore("solo", None, [], tmp_path / f"solo{next(counter)}", **kwargs)
        stores.append(store)
        return store

    try:
        yield make
    finally:
        for store in stores:
            store.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Blocking: poll `predicate` until it holds; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


class Recorder:
    """An `on_role_change` that records each call, with whether it ran on the main thread, and
    lets a coroutine wait for the n-th call."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool]] = []
        self._changed = asyncio.Condition()

    def __call__(self, is_leader: bool) -> None:
        self.calls.append((is_leader, threading.current_thread() is threading.main_thread()))
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_calls(self, n: int, timeout: float) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.calls) >= n), timeout)


# --- the translation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (FOLLOWER, CANDIDATE, None),
        (CANDIDATE, FOLLOWER, None),
        (CANDIDATE, LEADER, True),
        (FOLLOWER, LEADER, True),
        (LEADER, FOLLOWER, False),
        (LEADER, CANDIDATE, False),
        (FOLLOWER, FOLLOWER, None),
        (LEADER, LEADER, None),
    ],
)
def test_pysyncobj_state_changes_translate_to_leadership_changes(
    old: int, new: int, expected: bool | None
) -> None:
    assert leadership_change(old, new) is expected


def test_a_sequence_of_state_changes_reports_alternating_leadership() -> None:
    # elected, deposed by a higher term, an election lost, then elected again
    states = [FOLLOWER, CANDIDATE, LEADER, FOLLOWER, CANDIDATE, FOLLOWER, CANDIDATE, LEADER]
    reported = [leadership_change(a, b) for a, b in itertools.pairwise(states)]
    assert [r for r in reported if r is not None] == [True, False, True]


async def test_role_changes_are_delivered_in_order_on_the_loop(make_store: StoreFactory) -> None:
    recorder = Recorder()
    store = make_store(on_role_change=recorder, loop=asyncio.get_running_loop())
    await recorder.wait_for_calls(1, ELECTION_DEADLINE)
    # what pysyncobj's thread would call: a step-down, a lost election, a new term won
    changes = [(LEADER, FOLLOWER), (FOLLOWER, CANDIDATE), (CANDIDATE, FOLLOWER), (FOLLOWER, CANDIDATE),
               (CANDIDATE, LEADER)]
    for old, new in changes:
        await asyncio.to_thread(store._on_state_changed, old, new)
    await recorder.wait_for_calls(3, 1)
    assert recorder.calls == [(True, True), (False, True), (True, True)]


# --- a real single-node store -------------------------------------------------------------------


async def test_single_node_reports_leader_once_on_the_loop_and_then_nothing(
    make_store: StoreFactory,
) -> None:
    recorder = Recorder()
    store = make_store(on_role_change=recorder, loop=asyncio.get_running_loop())
    await recorder.wait_for_calls(1, ELECTION_DEADLINE)
    assert recorder.calls == [(True, True)]  # True, on the loop's (main) thread
    assert store.is_leader()
    assert await store.confirm_leadership(timeout=2)

    # while it stays leader (and keeps committing), nothing more is reported
    with pytest.raises(TimeoutError):
        await recorder.wait_for_calls(2, QUIET_PERIOD)
    await store.submit(CommandEnvelope(command=Noop(node="solo")), timeout=2)
    assert recorder.calls == [(True, True)]
    assert store.is_leader()


def test_without_a_loop_the_callback_runs_on_pysyncobj_thread(make_store: StoreFactory) -> None:
    calls: list[tuple[bool, str]] = []
    store = make_store(on_role_change=lambda leader: calls.append((leader, threading.current_thread().name)))
    wait_until(lambda: bool(calls), ELECTION_DEADLINE, "leadership reported")
    assert store.is_leader()
    [(is_leader, thread)] = calls
    assert is_leader is True
    assert thread != threading.main_thread().name


def test_a_failing_callback_does_not_break_pysyncobj(make_store: StoreFactory) -> None:
    # it runs inside pysyncobj's state change: an exception there would stop the election half-way
    calls: list[bool] = []

    def explode(is_leader: bool) -> None:
        calls.append(is_leader)
        raise RuntimeError("consumer bug")

    store = make_store(on_role_change=explode)
    wait_until(lambda: bool(calls) and store.is_leader(), ELECTION_DEADLINE, "leader despite the error")
    outcome = asyncio.run(store.submit(CommandEnvelope(command=Noop(node="solo")), timeout=2))
    assert outcome.ok
    assert calls == [True]


def test_a_closed_loop_is_not_an_error(make_store: StoreFactory) -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    calls: list[bool] = []
    store = make_store(on_role_change=calls.append, loop=loop)
    wait_until(store.is_leader, ELECTION_DEADLINE, "leader although its loop is closed")
    store._on_state_changed(LEADER, FOLLOWER)  # must not raise either
    assert calls == []


async def test_nothing_is_reported_once_close_has_begun(make_store: StoreFactory) -> None:
    recorder = Recorder()
    store = make_store(on_role_change=recorder, loop=asyncio.get_running_loop())
    await recorder.wait_for_calls(1, ELECTION_DEADLINE)
    # a step-down queued on the loop just before close() runs after it: dropped
    store._on_state_changed(LEADER, FOLLOWER)  # no await in between: still queued
    store.close()
    with pytest.raises(TimeoutError):
        await recorder.wait_for_calls(2, 0.2)
    # and pysyncobj calling after close() schedules nothing
    store._on_state_changed(CANDIDATE, LEADER)
    with pytest.raises(TimeoutError):
        await recorder.wait_for_calls(2, 0.2)
    assert recorder.calls == [(True, True)]


async def test_a_submitter_resumes_after_on_apply_and_after_what_it_scheduled(
    make_store: StoreFactory,
) -> None:
    # The node's on_apply schedules the render with call_soon: it must run before the submitter
    # (the failover runner) resumes, so that the push to the proxies is queued before whatever the
    # submitter does next. And a submitter reads a state that includes its entry.
    loop = asyncio.get_running_loop()
    events: list[str] = []

    def on_apply(state: Any, outcome: Any) -> None:
        events.append(f"applied {state.index}")
        loop.call_soon(events.append, f"rendered {state.index}")

    recorder = Recorder()
    store = make_store(on_apply=on_apply, on_role_change=recorder, loop=loop)
    await recorder.wait_for_calls(1, ELECTION_DEADLINE)
    for _ in range(5):
        await store.submit(CommandEnvelope(command=Noop(node="solo")), timeout=2)
        index = store.state.index
        assert events[-2:] == [f"applied {index}", f"rendered {index}"], events[-4:]
