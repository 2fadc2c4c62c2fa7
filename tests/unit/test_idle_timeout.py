"""IdleTimeout: a deadline pushed later is honoured without rescheduling, never fires early,
and one pushed earlier takes effect at once."""

from __future__ import annotations

import asyncio

import pytest

from vllm_gateway.proxy.idle import IdleTimeout


async def test_pushed_later_it_expires_at_the_last_push_not_before() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    last = start
    with pytest.raises(TimeoutError):
        async with IdleTimeout(start + 0.05) as timer:
            for _ in range(10):  # 0.2 s in all, past the first deadline four times over
                await asyncio.sleep(0.02)
                last = loop.time()
                timer.push(last + 0.05)
            await asyncio.sleep(5)
    assert loop.time() >= last + 0.05  # the pushed deadline, not the first one


async def test_a_push_within_the_deadline_lets_the_body_finish() -> None:
    loop = asyncio.get_running_loop()
    async with IdleTimeout(loop.time() + 0.05) as timer:
        for _ in range(5):
            await asyncio.sleep(0.02)
            timer.push(loop.time() + 0.05)
    assert not timer.expired()


async def test_pushed_earlier_it_expires_at_once() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with IdleTimeout(loop.time() + 60) as timer:
            timer.push(loop.time() + 0.01)
            await asyncio.wait_for(asyncio.sleep(60), timeout=5)  # TimeoutError from the timer
    assert timer.expired()
