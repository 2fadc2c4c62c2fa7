"""Which member holds a stored response, so that a request naming it goes to that member.

vLLM keeps a Responses API answer stored (``store``) in its own server's memory: only the member
that produced ``resp_...`` can answer a request that names it (a ``previous_response_id``, or a
route on the stored response itself: ``UpstreamRequest.locate``). ``Holders.find`` returns the member remembered for the id when it
is up, else asks every member that is up (``GET /v1/responses/{id}``, each within twice
``health_timeout``) and remembers the one that knows it. None when none does: the request then
goes through the ordinary choice and meets the member's 404.

Invariants: at most ``HOLDERS_KEPT`` ids are remembered, the least recently used dropped first (a
dropped id costs one more round of questions, never a wrong answer); a member is remembered by
name, so a member that left and came back is still found; every probe's response is closed.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from vllm_gateway.backends.base import UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.errors import UpstreamError

__all__ = ["HOLDERS_KEPT", "Holders"]

HOLDERS_KEPT = 10_000  # stored responses whose holder is remembered (beyond it: asked again)


class Holders:
    def __init__(self, fleet: Fleet, config: PoolConfig) -> None:
        self.fleet = fleet
        self.config = config
        self._names: OrderedDict[str, str] = OrderedDict()  # response id -> member name, LRU

    async def find(self, response_id: str, request_id: str) -> Member | None:
        """The member that holds stored response ``response_id``: remembered, else found by
        asking every member that is up. None when no member knows it."""
        name = self._names.get(response_id)
        if name is not None:
            for m in self.fleet.members:
                if m.name == name and m.up:
                    self._names.move_to_end(response_id)
                    return m
        up = self.fleet.up()
        probe = UpstreamRequest("GET", f"/v1/responses/{response_id}", request_id=request_id)

        async def knows(m: Member) -> bool:
            resp: UpstreamResponse | None = None
            try:
                async with asyncio.timeout(self.config.health_timeout * 2):
                    resp = await m.backend.send(probe)
                    return resp.status == 200
            except (TimeoutError, UpstreamError):
                return False
            finally:
                if resp is not None:
                    await resp.aclose()

        answers = await asyncio.gather(*(knows(m) for m in up))
        for m, known in zip(up, answers, strict=True):
            if known:
                self.remember(response_id, m)
                return m
        return None

    def remember(self, response_id: str, member: Member) -> None:
        self._names[response_id] = member.name
        self._names.move_to_end(response_id)
        while len(self._names) > HOLDERS_KEPT:
            self._names.popitem(last=False)
