"""Small asyncio helpers that keep an outside cancellation.

Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives in the same
loop iteration as the awaited result (fixed in 3.12), so a loop around it can miss its own
stop and hang a shutdown. `asyncio.timeout` keeps the cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True when it is set."""
    if event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def bounded(aw: Awaitable[T], seconds: float) -> T:
    """`await aw`, raising TimeoutError after `seconds` (cancelling it)."""
    async with asyncio.timeout(seconds):
        return await aw
