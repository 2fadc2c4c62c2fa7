"""Admission control: at most N requests in flight, a bounded fair queue, a bounded wait.

The queue is FIFO per tenant (an API key's tenant; one tenant when keys are off, which makes it
plain FIFO). A freed slot goes to the next tenant in rotation within the highest priority class
that has waiters, so a tenant that floods the queue cannot starve another: each waiting tenant
gets a turn. When the queue is full, an arrival from a tenant with fewer waiters than the largest
one takes the place of that tenant's newest waiter (which gets 503 ``overloaded``) instead of
being refused itself. With shedding on (``shed``), an arrival of a higher class first takes the
place of the newest waiter of the lowest class below its own (503 ``shed``).

Every refusal's Retry-After is an estimate for that tenant and class (``retry_after``): the
places ahead of it (every waiter of a higher class, and in its own class, turn by turn, as many
of each tenant's as its own) over the measured release rate, within ``RETRY_AFTER_MIN`` and
``RETRY_AFTER_MAX``. The same standing is a waiter's position and estimate while it waits
(``Ticket.standing``) and the predicted wait a request's deadline is held against
(``predicted_wait``).

A request's admission is a ``Place``, taken when the request is whole (``arrive``: a ``Permit`` when
a slot is free and nobody waits, else a ``Ticket``, a place at the end of its tenant's queue) and
held by one owner, in one slot, until the request ends: ``wait`` turns it into a slot, ``release``
gives back whatever it holds. ``RemotePlace`` (shared_admission.py) is the same for a worker of
several, answered by the supervisor.

Invariants (tested in tests/unit/test_admission.py):
- ``in_flight`` never exceeds ``limit``;
- within a tenant, waiters are served in arrival order, and a freed permit goes straight to a live
  waiter (no barging: a new arrival never overtakes the queue);
- a place is released by its owner, once, on every path: ``release`` leaves the queue (a place
  whose wait timed out or was cancelled is still the owner's to release), gives back the slot,
  or passes on a slot that reached the place in the same instant as the timeout, the cancellation
  or the refusal; it is idempotent, so the count moves exactly once;
- a place taken back by the admission itself (evicted from a full queue, or on ``close``) has
  nothing left to give back;
- after ``close()`` (drain), queued waiters and new arrivals get ``ShuttingDown`` at once.

No locks: everything runs on the event loop, and the only suspension point is the waiter's future.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from vllm_gateway.errors import Overloaded, QueueTimeout, Shed, ShuttingDown

__all__ = ["RETRY_AFTER_MAX", "RETRY_AFTER_MIN", "Admission", "Later", "Permit", "Place", "Ticket"]

# How many recent releases the Retry-After estimate looks at.
_RATE_WINDOW = 64
# The bounds of every Retry-After the admission computes, in seconds.
RETRY_AFTER_MIN = 1.0
RETRY_AFTER_MAX = 3600.0


class Place(Protocol):
    """A request's admission, from its arrival to its end, in its owner's one slot."""

    @property
    def granted(self) -> bool:
        """The place became a slot (and stays so once released: the request was admitted)."""

    @property
    def queue_wait(self) -> float:
        """Seconds from the place's arrival to its slot (0 until granted)."""

    async def wait(self, shed: Callable[[], None] | None = None) -> Place:
        """The place, once it holds a slot; ``QueueTimeout``, ``Overloaded`` or ``ShuttingDown``
        when it will not (the place is still the owner's to release). ``shed`` is called before
        a wait in the queue: what the owner need not hold while it waits."""
        ...

    def step_aside(self) -> Place:
        """Give up the slot or the queue position now, for a wait that is not the admission's
        own; the place to hold instead, which takes its place again, at the end of the queue,
        when waited on."""
        ...

    def release(self) -> None:
        """Give back what the place holds. Idempotent."""


class Permit:
    """A slot, held for the whole life of a response. ``release()`` may be called any number of
    times."""

    __slots__ = ("_admission", "_key", "acquired_at", "queue_wait", "released")

    granted = True

    def __init__(
        self,
        admission: Admission,
        acquired_at: float,
        queue_wait: float,
        key: tuple[int, str] = (0, ""),
    ) -> None:
        self._admission = admission
        self._key = key
        self.acquired_at = acquired_at
        self.queue_wait = queue_wait
        self.released = False

    async def wait(
        self, shed: Callable[[], None] | None = None, timeout: float | None = None
    ) -> Permit:
        return self

    def step_aside(self) -> Later:
        self.release()
        return Later(self._admission, self._key)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release()


class _Queue:
    """One tenant's waiters, oldest first; may hold abandoned (done) futures, skipped lazily."""

    __slots__ = ("live", "waiters")

    def __init__(self) -> None:
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.live = 0


class Ticket:
    """A place in the queue, taken at arrival. ``wait`` turns it into a slot, within the queue
    timeout counted from arrival; ``release`` gives the place up (the request was refused, its
    client left, or its wait failed), passing on a slot that had already reached it, or gives
    back the slot it became."""

    __slots__ = (
        "_admission",
        "_deadline",
        "_fut",
        "_key",
        "_queue",
        "acquired_at",
        "arrived_at",
        "granted",
        "position",
        "queue_wait",
        "released",
    )

    def __init__(
        self,
        admission: Admission,
        key: tuple[int, str],
        queue: _Queue,
        fut: asyncio.Future[None],
        arrived_at: float,
        loop_arrived_at: float,
        position: int,
    ) -> None:
        self._admission = admission
        self._key = key
        self._queue = queue
        self._fut = fut
        self._deadline = loop_arrived_at  # the loop's clock at arrival; the timeout is added
        self.arrived_at = arrived_at
        self.position = position
        self.granted = False
        self.acquired_at = 0.0
        self.queue_wait = 0.0
        self.released = False

    async def wait(
        self, shed: Callable[[], None] | None = None, timeout: float | None = None
    ) -> Ticket:
        """The place, holding the slot; raise ``QueueTimeout`` when none comes within
        ``timeout`` (default: the queue timeout) of arrival, ``Overloaded`` or ``ShuttingDown``
        when the admission takes the place back. Whatever happens, the owner releases it."""
        if self.granted:
            return self
        adm = self._admission
        fut = self._fut
        if shed is not None and not fut.done():
            shed()
        limit = adm.queue_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout_at(self._deadline + limit):
                await fut
        except TimeoutError:
            adm.rejected_timeout_total += 1
            # Those queued besides this place (still counted unless its slot came at the end).
            others = adm._queued - (1 if fut.cancelled() or not fut.done() else 0)
            raise QueueTimeout(
                f"No slot became free within {limit:g} s "
                f"(queue position {self.position} of {others + 1}); retry later.",
                retry_after=adm._eta(adm._standing(self._key, self._rank())),
            ) from None
        # A future completed by ``_release`` carries a slot already counted in ``_in_flight``.
        self.granted = True
        adm.admitted_total += 1
        now = self.acquired_at = adm._clock()
        self.queue_wait = now - self.arrived_at
        return self

    def standing(self) -> tuple[int, float]:
        """(position, estimated seconds to a slot) while queued; (0, 0.0) once it is not."""
        fut = self._fut
        if fut.done() or self.granted:
            return 0, 0.0
        adm = self._admission
        position = adm._standing(self._key, self._rank())
        rate = adm.release_rate()
        return position, (position / rate if rate else adm._eta(position))

    def _rank(self) -> int:
        """Its place within its tenant's queue (1: next), counting live waiters only."""
        waiters = self._queue.waiters
        if waiters and waiters[-1] is self._fut:
            return self._queue.live  # the newest (an arrival): no walk
        rank = 1
        for fut in self._queue.waiters:
            if fut is self._fut:
                return rank
            if not fut.done():
                rank += 1
        return max(1, self._queue.live)

    def step_aside(self) -> Later:
        self.release()
        return Later(self._admission, self._key)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        fut = self._fut
        if fut.cancelled() or not fut.done():
            # Still queued (a cancelled wait may have cancelled the future already): leave the
            # queue; the abandoned future is skipped when its turn comes.
            fut.cancel()
            self._admission._forget(self._key, self._queue)
        elif fut.exception() is None:
            # The slot: the one this place became, or one that reached it in the same instant as
            # the timeout, the cancellation or the refusal. It passes on, never lost.
            self._admission._release()
        # Else the admission took the place back itself (evicted, or closed): nothing to undo.


class Later:
    """A place given up for a wait that is not the admission's own (the model list, a rate
    limiter's round trip): it takes a place again, at the end of its tenant's queue, when waited
    on (``Overloaded`` or ``ShuttingDown`` then, as at arrival)."""

    __slots__ = ("_admission", "_key", "_place", "released")

    def __init__(self, admission: Admission, key: tuple[int, str]) -> None:
        self._admission = admission
        self._key = key
        self._place: Permit | Ticket | None = None
        self.released = False

    @property
    def granted(self) -> bool:
        return self._place is not None and self._place.granted

    @property
    def queue_wait(self) -> float:
        return self._place.queue_wait if self._place is not None else 0.0

    async def wait(
        self, shed: Callable[[], None] | None = None, timeout: float | None = None
    ) -> Later:
        if self.released:
            raise RuntimeError("waiting on a released place")
        place = self._place
        if place is None:
            place = self._place = self._admission.arrive(self._key[1], self._key[0])
        await place.wait(shed, timeout)
        return self

    def standing(self) -> tuple[int, float]:
        place = self._place
        return place.standing() if isinstance(place, Ticket) else (0, 0.0)

    def step_aside(self) -> Later:
        if self._place is None:
            return self  # nothing taken yet: nothing to give up
        self.release()
        return Later(self._admission, self._key)

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self._place is not None:
                self._place.release()


class Admission:
    def __init__(
        self,
        limit: int,
        max_queued: int,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        shed: bool = False,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.shed = shed  # a full queue makes room for a higher class by refusing a lower one
        self._clock = clock
        self._in_flight = 0
        self._queued = 0  # live waiters over all tenants
        self._queues: dict[tuple[int, str], _Queue] = {}
        # Per priority class (highest first when serving), the tenants with waiters, in turn order.
        self._turns: dict[int, deque[str]] = {}
        self._releases: deque[float] = deque(maxlen=_RATE_WINDOW)
        self._closed = False
        self._idle: asyncio.Event | None = None
        # Counters for metrics and tests.
        self.admitted_total = 0
        self.rejected_full_total = 0
        self.rejected_timeout_total = 0
        self.shed_total = 0

    # --- state -----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def closed(self) -> bool:
        return self._closed

    def queued_by_tenant(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, tenant), queue in self._queues.items():
            if queue.live:
                out[tenant] = out.get(tenant, 0) + queue.live
        return out

    def queued_by_class(self) -> list[tuple[str, int, int, float]]:
        """(tenant, priority class, waiters, estimated seconds for its next arrival) for every
        tenant and class with waiters, highest class first."""
        out = []
        for key, queue in sorted(self._queues.items(), key=lambda item: (-item[0][0], item[0][1])):
            if queue.live:
                eta = self._eta(self._standing(key, queue.live + 1))
                out.append((key[1], key[0], queue.live, eta))
        return out

    # --- acquiring -------------------------------------------------------------------------

    def try_acquire(self, key: tuple[int, str] = (0, "")) -> Permit | None:
        """A permit at once when a slot is free and nobody waits (no barging); else None."""
        if self._closed or self._in_flight >= self.limit or self._queued:
            return None
        self._in_flight += 1
        self.admitted_total += 1
        return Permit(self, self._clock(), 0.0, key)

    def arrive(self, tenant: str = "", priority: int = 0) -> Permit | Ticket:
        """Take a place at once, without waiting: a permit when a slot is free and nobody waits,
        else a place at the end of the tenant's queue (``Ticket.wait`` for the permit). Raise
        ``Overloaded`` when the queue is full and no room can be made, ``ShuttingDown`` after
        ``close()``. The front door calls this when a request is whole, before its task runs, so
        places are taken in arrival order and a full gateway refuses at once."""
        if self._closed:
            raise ShuttingDown(retry_after=self._estimate_wait(1))
        key = (priority, tenant)
        permit = self.try_acquire(key)
        if permit is not None:
            return permit
        if (
            self._queued >= self.max_queued
            and not (self.shed and self._shed_below(priority))
            and not self._make_room(key)
        ):
            self.rejected_full_total += 1
            raise Overloaded(retry_after=self.retry_after(tenant, priority))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        if not queue.live:
            self._turns.setdefault(priority, deque()).append(tenant)
        queue.waiters.append(fut)
        queue.live += 1
        self._queued += 1
        return Ticket(self, key, queue, fut, self._clock(), loop.time(), self._queued)

    async def acquire(
        self, timeout: float | None = None, tenant: str = "", priority: int = 0
    ) -> Permit | Ticket:
        """A place holding a slot, arrived and waited for at once; raise ``Overloaded``,
        ``QueueTimeout`` or ``ShuttingDown`` instead (the place given up)."""
        place = self.arrive(tenant, priority)
        try:
            return await place.wait(timeout=timeout)
        except BaseException:
            place.release()
            raise

    def _forget(self, key: tuple[int, str], queue: _Queue) -> None:
        """A live waiter of ``queue`` left: count it out, and drop the tenant's turn if empty."""
        queue.live -= 1
        self._queued -= 1
        if not queue.live:
            queue.waiters.clear()
            turns = self._turns.get(key[0])
            if turns is not None and key[1] in turns:
                turns.remove(key[1])

    def _make_room(self, key: tuple[int, str]) -> bool:
        """The queue is full: evict the newest waiter of the tenant with the most waiters, if
        that tenant has more than the arriving one. True if a place was freed."""
        mine = self._queues[key].live if key in self._queues else 0
        victim_key, victim = None, None
        for other_key, queue in self._queues.items():
            if queue.live > mine + 1 and (victim is None or queue.live > victim.live):
                victim_key, victim = other_key, queue
        if victim is None or victim_key is None:
            return False
        while victim.waiters:
            fut = victim.waiters.pop()
            if not fut.done():
                self.rejected_full_total += 1
                fut.set_exception(
                    Overloaded(
                        "The queue is full and this tenant holds the largest share of it; retry later.",
                        retry_after=self._eta(self._standing(victim_key, victim.live)),
                    )
                )
                self._forget(victim_key, victim)
                return True
        return False

    def _shed_below(self, priority: int) -> bool:
        """The queue is full and shedding is on: refuse the newest waiter of the lowest class
        below ``priority``, if there is one. True if a place was freed."""
        lower = [p for p, turns in self._turns.items() if p < priority and turns]
        if not lower:
            return False
        lowest = min(lower)
        # Its tenant with the most waiters gives up its newest one (of equals, the tenant
        # latest in turn).
        victim_key, victim = (lowest, ""), None
        for tenant in self._turns[lowest]:
            queue = self._queues[(lowest, tenant)]
            if victim is None or queue.live >= victim.live:
                victim_key, victim = (lowest, tenant), queue
        assert victim is not None
        while victim.waiters:
            fut = victim.waiters.pop()
            if not fut.done():
                self.shed_total += 1
                fut.set_exception(
                    Shed(retry_after=self._eta(self._standing(victim_key, victim.live)))
                )
                self._forget(victim_key, victim)
                return True
        return False  # pragma: no cover - a tenant in turn has a live waiter

    def _next_waiter(self) -> asyncio.Future[None] | None:
        for priority in sorted(self._turns, reverse=True):
            turns = self._turns[priority]
            while turns:
                tenant = turns[0]
                queue = self._queues[(priority, tenant)]
                while queue.waiters:
                    fut = queue.waiters.popleft()
                    if fut.done():  # abandoned by a waiter that timed out or was cancelled
                        continue
                    queue.live -= 1
                    self._queued -= 1
                    turns.popleft()
                    if queue.live:
                        turns.append(tenant)  # its next waiter waits for its next turn
                    return fut
                turns.popleft()
        return None

    def _release(self) -> None:
        self._releases.append(self._clock())
        fut = self._next_waiter()
        if fut is not None:
            fut.set_result(None)  # the slot passes on; _in_flight is unchanged
            return
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def note_releases(self, n: int, over: float) -> None:
        """``n`` slots freed in the last ``over`` seconds where this admission did not see them
        (inside a worker's lease): they count in the release rate, spread evenly up to now."""
        n = min(n, _RATE_WINDOW)
        if n <= 0:
            return
        now = self._clock()
        last = self._releases[-1] if self._releases else now - over
        self._releases.extend(max(last, now - over * (n - 1 - i) / n) for i in range(n))

    # --- drain -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop admitting: queued waiters and later arrivals get ``ShuttingDown``."""
        if self._closed:
            return
        self._closed = True
        retry_after = self._estimate_wait(1)
        for queue in self._queues.values():
            while queue.waiters:
                fut = queue.waiters.popleft()
                if not fut.done():
                    fut.set_exception(ShuttingDown(retry_after=retry_after))
            queue.live = 0
        self._queued = 0
        self._turns.clear()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; True if that happened within ``timeout`` seconds."""
        if self._in_flight == 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        self._idle.clear()
        try:
            async with asyncio.timeout(timeout):
                while self._in_flight:
                    await self._idle.wait()
                    self._idle.clear()
        except TimeoutError:
            return False
        return True

    # --- Retry-After -----------------------------------------------------------------------

    def release_rate(self) -> float | None:
        """Permits freed per second over the recent window, or None before there is a rate."""
        if len(self._releases) < 2:
            return None
        # Measure up to now, so that a rate that has dried up decays instead of staying optimistic.
        span = self._clock() - self._releases[0]
        return (len(self._releases) - 1) / span if span > 0 else None

    def _estimate_wait(self, position: int) -> float:
        """Seconds until a request at ``position`` in the queue would likely get a slot."""
        rate = self.release_rate()
        if rate is None:
            return max(1.0, min(self.queue_timeout, 60.0))
        return max(1.0, min(position / rate, 3600.0))

    def estimate_wait(self, position: int | None = None) -> float:
        return self._estimate_wait(self._queued + 1 if position is None else position)

    def _eta(self, position: int) -> float:
        """Retry-After for a request that would stand at ``position``: within the bounds."""
        rate = self.release_rate()
        if rate is None:
            return max(RETRY_AFTER_MIN, min(self.queue_timeout, 60.0))
        return max(RETRY_AFTER_MIN, min(position / rate, RETRY_AFTER_MAX))

    def _standing(self, key: tuple[int, str], rank: int) -> int:
        """The position of the ``rank``-th waiter of ``key``'s tenant and class: every waiter of
        a higher class, and in its own class up to ``rank`` of every other tenant's (the turns
        serve one waiter per tenant in each round), then itself."""
        priority, tenant = key
        position = rank
        for (p, t), queue in self._queues.items():
            if p > priority:
                position += queue.live
            elif p == priority and t != tenant:
                position += min(queue.live, rank)
        return position

    def retry_after(self, tenant: str = "", priority: int = 0) -> float:
        """Seconds until a request of this tenant and class arriving now would likely get a
        slot: the Retry-After of its refusals."""
        key = (priority, tenant)
        queue = self._queues.get(key)
        return self._eta(self._standing(key, (queue.live if queue else 0) + 1))

    def predicted_wait(self, place: Permit | Ticket) -> float | None:
        """Seconds ``place`` will likely wait for its slot (its position over the measured
        release rate); 0 for a slot, None before there is a rate."""
        if place.granted or not isinstance(place, Ticket):
            return 0.0
        rate = self.release_rate()
        if rate is None:
            return None
        return self._standing(place._key, place._rank()) / rate
