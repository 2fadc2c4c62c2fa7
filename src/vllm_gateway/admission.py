"""Admission control: at most N requests in flight, a bounded FIFO queue, a bounded wait.

Invariants (tested in tests/unit/test_admission.py):
- ``in_flight`` never exceeds ``limit``;
- waiters are served in arrival order, and a freed permit goes straight to the oldest live waiter
  (no barging: a new arrival never overtakes the queue);
- a waiter leaves the queue when its wait times out or its task is cancelled (client gone), and a
  permit handed to it in that same instant is passed on, never lost;
- ``Permit.release()`` is idempotent, so every path may call it and the count moves exactly once;
- after ``close()`` (drain), queued waiters and new arrivals get ``ShuttingDown`` at once.

No locks: everything runs on the event loop, and the only suspension point is the waiter's future.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from .errors import Overloaded, QueueTimeout, ShuttingDown

__all__ = ["Admission", "Permit"]

# How many recent releases the Retry-After estimate looks at.
_RATE_WINDOW = 64


class Permit:
    """One slot, held for the whole life of a response. ``release()`` may be called any number of times."""

    __slots__ = ("_admission", "acquired_at", "queue_wait", "released")

    def __init__(self, admission: Admission, acquired_at: float, queue_wait: float) -> None:
        self._admission = admission
        self.acquired_at = acquired_at
        self.queue_wait = queue_wait
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release()


class Admission:
    def __init__(
        self,
        limit: int,
        max_queued: int,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self._clock = clock
        self._in_flight = 0
        self._queued = 0  # live waiters; the deque may also hold abandoned futures
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._releases: deque[float] = deque(maxlen=_RATE_WINDOW)
        self._closed = False
        self._idle: asyncio.Event | None = None
        # Counters for metrics and tests.
        self.admitted_total = 0
        self.rejected_full_total = 0
        self.rejected_timeout_total = 0

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

    # --- acquiring -------------------------------------------------------------------------

    async def acquire(self, timeout: float | None = None) -> Permit:
        """Wait for a slot; raise ``Overloaded``, ``QueueTimeout`` or ``ShuttingDown`` instead."""
        if self._closed:
            raise ShuttingDown(retry_after=self._estimate_wait(1))
        start = self._clock()
        if self._in_flight < self.limit and self._queued == 0:
            self._in_flight += 1
            self.admitted_total += 1
            return Permit(self, start, 0.0)
        if self._queued >= self.max_queued:
            self.rejected_full_total += 1
            raise Overloaded(retry_after=self._estimate_wait(self._queued + 1))

        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._queued += 1
        position = self._queued
        try:
            async with asyncio.timeout(self.queue_timeout if timeout is None else timeout):
                await fut
        except BaseException as exc:
            if fut.cancelled() or not fut.done():
                # Still queued (the task's cancellation may have cancelled the future already):
                # leave the queue; _release skips the abandoned future.
                fut.cancel()
                self._queued -= 1
            elif fut.exception() is None:
                # The permit reached us in the same instant as the timeout or the cancellation:
                # we own it, so hand it on rather than lose it.
                self._release()
            if isinstance(exc, TimeoutError):
                self.rejected_timeout_total += 1
                raise QueueTimeout(
                    f"No slot became free within {self.queue_timeout:g} s "
                    f"(queue position {position} of {self._queued + 1}); retry later.",
                    retry_after=self._estimate_wait(max(1, self._queued)),
                ) from None
            raise
        # A future completed by ``_release`` carries a slot already counted in ``_in_flight``.
        self.admitted_total += 1
        return Permit(self, self._clock(), self._clock() - start)

    def _release(self) -> None:
        self._releases.append(self._clock())
        while self._waiters:
            fut = self._waiters.popleft()
            if fut.done():  # abandoned by a waiter that timed out or was cancelled
                continue
            self._queued -= 1
            fut.set_result(None)  # the slot passes on; _in_flight is unchanged
            return
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    # --- drain -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop admitting: queued waiters and later arrivals get ``ShuttingDown``."""
        if self._closed:
            return
        self._closed = True
        retry_after = self._estimate_wait(1)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._queued -= 1
                fut.set_exception(ShuttingDown(retry_after=retry_after))

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
