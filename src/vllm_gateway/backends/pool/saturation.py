"""Admission from the engines' state: a member takes a request only while its engine has room.

On while ``saturation_max_waiting`` is set. ``Saturation`` reads every member's ``/metrics``
(``engine_metrics.py``) every ``saturation_scrape_interval`` and keeps, per member, a ``Reading``:
the engine's waiting requests, its KV-cache use, when the scrape was sent and how many requests
this gateway had in flight to it then. A member *admits* a request while

    reading.waiting + (its in flight now - its in flight at the reading) < saturation_max_waiting
    and (when set) reading.kv_usage < saturation_max_kv_cache_usage

The middle term counts what this gateway sent since the reading (net of what ended), so a burst is
not all admitted on one reading; a request sent within one scrape interval before the reading
counts as sent after it (it may not have reached the engine when the engine answered). A member with no reading, or one older than
``saturation_stale_after``, is *unknown*, never idle: it admits only while this gateway has fewer
than ``saturation_unknown_limit`` requests in flight to it. Several gateway replicas in front of
the same members read the same engines, so they agree without talking; between two readings each
may send up to the threshold, so an engine's queue is bounded by the threshold times the replicas.

A request that finds no member admitting waits here (``wait``), in turns by tenant and in arrival
order within one (``FairLine``: past the gateway's own queue, a request holds its permit, so the
fair turns must hold here too), up to the
queue-wait timeout counted from its first wait (and within the first-token timeout, so it ends as
``queue_timeout``, 503 with Retry-After). Wakeups are bounded: after a reading, as many waiters as
the readings leave room for, from the front; after a release on a member that admits, one. A woken
request that finds no room after all waits again first among its tenant's. No one polls.

Invariants: a waiter's future is on ``_line`` only while its ``wait`` runs (taken off by the
wakeup, or by ``wait`` itself when it leaves otherwise); readings are replaced, never merged; the scrape loop has one owner (``start`` /
``aclose``, called by ``PoolBackend``) and each scrape is one request under ``health_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.engine_metrics import parse_engine_metrics, scrape
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.errors import QueueTimeout

__all__ = ["FairLine", "Reading", "Saturation"]

log = logging.getLogger("vllm_gateway.backends.pool.saturation")

# The saturation wait ends this share of the first-token timeout in, so that it ends as a 503
# queue_timeout and not as the first-token timeout that also bounds the send.
_FIRST_TOKEN_SHARE = 0.9


@dataclass(slots=True, frozen=True)
class Reading:
    """A member's engine as one scrape showed it."""

    waiting: float
    running: float
    kv_usage: float | None
    at: float  # time.monotonic() when the scrape was sent
    base: int  # this gateway's requests in flight to the member then


class FairLine:
    """The requests waiting for an engine with room, by tenant, served in turns: each wakeup
    takes the head of the next tenant's queue, so a tenant that floods waits behind itself."""

    __slots__ = ("_by", "size")

    def __init__(self) -> None:
        self._by: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, tenant: str, waiter: asyncio.Future[None], front: bool) -> None:
        queue = self._by.get(tenant)
        if queue is None:
            queue = self._by[tenant] = deque()
        if front:  # woken before and still without room: first of its tenant's, in its turn
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        self.size += 1

    def pop(self) -> asyncio.Future[None]:
        tenant, queue = next(iter(self._by.items()))
        waiter = queue.popleft()
        if queue:
            self._by.move_to_end(tenant)
        else:
            del self._by[tenant]
        self.size -= 1
        return waiter

    def remove(self, tenant: str, waiter: asyncio.Future[None]) -> None:
        queue = self._by.get(tenant)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.size -= 1
            if not queue:
                del self._by[tenant]

    def drain(self) -> list[asyncio.Future[None]]:
        waiters = [w for queue in self._by.values() for w in queue]
        self._by.clear()
        self.size = 0
        return waiters


class Saturation:
    def __init__(
        self, fleet: Fleet, config: PoolConfig, queue_timeout: float, first_token_timeout: float
    ) -> None:
        assert config.saturation_max_waiting is not None
        self.fleet = fleet
        self.config = config
        self.max_waiting = config.saturation_max_waiting
        self.max_kv = config.saturation_max_kv_cache_usage
        self.wait_bound = min(queue_timeout, _FIRST_TOKEN_SHARE * first_token_timeout)
        self.readings: dict[str, Reading] = {}
        self._line = FairLine()
        self._task: asyncio.Task[None] | None = None
        self._recent: dict[str, deque[float]] = {}  # per member, when requests were sent lately
        self._grace = config.saturation_scrape_interval
        self.counts = {"waited": 0, "wakeups": 0, "timeouts": 0, "unknown": 0, "scrapes_failed": 0}

    # --- lifecycle -------------------------------------------------------------------------

    def gone(self, m: Member) -> None:
        """A member left the pool: its reading and its recent sends go with it."""
        self.readings.pop(m.name, None)
        self._recent.pop(m.name, None)

    async def start(self) -> None:
        await self._round()  # the first readings before the first request
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiter in self._line.drain():
            if not waiter.done():
                waiter.set_result(None)

    async def _loop(self) -> None:
        interval = self.config.saturation_scrape_interval
        while True:
            # Jittered, so that no replica reads (and takes the room it shows) always first.
            await asyncio.sleep(interval * random.uniform(0.75, 1.25))
            try:
                await self._round()
            except Exception:  # the loop must outlive any one bad round
                log.exception("saturation: a round of readings failed")

    async def _round(self) -> None:
        await asyncio.gather(*(self._read(m) for m in self.fleet.members if m.up))
        if self._line:
            self._wake(self._room())

    def sent(self, m: Member) -> None:
        """A request was sent to ``m`` (its slot taken)."""
        recent = self._recent.get(m.name)
        if recent is None:
            recent = self._recent[m.name] = deque()
        now = time.monotonic()
        recent.append(now)
        while recent and recent[0] < now - self._grace:
            recent.popleft()

    def base(self, m: Member, at: float) -> int:
        """The requests in flight to ``m`` that a reading taken at ``at`` shows. Those sent just
        before it may not have reached the engine when it answers: they count as sent after the
        reading (at worst counted twice, for one reading)."""
        recent = self._recent.get(m.name, ())
        return m.in_flight - sum(1 for t in recent if t >= at - self._grace)

    async def _read(self, m: Member) -> None:
        at = time.monotonic()
        base = self.base(m, at)
        body = await scrape(m.backend, "/metrics", self.config.health_timeout, "sat")
        if body is None:
            self.counts["scrapes_failed"] += 1
            return  # the old reading ages into unknown
        g = parse_engine_metrics(body)
        self.readings[m.name] = Reading(g.waiting, g.running, g.kv_usage, at, base)

    # --- the rule ----------------------------------------------------------------------------

    def admits(self, m: Member) -> bool:
        r = self.readings.get(m.name)
        if r is None or time.monotonic() - r.at > self.config.saturation_stale_after:
            self.counts["unknown"] += 1
            return m.in_flight < self.config.saturation_unknown_limit
        if r.waiting + max(0, m.in_flight - r.base) >= self.max_waiting:
            return False
        return self.max_kv is None or r.kv_usage is None or r.kv_usage < self.max_kv

    def _room(self) -> int:
        """How many more requests the members' readings leave room for (known members only)."""
        room = 0
        now = time.monotonic()
        stale = self.config.saturation_stale_after
        for m in self.fleet.members:
            r = self.readings.get(m.name)
            if not m.up or r is None or now - r.at > stale:
                if m.up and m.in_flight < self.config.saturation_unknown_limit:
                    room += self.config.saturation_unknown_limit - m.in_flight
                continue
            if self.max_kv is not None and r.kv_usage is not None and r.kv_usage >= self.max_kv:
                continue
            room += max(0, int(self.max_waiting - r.waiting - max(0, m.in_flight - r.base)))
        return room

    def admitting(self, members: Sequence[Member], turn: bool) -> list[Member]:
        """Those of ``members`` whose engines have room; none while others wait before it
        (``turn``: the caller was just woken from the line, and goes first)."""
        fits = [m for m in members if self.admits(m)]
        if self._line and not turn:
            if fits:
                self._wake(len(fits))  # room the line has not been told of: its head goes first
            return []
        return fits

    # --- the wait ----------------------------------------------------------------------------

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.wait_bound

    async def wait(self, deadline: float, again: bool, tenant: str = "") -> None:
        """Wait for a wakeup; ``QueueTimeout`` at ``deadline``. ``again``: woken before and
        still without room, it goes first among its tenant's. A waiter woken that leaves anyway
        (cancelled, timed out) passes its wakeup on."""
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            self.counts["timeouts"] += 1
            raise QueueTimeout(retry_after=max(1.0, self.config.saturation_scrape_interval))
        waiter = loop.create_future()
        self._line.add(tenant, waiter, front=again)
        if not again:
            self.counts["waited"] += 1
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake(1)  # woken, but leaving: the next in line takes the wakeup
            else:
                self._line.remove(tenant, waiter)
            if isinstance(exc, TimeoutError):
                self.counts["timeouts"] += 1
                raise QueueTimeout(
                    retry_after=max(1.0, self.config.saturation_scrape_interval)
                ) from None
            raise

    def released(self, m: Member) -> None:
        """A request on ``m`` ended: its place may admit the next in line."""
        if self._line and self.admits(m):
            self._wake(1)

    def _wake(self, n: int) -> None:
        line = self._line
        while n > 0 and line:
            waiter = line.pop()
            if not waiter.done():
                waiter.set_result(None)
                self.counts["wakeups"] += 1
                n -= 1

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            **self.counts,
            "queued": len(self._line),
            "readings": {
                name: {
                    "waiting": r.waiting,
                    "running": r.running,
                    "kv_usage": r.kv_usage,
                    "age_s": round(now - r.at, 3),
                }
                for name, r in self.readings.items()
            },
        }
