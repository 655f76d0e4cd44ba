"""Proxy progress without polling: waiters that wake on the ACK that satisfies them.

The tracker (tracker.py) keeps, per proxy, the highest snapshot index at which the proxy was
seen holding everything it asked for (`ProxyRecord.synced_index`; a NACKed type holds it back:
Envoy keeps an older config). After every change to one proxy it calls `Waiters.changed`, which
costs O(waiters) (one dict operation per waiter), never a walk over every proxy.

An `IndexWaiter` is satisfied when every *connected* proxy holds a snapshot at or after its
`min_index`. It is created with one walk over the connected proxies (once per wait), then
follows changes. No asyncio here and no I/O: `on_reached`/`on_done` run on the thread that
drives the tracker (the event loop, in the server), so an asyncio caller can set a future.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol


class Progressing(Protocol):
    """What a waiter reads of a proxy record."""

    @property
    def key(self) -> str: ...
    @property
    def connected(self) -> bool: ...
    @property
    def synced_index(self) -> int: ...

    @property
    def gate(self) -> bool:
        """True for a gate (`ProxyTracker.gates`, e.g. an xDS worker), not a proxy: waited for
        like one, never counted among those that reached the index."""
        ...

    def lag(self) -> tuple[str, str]: ...

    def excused(self, min_index: int) -> bool: ...


@dataclass(frozen=True)
class Behind:
    """A connected proxy that does not hold `min_index` yet: how far it is and why."""

    proxy: str
    synced_index: int  # -1: never seen synced
    state: str  # pending (a response is in flight) | behind | nacked
    error: str = ""  # Envoy's error text for a NACK

    def as_dict(self) -> dict[str, object]:
        return {"proxy": self.proxy, "synced_index": self.synced_index, "state": self.state,
                "error": self.error or None}


def behind_of(record: Progressing) -> Behind:
    state, error = record.lag()
    # every type synced but below the index: this replica has not rendered it yet
    return Behind(record.key, record.synced_index, "behind" if state == "synced" else state, error)


class IndexWaiter:
    """Until every connected proxy holds a snapshot at or after `min_index`.

    `reached` maps each proxy that got there (or already was) to the `clock` time it was seen;
    `behind` holds the others. `on_done` runs once, when `behind` becomes empty (at once if it
    is empty from the start)."""

    def __init__(
        self,
        min_index: int,
        clock: Callable[[], float],
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.min_index = min_index
        self.clock = clock
        self.on_done = on_done
        self.reached: dict[str, float] = {}
        self.behind: dict[str, Progressing] = {}
        self.done = False
        self.cancelled = False

    def start(self, records: Iterable[Progressing]) -> None:
        for record in records:
            self.changed(record, notify=False)
        self._check()

    def changed(self, record: Progressing, notify: bool = True) -> None:
        key = record.key
        if not record.connected or record.excused(self.min_index):
            # gone: it will get the current snapshot when it returns; or excused (standing.py:
            # never ACKed anything, or claims a future version): neither waited for nor an ACK
            self.behind.pop(key, None)
        elif record.synced_index >= self.min_index:
            self.behind.pop(key, None)
            if key not in self.reached and not record.gate:
                self.reached[key] = self.clock()
        else:
            self.behind[key] = record
        if notify:
            self._check()

    def recheck(self) -> None:
        """Look again at the proxies still behind: a grace (standing.never_acked) may have run
        out without any change to report. O(behind)."""
        for record in list(self.behind.values()):
            self.changed(record, notify=False)
        self._check()

    def lagging(self) -> list[Behind]:
        return sorted((behind_of(r) for r in self.behind.values()), key=lambda b: b.proxy)

    def _check(self) -> None:
        if not self.behind and not self.done:
            self.done = True
            if self.on_done is not None:
                self.on_done()


class Waiters:
    """The tracker's open waiters."""

    def __init__(self) -> None:
        self._open: list[IndexWaiter] = []

    def add(self, waiter: IndexWaiter, records: Iterable[Progressing]) -> IndexWaiter:
        waiter.start(records)
        if not waiter.done:
            self._open.append(waiter)
        return waiter

    def cancel(self, waiter: IndexWaiter) -> None:
        waiter.cancelled = True
        if waiter in self._open:
            self._open.remove(waiter)

    def changed(self, record: Progressing) -> None:
        if not self._open:
            return
        for waiter in list(self._open):
            waiter.changed(record)
            if waiter.done:
                self._open.remove(waiter)

    def __len__(self) -> int:
        return len(self._open)
