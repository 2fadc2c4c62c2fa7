"""Readiness probes need no key, so they must not be a way to make the backend work: a flood of
them shares one backend health check (with the backend_healthy gauge's sampler when its call is in
flight), and none waits past the check's bound."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.conftest import run_gateway, wait_for
from tests.integration.rogue import RogueBackend
from vllm_gateway.settings import Settings

pytestmark = pytest.mark.timeout(60)

MODELS = b'{"object":"list","data":[{"id":"sim-model","object":"model"}]}'


class Health:
    """A backend whose ``/health`` answers after ``delay`` seconds (None: never), counting calls
    and how many were in flight at once."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.backend = RogueBackend(self._answer)

    async def _answer(self, head: bytes, reader: Any, writer: Any) -> None:
        if not head.startswith(b"GET /health"):
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(MODELS), MODELS)
            )
            await writer.drain()
            return
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay is None:
                await reader.read()  # never answers; returns when the gateway gives up
                return
            await asyncio.sleep(self.delay)  # a slow health answer, for the probes to overlap
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
        finally:
            self.in_flight -= 1


async def _probes(url: str, n: int) -> list[int]:
    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        resps = await asyncio.gather(*(client.get(url + "/health/ready") for _ in range(n)))
    return [r.status_code for r in resps]


async def test_a_flood_of_probes_without_a_key_makes_one_backend_health_call() -> None:
    health = Health(delay=0.3)
    async with (
        health.backend.running(),
        run_gateway(
            Settings(backend_urls=(health.backend.url,), api_keys=frozenset({"k1:t"}))
        ) as gw,
    ):
        # The metrics' own health sampler checks once at start: let it finish first.
        await wait_for(lambda: health.calls >= 1 and health.in_flight == 0)
        before, checks = health.calls, gw.app.health.checks
        assert await _probes(gw.url, 150) == [200] * 150
        # Regression: 150 probes made 150 concurrent health calls, each on a new connection.
        assert health.calls - before == 1 and health.most_in_flight == 1
        assert gw.app.health.checks - checks == 1


async def test_probes_join_the_health_call_the_gauge_s_sampler_has_in_flight() -> None:
    health = Health(delay=1.5)
    async with (
        health.backend.running(),
        run_gateway(Settings(backend_urls=(health.backend.url,))) as gw,
    ):
        # The backend_healthy gauge's sampler asks at start; while its call is in flight...
        await wait_for(lambda: health.in_flight == 1)
        assert await _probes(gw.url, 50) == [200] * 50
        # ...the probes wait for its answer instead of making a call of their own.
        assert health.calls == 1 and gw.app.health.checks == 1


async def test_probes_wait_no_longer_than_the_checks_bound_for_a_backend_that_never_answers() -> (
    None
):
    health = Health(delay=None)
    async with (
        health.backend.running(),
        run_gateway(Settings(backend_urls=(health.backend.url,), connect_timeout=0.5)) as gw,
    ):
        await wait_for(lambda: health.calls >= 1 and health.in_flight == 0)
        before = health.calls
        started = time.monotonic()
        assert await _probes(gw.url, 60) == [503] * 60
        assert time.monotonic() - started < 0.5 + 1.0  # the bound, and the probes' own time
        assert health.calls - before == 1
        # "Not ready" is kept for the interval too: more probes, no more calls.
        assert await _probes(gw.url, 20) == [503] * 20
        assert health.calls - before == 1
