"""One admission for several workers: the supervisor's ``AdmissionCoordinator`` and each worker's
``RemoteAdmission``, over real Unix socket pairs in one event loop. The order and the 503s are a
single process's, exactly; a worker that dies gives back what it held.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable

import pytest

from vllm_gateway.errors import Overloaded, QueueTimeout, ShuttingDown
from vllm_gateway.proxy.admission import Admission
from vllm_gateway.proxy.shared_admission import RemoteAdmission
from vllm_gateway.runtime.coordinator import AdmissionCoordinator

pytestmark = pytest.mark.timeout(20)


async def _setup(
    workers: int, limit: int, queue: int, timeout: float = 5.0
) -> tuple[AdmissionCoordinator, list[RemoteAdmission]]:
    coordinator = AdmissionCoordinator(Admission(limit, queue, timeout))
    remotes = []
    for i in range(workers):
        ours, theirs = socket.socketpair()
        await coordinator.attach(ours, f"w{i}")
        remote = RemoteAdmission(limit, queue, timeout)
        await remote.connect(theirs)
        remotes.append(remote)
    return coordinator, remotes


async def test_the_limit_holds_across_workers_and_the_queue_is_one_fifo() -> None:
    coordinator, (a, b) = await _setup(2, limit=2, queue=8)
    held = [await a.acquire(), await b.acquire()]
    assert coordinator.admission.in_flight == 2
    order: list[str] = []

    async def wait(remote: RemoteAdmission, name: str) -> None:
        permit = await remote.acquire()
        order.append(name)
        await asyncio.sleep(0.01)
        permit.release()

    # Queued alternately from the two workers; they must be served in arrival order.
    waiters = []
    for i, remote in enumerate([b, a, b, a, b]):
        waiters.append(asyncio.create_task(wait(remote, f"{i}")))
        await asyncio.sleep(0.01)  # arrival order as the supervisor sees it
    assert coordinator.admission.queued == 5
    assert coordinator.admission.in_flight == 2
    held[0].release()
    held[1].release()
    await asyncio.gather(*waiters)
    assert order == ["0", "1", "2", "3", "4"]
    await asyncio.sleep(0.05)
    assert coordinator.admission.in_flight == 0 and coordinator.admission.queued == 0
    await coordinator.aclose()


async def test_a_full_queue_and_a_queue_timeout_are_the_single_process_503s() -> None:
    coordinator, (a, b) = await _setup(2, limit=1, queue=1, timeout=0.3)
    permit = await a.acquire()
    queued = asyncio.create_task(b.acquire())
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded) as full:
        await a.acquire()
    assert full.value.retry_after is not None and full.value.retry_after >= 1
    with pytest.raises(QueueTimeout):
        await queued
    assert b.rejected_timeout_total == 1 and a.rejected_full_total == 1
    permit.release()
    await coordinator.aclose()


async def test_a_worker_that_dies_gives_back_its_permits_and_leaves_the_queue() -> None:
    coordinator, (a, b) = await _setup(2, limit=2, queue=8)
    await a.acquire()
    await a.acquire()
    stuck = asyncio.create_task(a.acquire())  # queued from the worker that will die
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(b.acquire())
    await asyncio.sleep(0.05)
    assert coordinator.admission.queued == 2
    assert a.channel is not None
    a.channel.close()  # the worker's process is gone: its socket closes
    permit = await asyncio.wait_for(waiting, 2)  # one of the dead worker's slots passed on
    with pytest.raises(ShuttingDown):
        await stuck
    await asyncio.sleep(0.05)
    assert coordinator.admission.in_flight == 1 and coordinator.admission.queued == 0
    permit.release()
    await coordinator.aclose()


async def test_a_waiter_that_leaves_is_out_of_the_queue_at_once() -> None:
    coordinator, (a, b) = await _setup(2, limit=1, queue=8)
    permit = await a.acquire()
    leaving = asyncio.create_task(b.acquire())
    staying = asyncio.create_task(b.acquire())
    await asyncio.sleep(0.05)
    leaving.cancel()  # the client left while queued
    await asyncio.sleep(0.05)
    assert coordinator.admission.queued == 1
    permit.release()
    second = await asyncio.wait_for(staying, 2)
    second.release()
    await asyncio.sleep(0.05)
    assert coordinator.admission.in_flight == 0
    await coordinator.aclose()


async def test_a_scrape_gathers_every_other_worker_s_snapshot() -> None:
    coordinator, remotes = await _setup(3, limit=4, queue=4)
    for i, remote in enumerate(remotes):
        remote.snapshot = functools.partial(dict, worker=i)
    others = await remotes[0].peer_snapshots(2.0)
    assert sorted(s["worker"] for s in others) == [1, 2]
    await coordinator.aclose()


async def test_drain_refuses_the_queue_and_new_arrivals() -> None:
    coordinator, (a, b) = await _setup(2, limit=1, queue=4)
    permit = await a.acquire()
    queued = asyncio.create_task(b.acquire())
    await asyncio.sleep(0.05)
    coordinator.close()
    with pytest.raises(ShuttingDown):
        await queued
    with pytest.raises(ShuttingDown):
        await b.acquire()
    permit.release()
    await coordinator.aclose()


async def test_aclose_ends_the_state_ticker_and_the_acquires_still_waiting() -> None:
    coordinator, (a, b) = await _setup(2, limit=1, queue=4)
    permit = await a.acquire()
    queued = asyncio.create_task(b.acquire())
    async with asyncio.timeout(2):
        while coordinator.admission.queued != 1:  # noqa: ASYNC110 - the supervisor's own state
            await asyncio.sleep(0.01)
    mine = {
        task
        for task in asyncio.all_tasks()
        if "runtime/coordinator.py" in task.get_coro().cr_code.co_filename  # type: ignore[union-attr]
    }
    assert len(mine) == 2  # the state ticker and the waiting acquire
    await coordinator.aclose()
    assert all(task.done() for task in mine)  # cancelled and awaited, not left to the loop
    with pytest.raises(ShuttingDown):
        await queued  # the worker's waiter hears that the supervisor hung up
    permit.release()


async def test_an_ask_that_queues_is_told_so_and_one_granted_at_once_is_not() -> None:
    coordinator, (a, b) = await _setup(2, limit=1, queue=4)
    shed: list[str] = []
    first = a.arrive()
    assert not first.granted  # asked for only when waited on
    await first.wait(lambda: shed.append("first"))
    second = b.arrive()
    waiting = asyncio.create_task(second.wait(lambda: shed.append("second")))
    async with asyncio.timeout(2):
        while not shed:  # noqa: ASYNC110 - the supervisor's answer comes over the socket
            await asyncio.sleep(0.01)
    assert shed == ["second"] and not waiting.done()
    first.release()
    assert await asyncio.wait_for(waiting, 2) is second and second.granted
    assert shed == ["second"]
    second.release()
    second.release()  # idempotent: one release message
    await asyncio.sleep(0.05)
    assert coordinator.admission.in_flight == 0 and coordinator.admission.queued == 0
    await coordinator.aclose()


async def test_a_place_released_while_its_ask_waits_leaves_the_supervisor_s_queue() -> None:
    coordinator, (a, b) = await _setup(2, limit=1, queue=4)
    held = await a.acquire()
    place = b.arrive()
    waiting = asyncio.create_task(place.wait())
    await asyncio.sleep(0.05)
    assert coordinator.admission.queued == 1
    waiting.cancel()  # the client left while queued
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.05)
    assert coordinator.admission.queued == 1  # the place is still its owner's
    place.release()
    await asyncio.sleep(0.05)
    assert coordinator.admission.queued == 0
    held.release()
    await asyncio.sleep(0.05)
    assert coordinator.admission.in_flight == 0
    await coordinator.aclose()


async def _until(condition: Callable[[], bool]) -> None:
    """Wait, bounded, for what the other side of a socket pair has done."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - state moved by messages on the socket pairs
            await asyncio.sleep(0.01)


async def test_a_flood_at_one_worker_while_another_holds_a_lease_keeps_one_limit_and_fifo() -> None:
    limit = 8  # two workers: a lease of up to 8 // 4 = 2 idle slots each
    coordinator, (a, b) = await _setup(2, limit=limit, queue=64)
    for place in [await b.acquire(), await b.acquire()]:
        place.release()  # b keeps both slots idle: its lease
    assert b.idle == 2 and coordinator.admission.in_flight == 2
    asked = coordinator.admission.admitted_total
    (await b.acquire()).release()  # admitted from the lease: the supervisor is not asked
    assert coordinator.admission.admitted_total == asked and b.idle == 2
    await _until(lambda: coordinator.state()[0] == 0)  # the gauge counts requests, not leases

    holding = peak = 0
    order: list[str] = []
    names = [f"flood{i}" for i in range(20)] + [f"later{i}" for i in range(4)]
    gates = {name: asyncio.Event() for name in names}

    async def request(remote: RemoteAdmission, name: str) -> None:
        nonlocal holding, peak
        place = await remote.acquire()
        holding += 1
        peak = max(peak, holding)
        order.append(name)
        await gates[name].wait()
        holding -= 1
        place.release()

    # The flood: 20 at a. Six slots are free; the seventh ask queues, so b's lease is recalled
    # and its two idle slots pass to the queue's head.
    flood = [asyncio.create_task(request(a, name)) for name in names[:20]]
    await _until(lambda: coordinator.admission.queued == 12 and b.idle == 0)
    assert holding == limit
    # Once the queue formed, arrivals at either worker take their turn behind it, in order.
    later = []
    for name, remote in zip(names[20:], [b, a, b, a], strict=True):
        later.append(asyncio.create_task(request(remote, name)))
        await _until(lambda: coordinator.admission.queued == 12 + len(later))
    # Free one slot at a time, the oldest holder first: each passes to the queue's head.
    for released in range(1, len(names) + 1):
        gates[order[released - 1]].set()
        await _until(lambda: len(order) >= min(len(names), released + limit))  # noqa: B023
    await asyncio.wait_for(asyncio.gather(*flood, *later), 10)
    assert order == names
    assert peak == limit  # reached through the recalled lease, never passed
    assert coordinator.admission.queued == 0
    await _until(lambda: coordinator.state()[0] == 0)
    await coordinator.aclose()


async def test_a_worker_that_dies_holding_a_lease_gives_back_every_slot() -> None:
    coordinator, (a, b) = await _setup(2, limit=8, queue=8)
    busy = await b.acquire()
    for place in [await b.acquire(), await b.acquire()]:
        place.release()
    assert b.idle == 2 and coordinator.admission.in_flight == 3
    assert b.channel is not None
    b.channel.close()  # the worker's process is gone: its socket closes
    await _until(lambda: coordinator.admission.in_flight == 0)  # its busy slot and its lease
    busy.release()  # the dead worker's own release sends nothing
    held = [await asyncio.wait_for(a.acquire(), 2) for _ in range(8)]  # the whole limit again
    assert coordinator.admission.queued == 0
    for place in held:
        place.release()
    await coordinator.aclose()


async def test_drain_ends_the_leases() -> None:
    coordinator, (_a, b) = await _setup(2, limit=8, queue=8)
    (await b.acquire()).release()
    assert b.idle == 1
    coordinator.close()
    await _until(lambda: b.idle == 0 and coordinator.admission.in_flight == 0)
    with pytest.raises(ShuttingDown):
        await b.acquire()  # no lease to admit from: the supervisor refuses
    await coordinator.aclose()


@pytest.mark.parametrize("queue", [0, 1])
async def test_a_full_queue_refuses_no_ask_that_a_recalled_lease_admits(queue: int) -> None:
    # One process with 2 of 8 slots free admits 2 more and queues up to `queue`: the same here,
    # though the 2 free slots sit idle in b's lease when a's asks arrive.
    coordinator, (a, b) = await _setup(2, limit=8, queue=queue)
    for place in [await b.acquire(), await b.acquire()]:
        place.release()
    assert b.idle == 2
    held = [await a.acquire() for _ in range(6)]
    asks = [asyncio.create_task(a.acquire()) for _ in range(2 + queue)]
    await _until(lambda: sum(task.done() for task in asks) == 2)
    assert coordinator.admission.queued == queue and a.rejected_full_total == 0
    assert all(not task.exception() for task in asks if task.done())
    held.extend(task.result() for task in asks if task.done())
    held[0].release()  # the queued one, if any, gets its slot
    await asyncio.wait_for(asyncio.gather(*asks), 2)
    for place in held[1:] + [task.result() for task in asks[2:]]:
        place.release()
    await _until(lambda: coordinator.state()[0] == 0 and coordinator.admission.queued == 0)
    await coordinator.aclose()


async def test_releases_inside_a_lease_count_in_the_rate_behind_retry_after() -> None:
    coordinator, (_a, b) = await _setup(2, limit=8, queue=8)
    (await b.acquire()).release()
    assert b.idle == 1
    for _ in range(20):  # admitted and ended inside the lease: no message each
        (await b.acquire()).release()
    assert coordinator.admission.release_rate() is None  # the supervisor saw none of them
    await _until(lambda: coordinator.admission.release_rate() is not None)  # b's report came
    await coordinator.aclose()


async def test_a_worker_that_never_answers_a_recall_holds_another_s_ask_one_second_at_most() -> (
    None
):
    coordinator, (a, b) = await _setup(2, limit=12, queue=0)
    silent, unread = socket.socketpair()  # a third worker whose loop never reads its socket
    await coordinator.attach(silent, "stuck")  # leases: 12 // (2 x 3 workers) = 2 slots each
    for place in [await b.acquire(), await b.acquire()]:
        place.release()
    held = [await a.acquire() for _ in range(10)]
    assert b.idle == 2 and coordinator.admission.in_flight == 12
    # No slot free, no queue allowed: the ask waits for the recall, which "stuck" never answers.
    late = await asyncio.wait_for(a.acquire(), 4)  # not refused: b's lease came back
    assert a.rejected_full_total == 0 and b.idle == 0
    for place in [*held, late]:
        place.release()
    await coordinator.aclose()
    unread.close()
