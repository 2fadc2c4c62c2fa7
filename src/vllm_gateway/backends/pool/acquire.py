"""A member's slot for one attempt: choosing the member, waiting when all are full, giving it back.

``Acquirer.acquire(request, tried)`` narrows the fleet to the members that serve the request's
model (none: ``ModelNotFound``), then to those up and not in ``tried`` (none: ``NoHealthyBackend``),
then to those below their own limit on outstanding requests (``Member.has_room``); the router picks
one of these and its slot is taken (``Member.begin``). When every such member is full the request
waits for a release, up to ``admission_wait`` in all, then gets ``NoHealthyBackend`` (503,
``Retry-After: 1``). When no member at all is ready (and the request has tried none), the request
waits for one to become ready (``Fleet.on_ready`` wakes it), up to ``ready_wait`` (the gateway's
queue-wait timeout), then gets ``NoHealthyBackend``: a fleet being restarted or replaced is a
wait, not an error. That check runs only when no member could be chosen: no request pays for it.

Invariants: a slot is taken only in ``acquire`` and given back only in ``release``, once per
attempt (the callers are ``retry.py`` and ``response.py``); every release wakes every waiter, and
each re-checks (the ones that still find no room wait again, within their own deadline); a waiter
that leaves (timeout, cancellation) takes its future off the list.
"""

from __future__ import annotations

import asyncio

from vllm_gateway.backends.base import UpstreamRequest
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.routing import Router
from vllm_gateway.errors import ModelNotFound, NoHealthyBackend

__all__ = ["Acquirer"]


class Acquirer:
    def __init__(
        self, fleet: Fleet, config: PoolConfig, router: Router, ready_wait: float = 60.0
    ) -> None:
        self.fleet = fleet
        self.config = config
        self.router = router
        self.ready_wait = ready_wait  # the wait for a member to become ready (the queue's)
        fleet.on_ready.append(self.wake)
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self, request: UpstreamRequest, tried: list[Member]) -> Member:
        """A member for the request, its slot taken; waits briefly when all are full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.admission_wait
        router = self.router
        key = router.key(request)
        ready_deadline: float | None = None
        while True:
            members = self.fleet.members
            eligible = [m for m in members if m.serves(request.model)]
            up = [m for m in eligible if m.up and m not in tried]
            if not up:
                if not tried and not any(m.up for m in members):
                    # No member ready at all (all restarting, a one-member pool being replaced):
                    # a wait, not an error. Which models are served is known once one is ready.
                    if ready_deadline is None:
                        ready_deadline = loop.time() + self.ready_wait
                    remaining = ready_deadline - loop.time()
                    if remaining > 0:
                        await self._wait(remaining)
                        continue
                if not eligible:
                    raise ModelNotFound(
                        f"The model '{request.model}' does not exist.", param="model"
                    )
                raise NoHealthyBackend(retry_after=max(1.0, self.config.health_interval))
            room = [m for m in up if m.has_room()]
            if room:
                member = router.pick(room, key, request.request_id)
                member.begin()
                return member
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoHealthyBackend(
                    "Every backend that serves the model is at its limit; retry later.",
                    retry_after=1.0,
                )
            await self._wait(remaining)

    async def _wait(self, remaining: float) -> None:
        """Until a release or a member's admission wakes the waiters, or ``remaining`` passes."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(remaining):
                await waiter
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self, member: Member) -> None:
        member.end()
        self.wake()

    def wake(self) -> None:
        """Every waiter re-checks (a slot was given back, or a member became ready)."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:  # each re-checks; the ones that find no room wait again
            if not w.done():
                w.set_result(None)
