"""A pool of vLLM servers behind one ``Backend``: routing, health, watchdog, ejection and retries.

``PoolBackend`` sends each request to one member (an ``HTTPBackend``) chosen by ``routing.choose``
among the members that serve the request's model, are up, and are below their own limit on
outstanding requests. When every such member is full the request waits up to ``admission_wait`` for
a slot, then gets ``NoHealthyBackend`` (503).

Health, in one background task started in ``start()`` and cancelled in ``aclose()``:

- active checks: every member's ``/health`` each ``health_interval``; ``health_fail_threshold``
  failures in a row take it out; a passing check brings it back once its backoff has passed;
- the watchdog: a member with requests in flight that has produced no byte for ``watchdog_stall``
  seconds gets a canary (a one-token completion under ``canary_timeout``); if the canary fails the
  member is ejected, and it needs a passing canary as well as a passing check to come back;
- passive ejection: ``eject_after_failures`` consecutive failures (connect errors, 5xx, a drop
  mid-stream); readmission backs off exponentially while the member keeps being ejected.
The gateway's own refusals and timeouts never reach a member's counters: a request cancelled from
above (first-token timeout, client gone, drain) is neither a success nor a failure of the member.

Retries happen only while nothing has reached the relay: in ``send()`` (connect error, 5xx) and
inside the response's first chunk read (a member that drops the connection, or is ejected, before
its first byte), and inside ``read()`` (the whole non-streamed body, which the relay forwards only
once it has all of it). Never after a chunk was handed over. At most ``max_retries`` per request, and only
while the ``RetryBudget`` allows. An attempt still waiting for its first byte on a member that gets
ejected is cancelled and moves to another member.

Every ``PoolResponse`` releases its member's slot exactly once, in ``aclose()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from vllm_gateway.backends.base import (
    Backend,
    BackendStats,
    Charge,
    UpstreamRequest,
    UpstreamResponse,
)
from vllm_gateway.backends.http.backend import HTTPBackend
from vllm_gateway.backends.pool.broadcast import broadcast
from vllm_gateway.backends.pool.cache_aware import CacheAware
from vllm_gateway.backends.pool.config import (
    BackendSpec,
    PoolConfig,
    load_backends_file,
    specs_from_urls,
)
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.health import PoolHealth
from vllm_gateway.backends.pool.holders import Holders
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.model_list import model_ids, model_listing
from vllm_gateway.backends.pool.retry import RetryBudget
from vllm_gateway.backends.pool.routing import affinity_key, choose
from vllm_gateway.errors import (
    BackendUnavailable,
    BadBackendResponse,
    ModelNotFound,
    NoHealthyBackend,
    UpstreamError,
)
from vllm_gateway.settings import Settings

__all__ = ["PoolBackend", "PoolResponse", "load_backends_file"]

log = logging.getLogger("vllm_gateway.backends.pool.backend")
T = TypeVar("T")


class _Ejected(Exception):
    """The member was ejected while this attempt waited for its first byte."""


class PoolBackend(Backend):
    name = "pool"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        specs: list[BackendSpec] | None = None,
        config: PoolConfig | None = None,
        **overrides: Any,
    ) -> None:
        settings = settings if settings is not None else Settings()
        if specs is None:
            path = settings.backends_file
            specs = load_backends_file(path) if path else specs_from_urls(settings.backend_urls)
        if not specs:
            raise ValueError("a pool needs at least one backend")
        self.config = (
            config if config is not None else PoolConfig.from_settings(settings, **overrides)
        )
        cfg = self.config
        self.fleet = Fleet(
            [
                Member(s, cfg, HTTPBackend.from_settings(settings, s.url, s.name or s.url))
                for s in specs
            ],
            cfg,
        )
        self.budget = RetryBudget(
            cfg.retry_budget_ratio, cfg.retry_budget_min, cfg.retry_budget_window
        )
        self.retries = 0
        self.failovers = 0
        self.affinity_yields = 0
        self._waiters: list[asyncio.Future[None]] = []
        self.health = PoolHealth(self.fleet, cfg)
        self.cache_aware = CacheAware(self.fleet, cfg) if cfg.routing == "cache_aware" else None
        if self.cache_aware is not None:
            self.fleet.on_leave.append(self.cache_aware.forget)
        self._next = 0  # round_robin's next member
        self.holders = Holders(self.fleet, cfg)

    @classmethod
    def from_file(cls, path: str, settings: Any = None, **kwargs: Any) -> PoolBackend:
        """A pool whose members come from a backends file (see ``pool_config``)."""
        return cls(settings, specs=load_backends_file(path), **kwargs)

    @property
    def members(self) -> list[Member]:
        return self.fleet.members

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        for m in self.fleet.members:
            await m.backend.start()
        await self.health.start()
        if self.cache_aware is not None:
            await self.cache_aware.start()

    async def aclose(self) -> None:
        if self.cache_aware is not None:
            await self.cache_aware.aclose()
        await self.health.aclose()
        for m in self.fleet.members:
            await m.backend.aclose()

    # --- the Backend seam ------------------------------------------------------------------

    async def check_health(self, timeout: float) -> bool:
        return any(m.up for m in self.fleet.members)  # the background checks keep this current

    async def model_ids(self, timeout: float) -> list[str] | None:
        return await model_ids(self.fleet, timeout)

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        if request.method == "GET" and request.path == "/v1/models":
            return await model_listing(self.fleet, self.config, request)
        if request.broadcast:
            return await broadcast(self.fleet, request)
        self.budget.request()
        tried: list[Member] = [m for m in self.fleet.members if m.name in request.avoid]
        if request.locate is not None:
            holder = await self.holders.find(request.locate, request.request_id)
            if holder is not None:
                # Only the holder has what the request names: every other member is "tried".
                tried.extend(m for m in self.fleet.members if m is not holder)
        member, resp = await self._open(request, tried)
        return PoolResponse(self, request, member, resp, tried)

    # --- mid-stream failover -------------------------------------------------------------------

    def may_fail_over(self) -> bool:
        return self.config.failover_max > 0 and len(self.fleet.members) > 1

    def can_fail_over(self, model: str | None, avoid: frozenset[str], done: int) -> str | None:
        if done >= self.config.failover_max:
            return "limit"
        if not any(m.up and m.name not in avoid and m.serves(model) for m in self.fleet.members):
            return "no_member"
        if not self.budget.try_retry():
            log.warning("retry budget exhausted: a stream is not continued elsewhere")
            return "budget"
        self.failovers += 1
        return None

    def stats(self) -> list[BackendStats]:
        """Per member: name, url, in_flight, healthy, errors, ejections, requests (and more)."""
        stats = [m.stats() for m in self.fleet.members]
        if self.cache_aware is not None:
            for entry, m in zip(stats, self.fleet.members, strict=True):
                entry["cache"] = self.cache_aware.member_stats(m)
        return stats

    def pool_stats(self) -> dict[str, Any]:
        stats = {
            "retries": self.retries,
            "retry_budget_exhausted": self.budget.exhausted,
            "affinity_yields": self.affinity_yields,
            "routing": self.config.routing,
        }
        if self.cache_aware is not None:
            stats["cache_decisions"] = dict(self.cache_aware.decisions)
        return stats

    def note_prompt_ids(self, request_id: str, prompt_ids: list[int]) -> None:
        if self.cache_aware is not None:
            self.cache_aware.learned(request_id, prompt_ids)

    # --- choosing and opening --------------------------------------------------------------

    async def _acquire(self, request: UpstreamRequest, tried: list[Member]) -> Member:
        """A member for the request, its slot taken; waits briefly when all are full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.admission_wait
        key = affinity_key(
            self.config.routing, request.headers, request.json, self.config.affinity_prefix_chars
        )
        cached = self.cache_aware
        chain = cached.chain(request) if cached is not None else None
        while True:
            eligible = [m for m in self.fleet.members if m.serves(request.model)]
            if not eligible:
                raise ModelNotFound(f"The model '{request.model}' does not exist.", param="model")
            up = [m for m in eligible if m.up and m not in tried]
            if not up:
                raise NoHealthyBackend(retry_after=max(1.0, self.config.health_interval))
            room = [m for m in up if m.has_room()]
            if room:
                if cached is not None:
                    member = cached.choose(room, chain, request.request_id)
                elif self.config.routing == "round_robin":
                    member = self._round_robin(room)
                else:
                    member, yielded = choose(room, key, self.config)
                    self.affinity_yields += yielded
                member.begin()
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

    def _round_robin(self, room: list[Member]) -> Member:
        """The next member in the pool's order that has room."""
        count = len(self.fleet.members)
        for step in range(count):
            member = self.fleet.members[(self._next + step) % count]
            if member in room:
                self._next = (self._next + step + 1) % count
                return member
        return room[0]

    def _release(self, member: Member) -> None:
        member.end()
        waiters, self._waiters = self._waiters, []
        for w in waiters:  # each re-checks; the ones that find no room wait again
            if not w.done():
                w.set_result(None)

    async def _open(
        self, request: UpstreamRequest, tried: list[Member]
    ) -> tuple[Member, UpstreamResponse]:
        """Send to a member, moving to another on a connect error or 5xx while the budget allows."""
        while True:
            member = await self._acquire(request, tried)
            try:
                resp = await self._guarded(member, member.backend.send(request))
            except _Ejected:
                self._release(member)
                tried.append(member)
                if self._may_retry(request, tried):
                    continue
                raise BackendUnavailable("The backend was taken out of the pool.") from None
            except UpstreamError:
                self._release(member)
                self.fleet.fail(member, "connect")
                tried.append(member)
                if self._may_retry(request, tried):
                    continue
                raise
            except BaseException:
                self._release(member)
                raise
            member.progress()
            if resp.status >= 500:
                self.fleet.fail(member, "status_5xx")
                if self._may_retry(request, [*tried, member]):
                    tried.append(member)
                    await resp.aclose()
                    self._release(member)
                    continue
            return member, resp

    async def _guarded(self, member: Member, aw: Awaitable[T]) -> T:
        """Await ``aw`` as a task that an ejection of ``member`` may cancel (→ ``_Ejected``)."""
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        member.pending.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and current.cancelling() == 0:
                raise _Ejected() from None
            task.add_done_callback(_close_orphan)
            raise
        finally:
            member.pending.discard(task)

    def _may_retry(self, request: UpstreamRequest, tried: list[Member]) -> bool:
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
        self.retries += 1
        return True


def _close_orphan(task: asyncio.Future[Any]) -> None:
    """A send that finished after its caller was cancelled: close what it opened."""
    if task.cancelled() or task.exception() is not None:
        return
    resp = task.result()
    if isinstance(resp, UpstreamResponse):
        asyncio.get_running_loop().create_task(resp.aclose())


class PoolResponse(UpstreamResponse):
    """A member's response; before its first byte it may be swapped for another member's."""

    def __init__(
        self,
        pool: PoolBackend,
        request: UpstreamRequest,
        member: Member,
        resp: UpstreamResponse,
        tried: list[Member],
    ) -> None:
        self._pool = pool
        self._request = request
        self._member: Member | None = member
        self.served_by = member.name
        self._resp = resp
        self._iter: AsyncIterator[bytes] = resp.chunks()
        self._tried = tried
        self._delivered = False
        self._closed = False
        self._ejected = False
        self.status = resp.status
        self.content_type = resp.content_type
        member.streams.add(self)

    def chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> PoolResponse:
        return self

    async def __anext__(self) -> bytes:
        member = self._member
        assert member is not None, "PoolResponse read after a failed retry"
        if not self._delivered:
            return await self._first()
        try:
            data = await anext(self._iter)
        except StopAsyncIteration:
            if self._ejected:
                raise BackendUnavailable("The backend was taken out of the pool.") from None
            self._ended(member)
            raise
        except UpstreamError:
            if self._ejected:
                raise BackendUnavailable("The backend was taken out of the pool.") from None
            self._pool.fleet.fail(member, "dropped")
            raise
        member.progress()
        return data

    def abandon(self) -> None:
        """The member was taken out of the pool mid-stream: drop its connection now, so that the
        stream fails at once (and may go on on another member) rather than when it stalls."""
        if self._closed or not self._delivered:
            return
        self._ejected = True
        asyncio.get_running_loop().create_task(self._resp.aclose())

    async def _first(self) -> bytes:
        pool = self._pool
        while True:
            member = self._member
            assert member is not None
            try:
                data = await pool._guarded(member, anext(self._iter))
            except StopAsyncIteration:
                self._ended(member)
                raise
            except (UpstreamError, _Ejected) as exc:
                if isinstance(exc, UpstreamError):
                    pool.fleet.fail(member, "dropped")
                if not pool._may_retry(self._request, [*self._tried, member]):
                    if isinstance(exc, UpstreamError):
                        raise
                    raise BackendUnavailable("The backend was taken out of the pool.") from None
                self._tried.append(member)
                await self._swap()
                continue
            self._delivered = True
            member.progress()
            return data

    async def _swap(self) -> None:
        """Close this member's response and open the same request on another member."""
        old = self._member
        self._member = None
        await self._resp.aclose()
        if old is not None:
            old.streams.discard(self)
            self._pool._release(old)
        member, resp = await self._pool._open(self._request, self._tried)
        self._member, self._resp, self._iter = member, resp, resp.chunks()
        member.streams.add(self)
        self.served_by = member.name
        if (
            resp.status != self.status
            or resp.content_type.split(";")[0] != self.content_type.split(";")[0]
        ):
            raise BadBackendResponse("The retried backend answered differently.")

    def _ended(self, member: Member) -> None:
        if self.status < 500:
            member.success()

    async def read(self, limit: int, charge: Charge | None = None) -> bytes:
        """The whole body. Nothing of it reaches the relay before it is complete, so a member that
        drops mid-body is retried on another one, like a drop before the first byte. (What a
        dropped attempt was charged stays charged until the request ends: bounded by the
        retries.)"""
        while True:
            parts: list[bytes] = []
            size = 0
            try:
                async for data in self:
                    size += len(data)
                    if size > limit:
                        break
                    if charge is not None:
                        charge(len(data))
                    parts.append(data)
                else:
                    return b"".join(parts)
            except UpstreamError:
                member = self._member
                if member is None or not self._pool._may_retry(
                    self._request, [*self._tried, member]
                ):
                    raise
                self._tried.append(member)
                await self._swap()
                self._delivered = False
                continue
            raise BadBackendResponse("The backend's response is too large.")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        member, self._member = self._member, None
        try:
            await self._resp.aclose()
        finally:
            if member is not None:
                member.streams.discard(self)
                self._pool._release(member)
