"""`bounded` replaces asyncio.wait_for: it never drops a cancellation (Python 3.11's wait_for
returns the result when the cancellation and the completion meet, and the task runs on)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from repstage_mesh.failover.timeouts import bounded


async def _cancelled_as_it_completes(wrap: Callable[[Awaitable[int], float], Awaitable[Any]]) -> bool:
    """True when the task saw its cancellation."""
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wrap(future, 5.0))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the task now waits on the future
    future.set_result(1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False


async def test_bounded_keeps_a_cancellation_that_meets_the_completion() -> None:
    assert all([await _cancelled_as_it_completes(bounded) for _ in range(20)])


async def test_the_race_it_avoids_is_real_here() -> None:
    """If asyncio.wait_for stops dropping cancellations (Python 3.12+), bounded may go."""
    import sys

    dropped = not all([await _cancelled_as_it_completes(asyncio.wait_for) for _ in range(20)])
    assert dropped == (sys.version_info < (3, 12))


async def test_bounded_times_out_and_returns_results() -> None:
    assert await bounded(asyncio.sleep(0, result=7), 1.0) == 7
    with pytest.raises(TimeoutError):
        await bounded(asyncio.sleep(5), 0.01)
