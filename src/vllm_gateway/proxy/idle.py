"""``IdleTimeout``: ``asyncio.timeout_at`` whose deadline moves later for the cost of one store.

A stream's idle timeout moves with every chunk. ``asyncio.Timeout.reschedule`` cancels its timer
handle and schedules a new one each time, about 6% of the gateway's CPU per relayed chunk
(docs/performance.md). ``push`` only records the new deadline; when the armed timer fires before
it, the timer arms itself again for the recorded time instead of cancelling the task. A deadline
pushed earlier than the armed one is rescheduled at once, so the timeout never fires late. On
expiry it behaves as ``asyncio.timeout_at``: the task is cancelled and the block raises
``TimeoutError``, unless someone else cancelled the task too (then ``CancelledError`` stands).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

__all__ = ["IdleTimeout"]


class IdleTimeout:
    __slots__ = (
        "_armed",
        "_cancelling",
        "_expired",
        "_given",
        "_handle",
        "_loop",
        "_target",
        "_task",
    )

    def __init__(self, when: float, task: asyncio.Task[Any] | None = None) -> None:
        self._given = task  # the task it cancels: the current one unless given
        self._target = when  # when the timeout expires (loop time)
        self._armed = when  # when the timer handle fires
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False
        self._cancelling = 0

    async def __aenter__(self) -> IdleTimeout:
        task = self._given or asyncio.current_task()
        if task is None:
            raise RuntimeError("IdleTimeout must be used inside a task")
        self._task = task
        self._loop = task.get_loop()
        self._cancelling = task.cancelling()
        self._arm(self._target)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def expired(self) -> bool:
        return self._expired

    def reschedule(self, when: float) -> None:
        """Expire at ``when``, rearming the timer now."""
        self._target = when
        self._arm(when)

    def push(self, when: float) -> None:
        """Expire at ``when`` instead: a later time is only recorded, an earlier one rearms."""
        if when < self._armed:
            self.reschedule(when)
        else:
            self._target = when

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self._target > self._armed:
            self._arm(self._target)
            return
        self._expired = True
        self._task.cancel()
