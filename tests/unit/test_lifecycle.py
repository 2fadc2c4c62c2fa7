"""The process's one lifecycle (``compose.App.running``): the parts start in order and stop in
reverse, a part that fails to start stops those started before it, and nothing the lifecycle
started outlives it: every background task and every check in flight is cancelled and awaited."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.unit.test_metrics import IdleBackend
from vllm_gateway.compose import create_app
from vllm_gateway.settings import Settings

pytestmark = pytest.mark.timeout(20)

SETTINGS = Settings(backend_urls=("http://127.0.0.1:9",))


class Recording(IdleBackend):
    """A backend that records its start and close, and whose health check and model list wait
    until cancelled (so both are in flight when the lifecycle ends)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.asked = asyncio.Event()
        self.waits = 0
        self.cancelled = 0

    async def start(self) -> None:
        self.events.append("start")

    async def aclose(self) -> None:
        self.events.append("aclose")

    async def _wait_forever(self) -> Any:
        self.waits += 1
        if self.waits == 2:
            self.asked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def check_health(self, timeout: float) -> bool:
        result: bool = await self._wait_forever()
        return result

    async def model_ids(self, timeout: float) -> list[str] | None:
        result: list[str] | None = await self._wait_forever()
        return result


def gateway_tasks() -> set[asyncio.Task[Any]]:
    """The running tasks whose coroutine is the gateway's own code."""
    found = set()
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and "/src/vllm_gateway/" in code.co_filename:
            found.add(task)
    return found


async def test_the_parts_stop_in_reverse_and_no_task_outlives_the_lifecycle() -> None:
    backend = Recording()
    app = create_app(SETTINGS, backend)
    async with app.running():
        # The health sampler's check and the model list's prefetch are both waiting on the backend.
        await asyncio.wait_for(backend.asked.wait(), 2)
        names = {task.get_name() for task in gateway_tasks()}
        assert {
            "status-ticker",
            "health-sampler",
            "backend-health-check",
            "models-refresh",
        } <= names
        assert backend.events == ["start"]
    assert backend.events == ["start", "aclose"]
    assert gateway_tasks() == set()  # cancelled and awaited, not left to the loop's end
    assert backend.cancelled == 2  # the check and the fetch in flight were ended


async def test_a_part_that_fails_to_start_stops_the_parts_started_before_it() -> None:
    backend = Recording()
    # The rate limiter starts after the backend; a Redis URL it cannot use makes its start fail.
    settings = SETTINGS.replace(rate_limit_rpm=10, redis_url="nope://127.0.0.1")
    app = create_app(settings, backend)
    with pytest.raises(ValueError, match="Redis URL"):
        async with app.running():
            pytest.fail("the lifecycle started with a part that failed")
    assert backend.events == ["start", "aclose"]
    assert gateway_tasks() == set()
