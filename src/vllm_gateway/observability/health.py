"""The backend's health, one answer for everyone who asks: the readiness probes
(``/health/ready``, ``/health``, ``/ping``) and the ``vllm_gateway_backend_healthy`` gauge.

Readiness is open to anyone (probes carry no key), so it must not be a way to make the backend
work: ``BackendHealth.check`` makes one health call at a time (single flight), shared by every
caller, keeps its answer (yes or no) ``ttl`` seconds, and no caller waits on it longer than the
call's own bound. ``sample`` asks it every ``SAMPLE_INTERVAL`` seconds, so that the gauge stays
current when no probe comes; the composition root runs it as a task for a single backend (a pool
checks its members itself) and ends it, and the check in flight, when the process stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

__all__ = ["READY_TTL", "SAMPLE_INTERVAL", "BackendHealth"]

# How long one answer of the backend's health check serves every caller.
READY_TTL = 1.0
# How often the gauge's sampler asks, when no probe has asked more recently.
SAMPLE_INTERVAL = 5.0


class BackendHealth:
    """The backend's health check, single flight: however many callers come, the backend gets at
    most one health call per ``ttl`` plus the call's own time. A caller waits for the call in
    flight at most ``timeout`` (the call's own bound) and reads no answer as not healthy; a caller
    that leaves does not cancel the call the others wait for."""

    def __init__(
        self,
        check: Callable[[float], Awaitable[bool]],
        timeout: float,
        ttl: float = READY_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._call = check
        self.timeout = timeout
        self.ttl = ttl
        self._clock = clock
        self.healthy: bool | None = None  # the last answer; None before the first
        self._answered_at: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self.checks = 0  # health calls made (tests, and a gauge of the probes' cost)

    async def check(self) -> bool:
        """The backend's health: the last answer while it is fresh, else the call in flight's."""
        at = self._answered_at
        if at is not None and self._clock() - at < self.ttl:
            return bool(self.healthy)
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.get_running_loop().create_task(
                self._run(), name="backend-health-check"
            )
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            return False

    async def _run(self) -> bool:
        self.checks += 1
        try:
            async with asyncio.timeout(self.timeout):  # the backend's check bounds itself too
                answer = await self._call(self.timeout)
        except Exception:  # a check that fails or times out says "not healthy"
            answer = False
        finally:
            self._inflight = None
        self.healthy = answer
        self._answered_at = self._clock()
        return answer

    async def sample(self, interval: float = SAMPLE_INTERVAL) -> None:
        """Keep the answer current for the gauge: a check every ``interval`` seconds (one a probe
        made less than ``ttl`` ago serves). Runs until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        """End the call in flight, if any."""
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
