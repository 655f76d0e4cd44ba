"""`bounded(awaitable, seconds)`: asyncio.wait_for without its Python 3.11 race.

In Python 3.11, `asyncio.wait_for` returns the result and drops a cancellation that arrives
just as the awaited work completes (CPython gh-86296, fixed in 3.12): the cancelled task runs
on, and whoever awaits it after cancelling (a runner closing on leadership loss, a node
stopping) waits forever. `asyncio.timeout` has no such race. Raises TimeoutError like wait_for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T], seconds: float) -> T:
    async with asyncio.timeout(seconds):
        return await awaitable
