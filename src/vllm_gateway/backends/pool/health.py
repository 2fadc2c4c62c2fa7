"""The pool's health: active checks, model-list refresh and the watchdog, in one background task.

``PoolHealth.start()`` runs a first round of checks (a member down at start is marked down without
an ejection or a backoff), then starts the loop; ``aclose()`` cancels the loop and any canary in
flight and waits for them. Each tick the watchdog looks for a member that is up, has requests in
flight, and has produced no byte for ``watchdog_stall`` seconds; such a member gets one canary at a
time. Every ``health_interval`` each member's ``/health`` is checked; every
``models_refresh_interval`` the models of members that did not declare theirs are fetched again.

A member out of the pool comes back when a check passes after its ``readmit_at``; one ejected by
the watchdog must also pass a canary, since a wedged engine often still answers ``/health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import orjson

from vllm_gateway.backends.base import UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.errors import UpstreamError

__all__ = ["PoolHealth"]

# The pool's comings and goings share one logger name (fleet.py).
log = logging.getLogger("vllm_gateway.backends.pool.backend")


class PoolHealth:
    def __init__(self, fleet: Fleet, config: PoolConfig) -> None:
        self.fleet = fleet
        self.config = config
        self._loop_task: asyncio.Task[None] | None = None
        self._canaries: dict[Member, asyncio.Task[None]] = {}

    async def start(self) -> None:
        await self._health_round(refresh_models=True, initial=True)
        self._loop_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def aclose(self) -> None:
        tasks = [t for t in (self._loop_task, *self._canaries.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._loop_task = None

    async def _health_loop(self) -> None:
        cfg = self.config
        tick = min(cfg.health_interval, max(cfg.watchdog_stall / 2, 0.05))
        loop = asyncio.get_running_loop()
        next_health = loop.time() + cfg.health_interval
        next_models = loop.time() + cfg.models_refresh_interval
        while True:
            await asyncio.sleep(tick)
            try:
                self._watchdog()
                await self.fleet.tend()
                joining = [m for m in self.fleet.members if m.state == "joining"]
                if joining:  # a new member waits one tick for its first check, not a round
                    await asyncio.gather(*(self._check(m, False, False) for m in joining))
                now = loop.time()
                if now >= next_health:
                    refresh = now >= next_models
                    await self._health_round(refresh_models=refresh)
                    next_health = loop.time() + cfg.health_interval
                    if refresh:
                        next_models = loop.time() + cfg.models_refresh_interval
            except Exception:  # the loop must outlive any one bad round
                log.exception("pool health round failed")

    async def _health_round(self, *, refresh_models: bool, initial: bool = False) -> None:
        await asyncio.gather(*(self._check(m, refresh_models, initial) for m in self.fleet.members))

    async def _check(self, m: Member, refresh_models: bool, initial: bool) -> None:
        cfg = self.config
        if m.state == "draining":
            return  # it takes no new requests: nothing to decide
        ok = await m.backend.check_health(cfg.health_timeout)
        if m.state == "draining":
            return  # drained while the check ran
        if initial and not ok:
            m.join()  # never up yet: no ejection, no backoff; in once a check passes
            m.down_reason = "health"
            log.warning("backend %s is not healthy at start", m.name)
        elif m.state == "joining":
            if not ok:
                return
            await self._refresh_models(m)
            if m.models is None or m.state != "joining":
                return  # its model list is not known yet: no traffic
            log.warning("backend %s is ready: in the pool", m.name)
            self.fleet.admitted(m)
        elif m.up and not ok:
            m.health_failures += 1
            m.errors["health"] += 1
            if m.health_failures >= cfg.health_fail_threshold:
                self.fleet.eject(m, "health")
        elif m.up:
            m.health_failures = 0
        elif ok and time.monotonic() >= m.readmit_at:
            if m.down_reason == "watchdog" and not await self.canary(m):
                m.errors["canary"] += 1
                m.ejection_streak += 1
                backoff = cfg.readmit_backoff * 2 ** (m.ejection_streak - 1)
                m.readmit_at = time.monotonic() + min(backoff, cfg.readmit_backoff_max)
                return
            if refresh_models or m.models is None:
                await self._refresh_models(m)
            if m.state != "ejected":
                return  # drained or removed while it was checked
            log.warning("backend %s is back in the pool (was out: %s)", m.name, m.down_reason)
            self.fleet.admitted(m)
            return
        if ok and refresh_models:
            await self._refresh_models(m)

    async def _refresh_models(self, m: Member) -> None:
        if m.declared_models is None:
            ids = await m.backend.model_ids(self.config.health_timeout)
            if ids is not None:
                m.models = frozenset(ids)

    def _watchdog(self) -> None:
        now = time.monotonic()
        for m in self.fleet.members:
            if (
                m.up
                and m.in_flight > 0
                and now - m.last_progress > self.config.watchdog_stall
                and m not in self._canaries
            ):
                task = asyncio.get_running_loop().create_task(self._watch(m))
                self._canaries[m] = task
                task.add_done_callback(self._canary_done)

    def _canary_done(self, task: asyncio.Task[None]) -> None:
        for m, t in list(self._canaries.items()):
            if t is task:
                del self._canaries[m]

    async def _watch(self, m: Member) -> None:
        before = m.last_progress
        stalled = time.monotonic() - before
        if await self.canary(m) or m.last_progress != before or m.in_flight == 0:
            # Alive, only slow (one long non-streamed answer, a canary queued behind a full
            # batch while the batch still streams): restart the clock.
            m.progress()
            return
        m.errors["canary"] += 1
        log.warning(
            "backend %s: no byte for %.1fs with %d in flight and the canary failed",
            m.name,
            stalled,
            m.in_flight,
        )
        self.fleet.eject(m, "watchdog")

    async def canary(self, m: Member) -> bool:
        """A one-token completion within ``canary_timeout``: True when the engine answers 200."""
        model = min(m.models) if m.models else None
        body: dict[str, Any] = {"prompt": "ping", "max_tokens": 1, "stream": False}
        if model is not None:
            body["model"] = model
        req = UpstreamRequest(
            "POST",
            "/v1/completions",
            orjson.dumps(body),
            body,
            False,
            "canary-" + os.urandom(6).hex(),
            model,
        )
        resp: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(self.config.canary_timeout):
                resp = await m.backend.send(req)
                await resp.read(1 << 20)
                return resp.status == 200
        except (TimeoutError, UpstreamError):
            return False
        finally:
            if resp is not None:
                await resp.aclose()
