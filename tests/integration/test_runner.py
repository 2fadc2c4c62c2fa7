"""The runner (``runtime/server.py``) in this process: once it returns, nothing the gateway started
is still running, a drain in progress included."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import chat_body, run_gateway, wait_for
from tests.unit.test_lifecycle import gateway_tasks
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator

pytestmark = pytest.mark.timeout(60)


async def test_nothing_the_gateway_started_outlives_its_runner(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = Settings(backend_urls=(simulator.url,), shutdown_timeout=30)
    async with run_gateway(settings) as gw:
        slow = chat_body(stream=True, max_tokens=400, vllm_sim={"itl": 0.05})
        stream = asyncio.create_task(client.post(gw.url + "/v1/chat/completions", json=slow))
        await wait_for(lambda: gw.gateway.admission.in_flight == 1)
        gw.runner.on_signal()  # a drain begins: it would wait up to 30 s for the stream
        await wait_for(lambda: gw.gateway.draining)
        assert (await client.get(gw.url + "/health/ready")).status_code == 503
        # Leaving the block stops the runner without waiting for the drain.
    assert gateway_tasks() == set()
    await asyncio.gather(stream, return_exceptions=True)
