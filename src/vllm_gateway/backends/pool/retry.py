"""Opening a request on a member, and moving it to another while nothing of it reached the relay.

``Retries.open(request, tried)`` takes a member's slot (``acquire.py``) and sends; on a connect
error, a 5xx answer, or the member's ejection while the send waits, it gives the slot back, adds
the member to ``tried`` and goes again on another member, while ``may_retry`` allows. The
response's first chunk and a non-streamed body are retried the same way from ``response.py``,
which calls ``guarded`` and ``may_retry``. Never after a chunk was handed to the relay: from then
on a failure is a failover (``proxy/failover.py``), which asks ``may_fail_over``.

``may_retry`` allows a retry when the request is not bound to the member that holds its stored
response, has been tried on at most ``max_retries`` members, another member that is up serves its
model, and the ``RetryBudget`` has a token: retries in the last ``retry_budget_window`` seconds are
at most ``retry_budget_ratio`` of the requests in it (or ``retry_budget_min``), so that when every
member fails at once retries do not multiply the load.

``may_fail_over`` takes no token of that budget: a continuation is not extra work but the rest of
work already admitted (the dead member's share of it), and in a small pool one member's death is
most of the recent traffic, far beyond any ratio. It is bounded per stream instead: at most
``failover_max`` continuations, each to a member the stream has not used (``avoid``), within the
request's deadlines; so when every member fails at once the extra requests stay at most
streams x ``failover_max``, and nothing is resent in a loop.

Invariants: every slot ``open`` took is given back on every path that does not return it (the
caller then owns it); an attempt awaited in ``guarded`` is in its member's ``pending`` set exactly
while it waits, so an ejection cancels it (``Ejected``); a send that completes after its caller was
cancelled has its response closed (``_close_orphan``). The gateway's own cancellations (timeouts,
the client gone, drain) are neither a success nor a failure of the member.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from vllm_gateway.backends.base import UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.pool.acquire import Acquirer
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.errors import BackendUnavailable, UpstreamError

__all__ = ["Ejected", "Retries", "RetryBudget"]

# The pool's comings and goings share one logger name (fleet.py).
log = logging.getLogger("vllm_gateway.backends.pool.backend")
T = TypeVar("T")


class Ejected(Exception):
    """The member was ejected while this attempt waited for its first byte."""


class RetryBudget:
    """Retries allowed: at most ``ratio`` of the requests of the last ``window`` seconds (or ``min``).

    A budget keeps retries from multiplying load when every member is failing at once. It keeps
    the times of the window's requests and retries only: each is dropped once it is older.
    """

    def __init__(
        self,
        ratio: float,
        minimum: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.window = window
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.exhausted = 0

    def _trim(self, now: float) -> None:
        edge = now - self.window
        for q in (self._requests, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def request(self) -> None:
        now = self._clock()
        requests = self._requests
        requests.append(now)
        edge = now - self.window
        while requests[0] < edge:  # never empty: it holds ``now``
            requests.popleft()

    def try_retry(self) -> bool:
        now = self._clock()
        self._trim(now)
        allowed = max(self.minimum, math.floor(self.ratio * len(self._requests)))
        if len(self._retries) >= allowed:
            self.exhausted += 1
            return False
        self._retries.append(now)
        return True


class Retries:
    def __init__(self, fleet: Fleet, config: PoolConfig, acquirer: Acquirer) -> None:
        self.fleet = fleet
        self.config = config
        self.acquirer = acquirer
        self.budget = RetryBudget(
            config.retry_budget_ratio, config.retry_budget_min, config.retry_budget_window
        )
        self.count = 0  # requests moved to another member
        self.failovers = 0  # streams allowed to go on on another member

    async def open(
        self, request: UpstreamRequest, tried: list[Member]
    ) -> tuple[Member, UpstreamResponse]:
        """Send to a member, moving to another on a connect error or 5xx while the budget allows."""
        acquirer = self.acquirer
        while True:
            member = await acquirer.acquire(request, tried)
            try:
                resp = await self.guarded(member, member.backend.send(request))
            except Ejected:
                acquirer.release(member)
                tried.append(member)
                if self.may_retry(request, tried):
                    continue
                raise BackendUnavailable("The backend was taken out of the pool.") from None
            except UpstreamError:
                acquirer.release(member)
                self.fleet.fail(member, "connect")
                tried.append(member)
                if self.may_retry(request, tried):
                    continue
                raise
            except BaseException:
                acquirer.release(member)
                raise
            member.progress()
            if resp.status >= 500:
                self.fleet.fail(member, "status_5xx")
                if self.may_retry(request, [*tried, member]):
                    tried.append(member)
                    await resp.aclose()
                    acquirer.release(member)
                    continue
            return member, resp

    async def guarded(self, member: Member, aw: Awaitable[T]) -> T:
        """Await ``aw`` as a task that an ejection of ``member`` may cancel (→ ``Ejected``)."""
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        member.pending.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and current.cancelling() == 0:
                raise Ejected() from None
            task.add_done_callback(_close_orphan)
            raise
        finally:
            member.pending.discard(task)

    def may_retry(self, request: UpstreamRequest, tried: list[Member]) -> bool:
        if request.locate is not None:
            return False  # bound to the member that holds its stored response
        if len(tried) > self.config.max_retries:
            return False
        if not any(m.up and m not in tried and m.serves(request.model) for m in self.fleet.members):
            return False
        if not self.budget.try_retry():
            log.warning("retry budget exhausted: request %s is not retried", request.request_id)
            return False
        tried[-1].retries += 1
        self.count += 1
        return True

    def may_fail_over(self, model: str | None, avoid: frozenset[str], done: int) -> str | None:
        """None when a stream may go on on another member now; else why not: ``limit``,
        ``no_member``. No retry-budget token is taken (see the module's docstring)."""
        if done >= self.config.failover_max:
            return "limit"
        if not any(m.up and m.name not in avoid and m.serves(model) for m in self.fleet.members):
            return "no_member"
        self.failovers += 1
        return None


def _close_orphan(task: asyncio.Future[Any]) -> None:
    """A send that finished after its caller was cancelled: close what it opened."""
    if task.cancelled() or task.exception() is not None:
        return
    resp = task.result()
    if isinstance(resp, UpstreamResponse):
        asyncio.get_running_loop().create_task(resp.aclose())
