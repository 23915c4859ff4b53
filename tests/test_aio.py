"""edge.aio: waits with a bound that never swallow an outside cancellation."""

from __future__ import annotations

import asyncio

import pytest

from edge.aio import bounded, wait_event


async def test_wait_event_says_whether_the_event_was_set() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    ev.set()
    assert await wait_event(ev, 10) is True


async def test_bounded_returns_the_result_or_raises_timeout() -> None:
    assert await bounded(asyncio.sleep(0, result=7), 1) == 7
    with pytest.raises(TimeoutError):
        await bounded(asyncio.sleep(10), 0.01)


async def test_a_cancel_arriving_with_the_event_stops_a_wait_loop() -> None:
    """The event is set and the task cancelled in the same loop iteration (what a stop does):
    the loop must end cancelled, not go round again (asyncio.wait_for on 3.11 loses it)."""
    for _ in range(20):
        ev = asyncio.Event()
        rounds = 0

        async def loop(ev: asyncio.Event = ev) -> None:
            nonlocal rounds
            while True:
                rounds += 1
                await wait_event(ev, 10)
                ev.clear()

        task = asyncio.create_task(loop())
        await asyncio.sleep(0)
        ev.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert task in done
        assert task.cancelled()
