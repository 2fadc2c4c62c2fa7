"""A member's slot for one attempt: choosing the member, waiting when all are full, giving it back.

``Acquirer.acquire(request, tried)`` narrows the fleet to the members that serve the request's
model (none: ``ModelNotFound``), then to those up and not in ``tried`` (none: ``NoHealthyBackend``),
then to those below their own limit on outstanding requests (``Member.has_room``); the router picks
one of these and its slot is taken (``Member.begin``). When every such member is full the request
waits for a release, up to ``admission_wait`` in all, then gets ``NoHealthyBackend`` (503,
``Retry-After: 1``). With admission from the engines' state on (``saturation.py``), those with
room are narrowed again to the members whose engines admit; when none does, the request waits in
that module's line (up to the queue-wait timeout, then ``QueueTimeout``).

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
from vllm_gateway.backends.pool.saturation import Saturation
from vllm_gateway.errors import ModelNotFound, NoHealthyBackend

__all__ = ["Acquirer"]


class Acquirer:
    def __init__(
        self,
        fleet: Fleet,
        config: PoolConfig,
        router: Router,
        saturation: Saturation | None = None,
    ) -> None:
        self.fleet = fleet
        self.config = config
        self.router = router
        self.saturation = saturation
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self, request: UpstreamRequest, tried: list[Member]) -> Member:
        """A member for the request, its slot taken; waits briefly when all are full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.admission_wait
        router = self.router
        key = router.key(request)
        saturation = self.saturation
        sat_deadline: float | None = None
        woken = False
        while True:
            eligible = [m for m in self.fleet.members if m.serves(request.model)]
            if not eligible:
                raise ModelNotFound(f"The model '{request.model}' does not exist.", param="model")
            up = [m for m in eligible if m.up and m not in tried]
            if not up:
                raise NoHealthyBackend(retry_after=max(1.0, self.config.health_interval))
            room = [m for m in up if m.has_room()]
            if room and saturation is not None:  # admission from the engines' state
                room = saturation.admitting(room, woken)
                if not room:
                    sat_deadline = sat_deadline or saturation.deadline()
                    await saturation.wait(sat_deadline, again=woken, tenant=request.tenant)
                    woken = True
                    continue
            if room:
                member = router.pick(room, key, request.request_id)
                member.begin()
                if saturation is not None:
                    saturation.sent(member)
                return member
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoHealthyBackend(
                    "Every backend that serves the model is at its limit; retry later.",
                    retry_after=1.0,
                )
            waiter = loop.create_future()
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
        if self.saturation is not None:
            self.saturation.released(member)
        waiters, self._waiters = self._waiters, []
        for w in waiters:  # each re-checks; the ones that find no room wait again
            if not w.done():
                w.set_result(None)
