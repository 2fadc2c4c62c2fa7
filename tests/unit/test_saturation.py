"""The saturation rule (backends/pool/saturation.py): readings, bursts, staleness, the line."""

from __future__ import annotations

import asyncio
import time

import pytest

from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.config import BackendSpec
from vllm_gateway.backends.pool.saturation import Reading, Saturation
from vllm_gateway.errors import QueueTimeout
from vllm_gateway.settings import Settings


def pool(**pool: object) -> PoolBackend:
    settings = Settings(backend_urls=("http://127.0.0.1:9", "http://127.0.0.1:10"))
    settings = settings.replace(pool=settings.pool.replace(**pool))
    specs = [
        BackendSpec(url="http://127.0.0.1:9", name="a"),
        BackendSpec(url="http://127.0.0.1:10", name="b"),
    ]
    return PoolBackend(settings, specs=specs)


def saturation(backend: PoolBackend) -> Saturation:
    assert backend.saturation is not None
    return backend.saturation


def read(sat: Saturation, name: str, waiting: float, kv: float | None = None, base: int = 0,
         age: float = 0.0) -> None:  # fmt: skip
    sat.readings[name] = Reading(waiting, 0.0, kv, time.monotonic() - age, base)


def test_off_by_default() -> None:
    assert pool().saturation is None
    assert pool().acquirer.saturation is None


def test_a_member_admits_while_its_queue_and_what_was_sent_since_stay_below_the_threshold() -> None:
    backend = pool(saturation_max_waiting=3)
    sat = saturation(backend)
    a, b = backend.members
    read(sat, "a", waiting=1)
    read(sat, "b", waiting=3)
    assert sat.admits(a) and not sat.admits(b)
    a.begin()  # sent since the reading: counted as waiting until the next one
    assert sat.admits(a)
    a.begin()
    assert not sat.admits(a)  # 1 waiting + 2 sent
    a.end()
    assert sat.admits(a)  # one ended: net of what ended
    read(sat, "a", waiting=0, base=a.in_flight)  # a fresh reading sees what was sent
    assert sat.admits(a)


def test_kv_cache_usage_at_the_threshold_refuses() -> None:
    backend = pool(saturation_max_waiting=4, saturation_max_kv_cache_usage=0.9)
    sat = saturation(backend)
    a, b = backend.members
    read(sat, "a", waiting=0, kv=0.95)
    read(sat, "b", waiting=0, kv=0.5)
    assert not sat.admits(a) and sat.admits(b)


def test_a_stale_reading_is_unknown_never_idle() -> None:
    backend = pool(saturation_max_waiting=8, saturation_stale_after=1.0, saturation_unknown_limit=1)
    sat = saturation(backend)
    a, b = backend.members
    read(sat, "a", waiting=0, age=5.0)  # old: unknown
    assert sat.admits(a)  # nothing in flight from this gateway
    a.begin()
    assert not sat.admits(a)  # unknown: one at most
    assert sat.admits(b) is True  # never read: unknown too, nothing in flight
    b.begin()
    assert not sat.admits(b)
    assert sat.counts["unknown"] >= 4


def test_the_kv_threshold_alone_is_refused() -> None:
    with pytest.raises(ValueError, match="saturation_max_waiting"):
        pool(saturation_max_kv_cache_usage=0.9)


async def test_waiters_are_woken_in_arrival_order_and_only_as_many_as_there_is_room() -> None:
    backend = pool(saturation_max_waiting=2)
    sat = saturation(backend)
    read(sat, "a", waiting=2)
    read(sat, "b", waiting=2)
    assert sat.admitting(backend.members, turn=False) == []
    deadline = sat.deadline()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await sat.wait(deadline, again=False)
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
    await asyncio.sleep(0)
    assert len(sat._line) == 4
    read(sat, "a", waiting=1)  # room for one
    sat._wake(sat._room())
    await asyncio.sleep(0)
    assert order == [0] and len(sat._line) == 3
    # A newcomer finding room does not pass the line: it wakes the head instead.
    read(sat, "b", waiting=0)
    assert sat.admitting(backend.members, turn=False) == []
    await asyncio.sleep(0)
    assert order[:2] == [0, 1]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert not sat._line  # every waiter that left took itself off


async def test_a_wait_past_its_deadline_is_a_queue_timeout() -> None:
    backend = pool(saturation_max_waiting=1)
    sat = saturation(backend)
    loop = asyncio.get_running_loop()
    with pytest.raises(QueueTimeout) as caught:
        await sat.wait(loop.time() + 0.01, again=False)
    assert caught.value.headers() == [(b"retry-after", b"1")]
    assert not sat._line and sat.counts["timeouts"] == 1


async def test_a_woken_waiter_that_leaves_passes_its_wakeup_on() -> None:
    backend = pool(saturation_max_waiting=1)
    sat = saturation(backend)
    deadline = sat.deadline()
    first = asyncio.create_task(sat.wait(deadline, again=False))
    second = asyncio.create_task(sat.wait(deadline, again=False))
    await asyncio.sleep(0)
    sat._wake(1)  # the first is woken...
    first.cancel()  # ...but its client leaves before it runs
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1.0)  # the second got the wakeup
    assert not sat._line


async def test_the_line_serves_tenants_in_turns() -> None:
    backend = pool(saturation_max_waiting=1)
    sat = saturation(backend)
    deadline = sat.deadline()
    order: list[str] = []

    async def waiter(tag: str, tenant: str) -> None:
        await sat.wait(deadline, again=False, tenant=tenant)
        order.append(tag)

    tasks = [asyncio.create_task(waiter(f"a{i}", "team-a")) for i in range(5)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(waiter(f"b{i}", "team-b")) for i in range(2)]
    await asyncio.sleep(0)
    assert len(sat._line) == 7
    for _ in range(7):
        sat._wake(1)
        await asyncio.sleep(0)
    # The flood queued first, yet team-b's two go out within the first four.
    assert order == ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]
    await asyncio.gather(*tasks)


def test_a_request_sent_just_before_a_reading_counts_as_sent_after_it() -> None:
    backend = pool(saturation_max_waiting=2, saturation_scrape_interval=0.5)
    sat = saturation(backend)
    a, _ = backend.members
    a.begin()
    sat.sent(a)  # it may still be on its way when the engine answers the scrape
    assert sat.base(a, time.monotonic()) == 0
    assert sat.base(a, time.monotonic() + 1.0) == 1  # a reading a while later has seen it
