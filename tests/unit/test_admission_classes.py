"""Deadlines, classes and honest estimates in the admission (docs/admission.md): the deadline
header's and key entry's parsing, Retry-After per tenant and class, a waiter's standing, the
predicted wait, and shedding a lower class from a full queue."""

from __future__ import annotations

import asyncio

import pytest

from vllm_gateway.errors import Overloaded, Shed
from vllm_gateway.identity import MAX_DEADLINE_MS, Identity, parse_deadline_ms, parse_key_entry
from vllm_gateway.proxy.admission import RETRY_AFTER_MAX, RETRY_AFTER_MIN, Admission, Ticket

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    "raw",
    [b"-1", b"0", b"1" + b"0" * 30, b"soon", b"", b"  ", b"1.5", b"+5", b"1e3", b"86400001"],
)
def test_a_deadline_that_is_not_whole_milliseconds_in_range_is_refused(raw: bytes) -> None:
    assert parse_deadline_ms(raw) is None


@pytest.mark.parametrize(
    ("raw", "ms"), [(b"1", 1), (b" 250 ", 250), (b"86400000", MAX_DEADLINE_MS)]
)
def test_a_deadline_in_range_is_read(raw: bytes, ms: int) -> None:
    assert parse_deadline_ms(raw) == ms


def test_a_key_entry_may_carry_the_tenants_default_deadline() -> None:
    assert parse_key_entry("k:gold:2:1500") == ("k", Identity("gold", 2, 1500))
    assert parse_key_entry("k:gold:2") == ("k", Identity("gold", 2, None))
    with pytest.raises(ValueError, match="deadline of tenant 'gold'"):
        parse_key_entry("k:gold:2:-1")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _measured(adm: Admission, clock: _Clock, releases: int, every: float) -> None:
    """``releases`` slots freed ``every`` seconds apart: a measured release rate."""
    for _ in range(releases):
        permit = adm.try_acquire()
        assert permit is not None
        clock.now += every
        permit.release()


async def test_retry_after_is_for_the_tenant_and_class_that_is_refused() -> None:
    clock = _Clock()
    adm = Admission(limit=1, max_queued=100, queue_timeout=60, clock=clock)
    _measured(adm, clock, 11, 0.5)  # 2 releases a second
    holder = adm.arrive("x")
    assert holder.granted
    flood = [adm.arrive("flood") for _ in range(20)]
    one = adm.arrive("polite")
    # The polite tenant's next arrival is its second waiter: it stands behind two turns of
    # each tenant; the flooding tenant's behind its own twenty and the polite one's.
    assert adm.retry_after("polite") == pytest.approx(4 / 2)
    assert adm.retry_after("flood") == pytest.approx(22 / 2)
    # A higher class stands before every waiter of the lower one.
    assert adm.retry_after("flood", priority=1) == RETRY_AFTER_MIN
    assert adm.retry_after("other", priority=-1) == pytest.approx(22 / 2)
    for place in [*flood, one, holder]:
        place.release()
    assert adm.in_flight == 0 and adm.queued == 0


async def test_retry_after_stays_within_its_bounds() -> None:
    clock = _Clock()
    adm = Admission(limit=1, max_queued=10_000, queue_timeout=60, clock=clock)
    _measured(adm, clock, 3, 1000.0)  # a release every 1,000 s
    places = [adm.arrive("t") for _ in range(20)]
    assert adm.retry_after("t") == RETRY_AFTER_MAX
    for place in places:
        place.release()


async def test_a_waiters_standing_and_predicted_wait_follow_the_queue() -> None:
    clock = _Clock()
    adm = Admission(limit=1, max_queued=100, queue_timeout=60, clock=clock)
    holder = adm.arrive("x")
    first = adm.arrive("a")
    assert isinstance(first, Ticket)
    assert adm.predicted_wait(first) is None  # no rate measured yet: no prediction
    assert adm.predicted_wait(holder) == 0.0
    holder.release()
    await first.wait()
    more = [adm.arrive("a") for _ in range(3)]
    second = adm.arrive("b")
    assert isinstance(second, Ticket)
    assert second.standing()[0] == 2  # one turn of tenant a, then b
    clock.now += 1.0
    first.release()  # a measured release: the slot passes to a's first waiter
    clock.now += 1.0
    rate = adm.release_rate()
    assert rate is not None
    position, eta = second.standing()
    assert position == 2  # an estimate: a turn of each tenant with waiters, then itself
    assert eta == pytest.approx(2 / rate)
    assert adm.predicted_wait(second) == pytest.approx(2 / rate)
    for place in [*more, second]:
        place.release()
    assert adm.in_flight == 0 and adm.queued == 0
    assert adm.queued_by_class() == []


async def test_a_full_queue_sheds_its_newest_lowest_class_waiter_for_a_higher_class() -> None:
    adm = Admission(limit=1, max_queued=2, queue_timeout=60, shed=True)
    holder = adm.arrive("x")
    low_a = adm.arrive("a", priority=0)
    low_b = adm.arrive("b", priority=0)
    high = adm.arrive("gold", priority=5)
    assert adm.shed_total == 1 and adm.queued == 2
    with pytest.raises(Shed) as info:
        await low_b.wait()
    assert info.value.retry_after is not None and info.value.retry_after >= RETRY_AFTER_MIN
    # An arrival of the lowest class has nobody below it to shed: the queue is full for it.
    with pytest.raises(Overloaded):
        adm.arrive("c", priority=0)
    holder.release()
    assert (await high.wait()).granted  # the higher class is served first
    for place in (low_a, low_b, high):
        place.release()
    assert adm.in_flight == 0 and adm.queued == 0


async def test_without_shedding_a_full_queue_refuses_the_higher_class_arrival() -> None:
    adm = Admission(limit=1, max_queued=2, queue_timeout=60)
    holder = adm.arrive("x")
    waiting = [adm.arrive("a"), adm.arrive("b")]
    with pytest.raises(Overloaded):
        adm.arrive("gold", priority=5)
    assert adm.shed_total == 0
    for place in [*waiting, holder]:
        place.release()
    await asyncio.sleep(0)
    assert adm.in_flight == 0 and adm.queued == 0


async def test_the_queue_by_tenant_and_class_is_listed_highest_class_first() -> None:
    adm = Admission(limit=1, max_queued=100, queue_timeout=60)
    holder = adm.arrive("x")
    places = [adm.arrive("a"), adm.arrive("a"), adm.arrive("b", priority=2)]
    rows = adm.queued_by_class()
    assert [(t, p, n) for t, p, n, _ in rows] == [("b", 2, 1), ("a", 0, 2)]
    assert all(eta >= RETRY_AFTER_MIN for *_, eta in rows)
    for place in [*places, holder]:
        place.release()
