"""A standby that goes silent (SIGSTOP) in the middle of a promotion: the promotion gives up at
its timeout and the event loop keeps running meanwhile.

psycopg answers a cancelled query with a cancel request and waits up to 5 s for it and 5 s more
for the query to end (psycopg 3.1 sends the request blocking the event loop; measured with
psycopg 3.3.9 and its bundled libpq 18: the promotion returned after 11 s with a 1 s timeout,
the loop kept running). `postgres_promote`
bounds its work by shutting the socket down instead. The standby is reached through a small
TCP relay that SIGSTOPs the whole standby (postmaster and backends) just before it forwards the
promotion's first query, so the query is in flight when the server goes silent; libpq's cancel
request would go through the same relay to the stopped postmaster.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from repstage_mesh.core.models import Member
from repstage_mesh.failover.promote import postgres_promote, postgres_repoint_standby

from .databases import HOST, PostgresPair, postgres_pair_fixture

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

__all__ = ["postgres_pair_fixture"]  # pytest finds the fixture here


class FreezingRelay:
    """Forwards TCP to `port`; calls `freeze` once, before forwarding the first client chunk
    that contains `trigger`."""

    def __init__(self, port: int, trigger: bytes, freeze: Callable[[], None]) -> None:
        self.target, self.trigger, self.freeze = port, trigger, freeze
        self.frozen_at: float | None = None
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target)
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer, watch=True)),
            asyncio.create_task(self._pipe(up_reader, writer, watch=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, watch: bool) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while chunk := await src.read(65536):
                if watch and self.frozen_at is None and self.trigger in chunk:
                    self.freeze()
                    self.frozen_at = time.monotonic()
                dst.write(chunk)
                await dst.drain()
        dst.close()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def silent_standby(postgres_pair_fixture: PostgresPair) -> AsyncIterator[tuple[PostgresPair, FreezingRelay, Member]]:
    pg = postgres_pair_fixture
    relay = FreezingRelay(pg.port("pg1"), b"pg_is_in_recovery", lambda: pg.stop("pg1"))
    port = await relay.start()
    try:
        yield pg, relay, Member(name="pg1", address=HOST, port=port)
    finally:
        pg.cont("pg1")
        await relay.stop()


async def ticking_while(work: asyncio.Task[object], period: float = 0.01) -> float:
    """The longest gap between ticks of a task that ticks every `period` until `work` ends."""
    longest, last = 0.0, time.monotonic()
    while not work.done():
        await asyncio.sleep(period)  # the ticker's period: what we measure is the loop's lateness
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    return longest


@pytest.mark.parametrize("step", ["promote", "repoint"])
async def test_a_standby_stopped_mid_query_times_out_on_time_and_the_loop_keeps_ticking(
    silent_standby: tuple[PostgresPair, FreezingRelay, Member], step: str
) -> None:
    pg, relay, standby = silent_standby
    timeout = 1.0
    started = time.monotonic()
    if step == "promote":
        work = asyncio.create_task(postgres_promote(standby, timeout))
    else:
        primary = Member(name="pg0", address=HOST, port=pg.port("pg0"))
        work = asyncio.create_task(postgres_repoint_standby(standby, primary, timeout))
    longest_gap = await ticking_while(work)
    result = await work
    elapsed = time.monotonic() - started
    print(f"\n{step} against a stopped standby: gave up after {elapsed:.2f} s, longest loop gap {longest_gap * 1000:.0f} ms")
    assert relay.frozen_at is not None, "the standby was not stopped during the promotion's query"
    assert not result.ok
    assert ("did not finish within" if step == "promote" else "TimeoutError") in result.detail
    # psycopg's cancel path would wait 5 s + 5 s; ours ends at the timeout (plus the 1 s
    # grace abort_pg_attempt gives a task after shutting its socket, at most).
    assert elapsed < timeout + 2.5, f"{step} took {elapsed:.1f} s with a {timeout} s timeout"
    assert longest_gap < 0.5, f"the event loop stalled for {longest_gap:.2f} s"
    assert relay.connections == 1, "a cancel request (a second connection) was sent"
