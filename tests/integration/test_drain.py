"""R12: SIGTERM or SIGINT during traffic drains the gateway (a child process) within its deadline.

Readiness turns 503 at once; new and queued requests get 503 ``shutting_down`` at once; a stream
that can finish before the drain deadline Td finishes with ``[DONE]``; one that cannot ends with an
error event of type ``shutting_down`` and no ``[DONE]``; the process exits 0 by Td + 2 s.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import chat_body, spawn_gateway, sse_events, wait_for
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator
from vllm_gateway_tools.soak import judge

pytestmark = pytest.mark.timeout(60)

TD = 3.0  # the drain deadline


async def _metric(client: httpx.AsyncClient, url: str, name: str) -> float | None:
    for line in (await client.get(url + "/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def _request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, str], bytes, float]:
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        data = b"".join([c async for c in resp.aiter_raw()])
        return resp.status_code, dict(resp.headers), data, time.monotonic()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_r12_signal_during_traffic_drains_within_the_deadline(
    client: httpx.AsyncClient, sig: int
) -> None:
    async with run_simulator(SimulatorConfig(ttft=0.01, itl=0.05)) as sim:
        env = {
            "VLLM_BACKEND_URL": sim.url,
            "VLLM_MAX_CONCURRENT_REQUESTS": "2",
            "VLLM_MAX_QUEUED_REQUESTS": "4",
            "VLLM_QUEUE_WAIT_TIMEOUT_SECONDS": "30",
            "VLLM_SHUTDOWN_TIMEOUT_SECONDS": str(TD),
        }
        with spawn_gateway(env, name="drain") as gw:
            url = gw.url
            short = asyncio.create_task(
                _request(client, url, chat_body(stream=True, max_tokens=24))
            )
            long = asyncio.create_task(
                _request(client, url, chat_body(stream=True, max_tokens=1000))
            )
            await wait_for(lambda: sim.stats()["running"] == 2)
            queued = asyncio.create_task(_request(client, url, chat_body(stream=True)))
            for _ in range(100):
                if await _metric(client, url, "vllm_gateway_queue_depth") == 1:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the third request never queued")

            t0 = time.monotonic()
            gw.terminate(sig)
            status, headers, data, at = await queued
            assert status == 503 and orjson.loads(data)["error"]["type"] == "shutting_down"
            assert "retry-after" in headers
            assert at - t0 < 0.5
            ready = await client.get(url + "/health/ready")
            assert ready.status_code == 503
            fresh = await client.post(url + "/v1/chat/completions", json=chat_body())
            assert fresh.status_code == 503 and fresh.json()["error"]["type"] == "shutting_down"
            assert time.monotonic() - t0 < 1.0  # all of the above answered at once

            status, headers, data, _ = await short
            assert judge(status, headers, data) == ("stream_done", None)
            status, headers, data, at = await long
            assert judge(status, headers, data) == ("stream_error", None)
            events = sse_events(data.decode())
            assert "[DONE]" not in events
            assert orjson.loads(events[-1])["error"]["type"] == "shutting_down"
            assert TD - 0.3 <= at - t0 < TD + 1.0

            code = await asyncio.to_thread(gw.process.wait, TD + 2.0 - (time.monotonic() - t0))
            assert code == 0, gw.log()
            assert time.monotonic() - t0 <= TD + 2.0
        await wait_for(lambda: sim.stats()["running"] == 0, timeout=2)


async def test_r12_idle_gateway_exits_at_once_on_sigterm() -> None:
    async with run_simulator(SimulatorConfig()) as sim:
        with spawn_gateway(
            {"VLLM_BACKEND_URL": sim.url, "VLLM_SHUTDOWN_TIMEOUT_SECONDS": "30"}, name="drain-idle"
        ) as gw:
            t0 = time.monotonic()
            gw.terminate()
            assert await asyncio.to_thread(gw.process.wait, 5) == 0
            assert time.monotonic() - t0 < 3.0  # nothing in flight: no wait for the 30 s deadline
