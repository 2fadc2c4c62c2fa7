"""Admission invariants: the limit, FIFO order, bounded waits, cancellation, exactly-once release."""

from __future__ import annotations

import asyncio
import random

import pytest

from vllm_gateway.errors import Overloaded, QueueTimeout, ShuttingDown
from vllm_gateway.proxy.admission import Admission, Permit, Ticket


async def test_admits_up_to_the_limit_at_once() -> None:
    adm = Admission(limit=3, max_queued=10, queue_timeout=1)
    permits = [await adm.acquire() for _ in range(3)]
    assert adm.in_flight == 3
    assert all(p.queue_wait == 0 for p in permits)


async def test_waiters_are_served_in_arrival_order() -> None:
    adm = Admission(limit=1, max_queued=10, queue_timeout=5)
    first = await adm.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        permit = await adm.acquire()
        order.append(i)
        await asyncio.sleep(0)
        permit.release()

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0)  # each waiter queues before the next arrives
    assert adm.queued == 5
    first.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert adm.in_flight == 0 and adm.queued == 0


async def test_a_new_arrival_does_not_overtake_the_queue() -> None:
    adm = Admission(limit=1, max_queued=10, queue_timeout=5)
    held = await adm.acquire()
    queued = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    held.release()  # the slot passes to the queued waiter, not to whoever comes next
    late = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert queued.done() and not late.done()
    (await queued).release()
    (await late).release()
    assert adm.in_flight == 0


async def test_queue_wait_timeout_raises_with_retry_after() -> None:
    adm = Admission(limit=1, max_queued=10, queue_timeout=0.05)
    held = await adm.acquire()
    with pytest.raises(QueueTimeout) as info:
        await adm.acquire()
    assert info.value.status == 503
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    assert adm.queued == 0 and adm.rejected_timeout_total == 1
    held.release()
    assert adm.in_flight == 0


async def test_full_queue_rejects_at_once() -> None:
    adm = Admission(limit=1, max_queued=2, queue_timeout=5)
    held = await adm.acquire()
    waiters = [asyncio.create_task(adm.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await adm.acquire()
    assert adm.rejected_full_total == 1
    held.release()
    for w in waiters:
        (await w).release()
    assert adm.in_flight == 0 and adm.queued == 0


async def test_cancelled_waiter_leaves_the_queue_and_loses_no_permit() -> None:
    adm = Admission(limit=1, max_queued=10, queue_timeout=5)
    held = await adm.acquire()
    gone = asyncio.create_task(adm.acquire())
    stays = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert adm.queued == 2
    gone.cancel()
    await asyncio.sleep(0)
    assert adm.queued == 1
    held.release()
    permit = await stays
    assert adm.in_flight == 1
    permit.release()
    assert adm.in_flight == 0


async def test_permit_handed_over_in_the_same_instant_as_cancellation_is_passed_on() -> None:
    adm = Admission(limit=1, max_queued=10, queue_timeout=5)
    held = await adm.acquire()
    racer = asyncio.create_task(adm.acquire())
    next_in_line = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    held.release()  # the racer's future completes...
    racer.cancel()  # ...and it is cancelled before it runs again
    await asyncio.sleep(0)
    assert racer.cancelled()
    permit = await asyncio.wait_for(next_in_line, 1)
    assert adm.in_flight == 1
    permit.release()
    assert adm.in_flight == 0 and adm.queued == 0


async def test_release_is_idempotent() -> None:
    adm = Admission(limit=2, max_queued=0, queue_timeout=1)
    permit = await adm.acquire()
    other = await adm.acquire()
    permit.release()
    permit.release()
    permit.release()
    assert adm.in_flight == 1
    other.release()
    assert adm.in_flight == 0


async def test_close_fails_the_queue_and_new_arrivals() -> None:
    adm = Admission(limit=1, max_queued=10, queue_timeout=5)
    held = await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    adm.close()
    with pytest.raises(ShuttingDown):
        await waiter
    with pytest.raises(ShuttingDown):
        await adm.acquire()
    assert adm.queued == 0
    assert not await adm.wait_idle(0.01)
    held.release()
    assert await adm.wait_idle(0.01)


async def test_random_churn_never_exceeds_the_limit_and_ends_at_zero() -> None:
    limit = 5
    adm = Admission(limit=limit, max_queued=50, queue_timeout=0.05)
    rng = random.Random(7)
    peak = 0

    async def worker() -> None:
        nonlocal peak
        try:
            permit = await adm.acquire()
        except (QueueTimeout, Overloaded):
            return
        try:
            peak = max(peak, adm.in_flight)
            await asyncio.sleep(rng.random() * 0.01)
        finally:
            permit.release()
            permit.release()

    tasks = [asyncio.create_task(worker()) for _ in range(300)]
    await asyncio.sleep(0.01)
    for t in rng.sample(tasks, 60):
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert peak == limit
    assert adm.in_flight == 0 and adm.queued == 0
    # Every slot is usable again.
    permits = [await adm.acquire() for _ in range(limit)]
    assert adm.in_flight == limit
    for p in permits:
        p.release()


async def test_retry_after_follows_the_release_rate() -> None:
    now = [0.0]
    adm = Admission(limit=1, max_queued=100, queue_timeout=60, clock=lambda: now[0])
    for _ in range(11):  # one release every 0.5 s: 2 per second
        (await adm.acquire()).release()
        now[0] += 0.5
    assert adm.release_rate() == pytest.approx(10 / 5.5)
    assert adm.estimate_wait(20) == pytest.approx(20 / (10 / 5.5))
    assert adm.estimate_wait(1) == 1.0  # never below one second


async def _queue_up(
    adm: Admission, tenant: str, n: int, served: list[str], priority: int = 0
) -> list[asyncio.Task[None]]:
    async def waiter() -> None:
        permit = await adm.acquire(tenant=tenant, priority=priority)
        served.append(tenant)
        permit.release()

    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(waiter()))
        await asyncio.sleep(0)
    return tasks


async def test_a_flooding_tenant_does_not_starve_another() -> None:
    adm = Admission(limit=1, max_queued=100, queue_timeout=5)
    held = await adm.acquire()
    served: list[str] = []
    flood = await _queue_up(adm, "a", 10, served)
    polite = await _queue_up(adm, "b", 2, served)
    assert adm.queued_by_tenant() == {"a": 10, "b": 2}
    held.release()
    await asyncio.gather(*flood, *polite)
    # b's two requests are served within the first four turns, not after a's ten.
    assert served[:4] == ["a", "b", "a", "b"]
    assert served.count("a") == 10 and adm.in_flight == 0 and adm.queued == 0


async def test_higher_priority_class_is_served_first() -> None:
    adm = Admission(limit=1, max_queued=100, queue_timeout=5)
    held = await adm.acquire()
    served: list[str] = []
    low = await _queue_up(adm, "batch", 3, served, priority=0)
    high = await _queue_up(adm, "interactive", 2, served, priority=1)
    held.release()
    await asyncio.gather(*low, *high)
    assert served == ["interactive", "interactive", "batch", "batch", "batch"]


async def test_full_queue_makes_room_for_a_smaller_tenant() -> None:
    adm = Admission(limit=1, max_queued=4, queue_timeout=5)
    held = await adm.acquire()
    served: list[str] = []
    flood = await _queue_up(adm, "a", 4, served)
    # The queue is full of a's requests; b arrives: a's newest waiter gives up its place.
    polite = await _queue_up(adm, "b", 1, served)
    assert adm.queued_by_tenant() == {"a": 3, "b": 1}
    await asyncio.sleep(0)
    assert flood[-1].done() and isinstance(flood[-1].exception(), Overloaded)  # a's newest
    held.release()
    await asyncio.gather(*flood[:-1], *polite)
    assert sorted(served) == ["a", "a", "a", "b"]
    assert adm.in_flight == 0 and adm.queued == 0
    # The same tenant arriving at a full queue is refused itself.
    adm2 = Admission(limit=1, max_queued=1, queue_timeout=5)
    h2 = await adm2.acquire()
    first = asyncio.create_task(adm2.acquire(tenant="a"))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await adm2.acquire(tenant="a")
    h2.release()
    (await first).release()


# --- places taken at arrival (``arrive``), as the front door takes them -------------------------


async def test_places_taken_at_arrival_are_served_in_arrival_order() -> None:
    adm = Admission(limit=1, max_queued=10, queue_timeout=5)
    held = adm.arrive()
    assert isinstance(held, Permit)
    first, second = adm.arrive(), adm.arrive()
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert adm.queued == 2
    held.release()
    # The slot went to the first place while nobody waited on it yet; the second still queues.
    permit = await asyncio.wait_for(first.wait(), 1)
    assert adm.in_flight == 1 and adm.queued == 1
    late = adm.arrive()  # no barging past the second place
    assert isinstance(late, Ticket)
    permit.release()
    (await asyncio.wait_for(second.wait(), 1)).release()
    (await asyncio.wait_for(late.wait(), 1)).release()
    assert adm.in_flight == 0 and adm.queued == 0


async def test_a_place_given_up_in_the_queue_leaves_it_once() -> None:
    adm = Admission(limit=1, max_queued=1, queue_timeout=5)
    held = adm.arrive()
    gone = adm.arrive()
    assert isinstance(gone, Ticket)
    with pytest.raises(Overloaded):
        adm.arrive()  # the queue of one is full
    gone.release()
    gone.release()  # idempotent: the count moves once
    assert adm.queued == 0
    nxt = adm.arrive()  # its place is free again
    assert isinstance(nxt, Ticket) and adm.queued == 1
    held.release()
    (await asyncio.wait_for(nxt.wait(), 1)).release()
    assert adm.in_flight == 0 and adm.queued == 0


async def test_a_permit_that_reached_a_given_up_place_passes_on() -> None:
    adm = Admission(limit=1, max_queued=10, queue_timeout=5)
    held = adm.arrive()
    abandoned, after = adm.arrive(), adm.arrive()
    assert isinstance(abandoned, Ticket) and isinstance(after, Ticket)
    held.release()  # the slot reaches the first place before anyone waits on it
    abandoned.release()  # its request is refused (or its client left) before its wait
    assert adm.in_flight == 1 and adm.queued == 0
    (await asyncio.wait_for(after.wait(), 1)).release()
    assert adm.in_flight == 0


def _one_held_one_queued(queue_timeout: float) -> tuple[Admission, Permit, Ticket]:
    """An admission of one slot, held, with one place queued behind it."""
    adm = Admission(limit=1, max_queued=10, queue_timeout=queue_timeout)
    held, place = adm.arrive(), adm.arrive()
    assert isinstance(held, Permit) and isinstance(place, Ticket)
    return adm, held, place


async def test_the_queue_timeout_counts_from_arrival_not_from_the_wait() -> None:
    adm, held, place = _one_held_one_queued(queue_timeout=0.5)
    await asyncio.sleep(0.45)  # the request's own setup, however long, is part of its wait
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(QueueTimeout):
        await place.wait()
    # From arrival: about 0.05 s left. From the wait it would be the whole 0.5 s.
    assert loop.time() - start < 0.3
    assert adm.queued == 1  # a place whose wait failed is still its owner's to release
    place.release()
    assert adm.queued == 0 and adm.rejected_timeout_total == 1
    held.release()
    assert adm.in_flight == 0


async def test_arrivals_after_close_are_shut_out_and_queued_places_told() -> None:
    adm, held, place = _one_held_one_queued(queue_timeout=5)
    adm.close()
    with pytest.raises(ShuttingDown):
        adm.arrive()
    with pytest.raises(ShuttingDown):
        await place.wait()
    place.release()  # the admission took the place back itself: nothing to undo
    held.release()
    assert adm.in_flight == 0 and adm.queued == 0


# --- one owner, one release: a place from arrival to its end (``Place``) --------------------------


async def test_a_granted_ticket_is_the_slot_and_its_release_passes_it_on() -> None:
    adm, held, place = _one_held_one_queued(queue_timeout=5)
    after = adm.arrive()
    held.release()
    assert await asyncio.wait_for(place.wait(), 1) is place  # the place itself holds the slot
    assert place.granted and adm.in_flight == 1 and adm.queued == 1
    place.release()
    place.release()  # idempotent: the slot passes on once
    assert adm.in_flight == 1 and adm.queued == 0  # to ``after``
    after.release()
    assert adm.in_flight == 0


async def test_a_cancelled_wait_leaves_the_place_to_its_owner() -> None:
    adm, held, place = _one_held_one_queued(queue_timeout=5)
    waiter = asyncio.create_task(place.wait())
    await asyncio.sleep(0.01)
    waiter.cancel()  # the client left while queued
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.queued == 1 and not place.granted
    place.release()
    assert adm.queued == 0
    held.release()
    assert adm.in_flight == 0


async def test_wait_sheds_only_a_place_that_will_wait() -> None:
    adm, held, place = _one_held_one_queued(queue_timeout=5)
    shed: list[str] = []
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, held.release)
    await place.wait(lambda: shed.append("queued"))
    assert shed == ["queued"]
    free = Admission(limit=1, max_queued=1, queue_timeout=5).arrive()
    await free.wait(lambda: shed.append("free"))
    assert shed == ["queued"]  # a slot at once: nothing to shed
    place.release()
    free.release()
    assert adm.in_flight == 0


@pytest.mark.parametrize("queued_first", [False, True])
async def test_a_place_stepped_aside_takes_its_turn_again_at_the_end(queued_first: bool) -> None:
    adm = Admission(limit=1, max_queued=10, queue_timeout=5)
    held = adm.arrive()
    place = adm.arrive(tenant="t") if queued_first else held
    aside = place.step_aside()  # given up for the model list: its slot or position is free
    assert adm.queued == 0 and adm.in_flight == (1 if queued_first else 0)
    assert aside.step_aside() is aside  # nothing taken again yet
    if queued_first:
        other = adm.arrive()  # arrives while the first one waits elsewhere: goes first
        held.release()
        await asyncio.wait_for(other.wait(), 1)
        waiting = asyncio.create_task(aside.wait())
        await asyncio.sleep(0.01)
        assert adm.queued == 1 and not aside.granted
        other.release()
        await asyncio.wait_for(waiting, 1)
    else:
        await asyncio.wait_for(aside.wait(), 1)
    assert aside.granted and adm.in_flight == 1
    aside.release()
    assert adm.in_flight == 0 and adm.queued == 0
