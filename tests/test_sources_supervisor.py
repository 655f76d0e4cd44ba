"""KeyedTasks, the keyed-task supervision the leadership sources share (no network)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from fakes import eventually

from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.sources.supervisor import KeyedTasks

log = logging.getLogger("test.supervisor")


def observation(member: str, status: MemberStatus = MemberStatus.PRIMARY) -> Observation:
    return Observation("orders", member, status, 0.0, "test")


class Watches:
    """A source's side of KeyedTasks: spawn records what it starts; each task runs until
    cancelled (or, for a spec "finish", returns at once) and records its end."""

    def __init__(self, callback: Callable[[Observation], Any] | None = None) -> None:
        self.spawned: list[tuple[str, str]] = []
        self.dropped: list[str] = []
        self.ended: list[tuple[str, str]] = []
        self.seen: list[Observation] = []
        self.tasks: KeyedTasks[str, str] = KeyedTasks(
            self.spawn,
            name=lambda key: f"watch {key}",
            on_observation=callback or self.seen.append,
            log=log,
            on_drop=self.dropped.append,
        )

    def spawn(self, key: str, spec: str) -> Coroutine[Any, Any, None]:
        self.spawned.append((key, spec))
        return self.run(key, spec)

    async def run(self, key: str, spec: str) -> None:
        try:
            if spec != "finish":
                await asyncio.Event().wait()
        finally:
            self.ended.append((key, spec))

    def task(self, key: str) -> asyncio.Task[Any]:
        return next(t for t in asyncio.all_tasks() if t.get_name() == f"watch {key}")


async def settle() -> None:
    """Let every task that is ready run a few steps: deterministic in one event loop, used only
    before asserting that something did NOT happen (positive checks wait with `eventually`)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_wanted_keys_get_a_task_from_start() -> None:
    w = Watches()
    w.tasks.want({"a": "1", "b": "2"})
    await settle()
    assert w.spawned == [] and len(w.tasks) == 0 and not w.tasks.running  # recorded only
    w.tasks.start()
    assert w.spawned == [("a", "1"), ("b", "2")]  # synchronously, in the order wanted
    assert w.tasks.keys() == ["a", "b"] and w.tasks.running
    w.tasks.start()  # a second start does nothing
    assert len(w.spawned) == 2
    await settle()
    assert not w.task("a").done() and not w.task("b").done()
    await w.tasks.stop()


async def test_a_changed_spec_restarts_only_its_task() -> None:
    w = Watches()
    w.tasks.want({"a": "1", "b": "2"})
    w.tasks.start()
    await settle()
    task_a, task_b = w.task("a"), w.task("b")
    w.tasks.want({"a": "1", "b": "3"})
    assert w.spawned[-1] == ("b", "3") and len(w.spawned) == 3
    assert w.dropped == ["b"]  # dropped before its new task was spawned
    await eventually(lambda: task_b.cancelled() and ("b", "2") in w.ended, "b's old task ended")
    assert not task_a.done() and w.task("a") is task_a  # unchanged spec: same task
    await w.tasks.stop()


async def test_a_removed_key_is_cancelled() -> None:
    w = Watches()
    w.tasks.want({"a": "1", "b": "2"})
    w.tasks.start()
    await settle()
    task_b = w.task("b")
    w.tasks.want({"a": "1"})
    await eventually(task_b.cancelled, "b's task cancelled")
    assert w.dropped == ["b"] and w.tasks.keys() == ["a"]
    assert w.spawned == [("a", "1"), ("b", "2")]
    w.tasks.want({})
    await settle()
    assert w.dropped == ["b", "a"] and len(w.tasks) == 0
    await w.tasks.stop()


async def test_a_finished_task_is_started_again_at_the_next_reconcile() -> None:
    w = Watches()
    w.tasks.want({"a": "finish"})
    w.tasks.start()
    await eventually(lambda: w.ended == [("a", "finish")], "a's task finished")
    w.tasks.want({"a": "finish"})  # same spec, but its task is done
    assert w.spawned == [("a", "finish"), ("a", "finish")] and w.dropped == ["a"]
    await w.tasks.stop()


async def test_stop_cancels_and_awaits_every_task() -> None:
    w = Watches()
    w.tasks.want({"a": "1", "b": "2", "c": "3"})
    w.tasks.start()
    await settle()
    tasks = [w.task(key) for key in "abc"]
    await w.tasks.stop()
    assert all(t.cancelled() for t in tasks)
    assert sorted(w.ended) == [("a", "1"), ("b", "2"), ("c", "3")]  # finally blocks ran
    assert not w.tasks.running and len(w.tasks) == 0
    assert w.dropped == []  # a stop is not a drop: the caller keeps what it keeps
    w.tasks.want({"a": "1"})  # after a stop, wanting only records
    assert len(w.spawned) == 3
    w.tasks.start()  # and a new start starts them again
    assert w.spawned[-1] == ("a", "1")
    await w.tasks.stop()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_failing_callback_is_logged_and_the_task_goes_on(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Observation] = []

    def sync_callback(obs: Observation) -> None:
        calls.append(obs)
        raise RuntimeError("decider hiccup")

    async def async_callback(obs: Observation) -> None:
        await asyncio.sleep(0)
        sync_callback(obs)

    tasks: KeyedTasks[str, int] = KeyedTasks(
        lambda key, count: deliver(key, count),
        name=str,
        on_observation=sync_callback if kind == "sync" else async_callback,
        log=log,
    )
    delivered = asyncio.Event()

    async def deliver(key: str, count: int) -> None:
        for n in range(count):
            await tasks.deliver(observation(f"{key}{n}"))
        delivered.set()
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR, logger=log.name):
        tasks.want({"m": 3})
        tasks.start()
        await asyncio.wait_for(delivered.wait(), 5)
    assert [o.member for o in calls] == ["m0", "m1", "m2"]  # every delivery reached it
    failures = [r for r in caplog.records if r.name == log.name]
    assert [r.getMessage() for r in failures] == [
        f"observation callback failed for orders/m{n}" for n in range(3)
    ]
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in failures)
    assert tasks.keys() == ["m"]  # the task is still there, not ended by the failures
    await tasks.stop()


async def test_an_async_callback_is_awaited_in_order() -> None:
    seen: list[str] = []

    async def callback(obs: Observation) -> None:
        await asyncio.sleep(0.001)
        seen.append(obs.member)

    tasks: KeyedTasks[str, int] = KeyedTasks(
        lambda key, _: asyncio.sleep(0), name=str, on_observation=callback, log=log
    )
    for member in ("x", "y"):
        await tasks.deliver(observation(member))
        assert seen[-1] == member  # deliver returns once the callback has finished
