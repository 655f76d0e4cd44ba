"""What the leadership sources share: one asyncio task per watched key, and the delivery of
what those tasks observe to the caller's callback.

`ProbeRunner` (sources/probes.py: one task per (service, member), its spec a `_Target`) and
`ConsulSource` (sources/consul.py: one task per service, its spec the `ServiceSpec`) each keep
a `KeyedTasks`. What a key is and what its spec is are theirs to choose; when a changed spec
restarts a task follows from the spec's `==`, so each source picks a spec that compares equal
exactly when its task may go on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping
from typing import Any, Generic, TypeVar

from repstage_mesh.core.observations import Observation

__all__ = ["KeyedTasks", "ObservationCallback"]

ObservationCallback = Callable[[Observation], Awaitable[None] | None]

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")


class KeyedTasks(Generic[K, S]):
    """One asyncio task per watched key, following a changing set of keys.

        tasks = KeyedTasks(spawn, name=lambda key: f"watch {key}", on_drop=forget,
                           on_observation=callback, log=log)
        tasks.want({key: spec, ...})   # before or after start
        tasks.start()
        ...
        await tasks.stop()

    - `want(specs)` records the keys to watch, each with its spec; while running it reconciles
      at once, before `start()` it only records them.
    - Reconciling first cancels (without awaiting) the task of every key that is no longer
      wanted, whose wanted spec is no longer `==` the spec its task was started with, or whose
      task has finished (it failed: it is started again), and calls `on_drop(key)` for each.
      Then, for every wanted key without a task, in the order of `specs`, it calls
      `spawn(key, spec)` synchronously (per-key setup belongs there, so it is done when `want`
      or `start` returns) and runs the coroutine it returns as a task named `name(key)`.
      A key whose spec is unchanged keeps its task, and whatever the caller keeps for it.
    - `start()` marks the supervisor running and reconciles; a second call does nothing.
    - `stop()` marks it not running, forgets every task, cancels them all, then awaits them all
      (their `finally` blocks run before it returns). It does not call `on_drop`: what the
      caller keeps about its keys after a stop is the caller's to clear or keep. Close what
      the tasks use (sessions, clients) after `stop()` returns, not before.
    - `deliver(observation)` hands an observation to `on_observation`, awaiting it when it
      returns an awaitable. An exception from the callback is logged to `log` (with the
      service and member) and swallowed: a failing callback never ends the task delivering.
    """

    def __init__(
        self,
        spawn: Callable[[K, S], Coroutine[Any, Any, None]],
        *,
        name: Callable[[K], str],
        on_observation: ObservationCallback,
        log: logging.Logger,
        on_drop: Callable[[K], object] | None = None,
    ) -> None:
        self._spawn = spawn
        self._name = name
        self._on_observation = on_observation
        self._log = log
        self._on_drop = on_drop
        self._wanted: dict[K, S] = {}
        self._tasks: dict[K, tuple[S, asyncio.Task[None]]] = {}
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def __len__(self) -> int:
        """How many keys have a task."""
        return len(self._tasks)

    def keys(self) -> list[K]:
        """The keys that have a task, in the order their tasks were started."""
        return list(self._tasks)

    def want(self, specs: Mapping[K, S]) -> None:
        """The keys to watch and their specs (replacing the previous ones)."""
        self._wanted = dict(specs)
        if self._running:
            self.reconcile()

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self.reconcile()

    async def stop(self) -> None:
        self._running = False
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def reconcile(self) -> None:
        for key, (spec, task) in list(self._tasks.items()):
            if key not in self._wanted or self._wanted[key] != spec or task.done():
                task.cancel()
                del self._tasks[key]
                if self._on_drop is not None:
                    self._on_drop(key)
        for key, spec in self._wanted.items():
            if key not in self._tasks:
                task = asyncio.create_task(self._spawn(key, spec), name=self._name(key))
                self._tasks[key] = (spec, task)

    async def deliver(self, observation: Observation) -> None:
        try:
            outcome = self._on_observation(observation)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            self._log.exception(
                "observation callback failed for %s/%s", observation.service, observation.member
            )
