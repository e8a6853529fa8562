"""`Deadline` keeps asyncio.timeout()'s semantics (it replaces it on the hot path)."""

from __future__ import annotations

import asyncio

import pytest

from waypoint.proxy.deadline import Deadline


async def test_expiry_raises_timeout_and_cancels_only_the_block() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with Deadline.within(loop, 0.01) as deadline:
            await asyncio.sleep(5)
    assert deadline.expired
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # our cancel was taken back
    await asyncio.sleep(0)  # the task goes on normally


async def test_no_expiry_when_the_block_finishes_in_time() -> None:
    loop = asyncio.get_running_loop()
    async with Deadline.within(loop, 5) as deadline:
        await asyncio.sleep(0)
    assert not deadline.expired
    await asyncio.sleep(0.01)  # the timer was cancelled: nothing fires later


async def test_none_is_unbounded_and_a_past_deadline_expires_at_the_first_await() -> None:
    loop = asyncio.get_running_loop()
    async with Deadline(loop, None):
        await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError):
        async with Deadline(loop, loop.time() - 1):
            await asyncio.sleep(1)


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    async def guarded() -> None:
        async with Deadline.within(loop, 5):
            entered.set()
            await asyncio.sleep(5)

    task = asyncio.ensure_future(guarded())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_inner_of_two_deadlines_reports_its_own_expiry() -> None:
    loop = asyncio.get_running_loop()
    async with Deadline.within(loop, 5) as outer:
        with pytest.raises(TimeoutError):
            async with Deadline.within(loop, 0.01):
                await asyncio.sleep(5)
    assert not outer.expired


async def test_the_outer_expiry_passes_through_the_inner_block() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with Deadline.within(loop, 0.01) as outer, Deadline.within(loop, 5) as inner:
            await asyncio.sleep(5)
    assert outer.expired and not inner.expired


def test_outside_a_task_it_refuses() -> None:
    loop = asyncio.new_event_loop()
    try:

        async def enter() -> None:
            await Deadline(loop, None).__aenter__()

        coroutine = enter()
        with pytest.raises(RuntimeError, match="inside a task"):
            coroutine.send(None)
        coroutine.close()
    finally:
        loop.close()
