"""The backend's health, one check for everyone who asks: the readiness probes
(``/health/ready``, ``/health``, ``/ping``) and the ``vllm_gateway_backend_healthy`` gauge.

Readiness is open to anyone (probes carry no key), so it must not be a way to make the backend
work: ``BackendHealth`` makes one health call at a time (single flight), which every caller joins,
and no caller waits on it longer than the call's own bound. ``check`` (a probe) keeps the answer a
probe's call got ``ttl`` seconds. ``sample`` (the gauge's sampler) joins the call in flight or
makes one every ``SAMPLE_INTERVAL`` seconds, so that the gauge stays current when no probe comes;
its answers feed the gauge (``healthy``, the last answer of any call) but do not stand in for a
probe's, so a probe made just after a sample still asks the backend. The composition root runs the
sampler as a task for a single backend (a pool checks its members itself) and ends it, and the
call in flight, when the process stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

__all__ = ["READY_TTL", "SAMPLE_INTERVAL", "BackendHealth"]

# How long the answer of a probe's health call serves every probe.
READY_TTL = 1.0
# How often the gauge's sampler asks.
SAMPLE_INTERVAL = 5.0


class BackendHealth:
    """The backend's health check, single flight: however many probes come, the backend gets at
    most one health call per ``ttl`` for them, plus the call's own time, plus the sampler's one
    call per interval. A caller waits for the call in flight at most ``timeout`` (the call's own
    bound) and reads no answer as not healthy; a caller that leaves does not cancel the call the
    others wait for."""

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
        self.healthy: bool | None = None  # the last answer of any call (the gauge's); None before
        self._answer = False  # the last answer of a call a probe made, and when it came
        self._answered_at: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self.checks = 0  # health calls made (tests, and a gauge of the probes' cost)

    async def check(self) -> bool:
        """A probe's answer: the last one a probe's call got while it is fresh, else the answer
        of the call in flight (whoever made it) or of a new one."""
        at = self._answered_at
        if at is not None and self._clock() - at < self.ttl:
            return self._answer
        return await self._join(for_probes=True)

    async def sample(self, interval: float = SAMPLE_INTERVAL) -> None:
        """Keep ``healthy`` current for the gauge: every ``interval`` seconds, join the call in
        flight or make one. Runs until cancelled."""
        while True:
            await self._join(for_probes=False)
            await asyncio.sleep(interval)

    async def _join(self, for_probes: bool) -> bool:
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.get_running_loop().create_task(
                self._run(for_probes), name="backend-health-check"
            )
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            return False

    async def _run(self, for_probes: bool) -> bool:
        self.checks += 1
        try:
            async with asyncio.timeout(self.timeout):  # the backend's check bounds itself too
                answer = await self._call(self.timeout)
        except Exception:  # a check that fails or times out says "not healthy"
            answer = False
        finally:
            self._inflight = None
        self.healthy = answer
        if for_probes:
            self._answer = answer
            self._answered_at = self._clock()
        return answer

    async def aclose(self) -> None:
        """End the call in flight, if any."""
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
