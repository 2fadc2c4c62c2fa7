"""Admission from the engines' state, with gateway replicas as separate processes.

Two simulators with a capacity (``max_num_seqs``) stand for two engines; 2 or 4 gateway
processes in front of both. With the saturation rule each engine's waiting queue, read from its
own ``/metrics``, stays within the threshold times the replicas (each replica may send up to the
threshold between two readings), and every request succeeds; with the seed's default every
request is admitted at once and the engines' queues take the whole burst.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import GatewayProcess, chat_body, spawn_gateway, wait_for
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

CAPACITY = 4  # each engine's max_num_seqs
THRESHOLD = 2  # VLLM_POOL_SATURATION_MAX_WAITING
REQUESTS = 64


def waiting_of(metrics: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith("vllm:num_requests_waiting{")
    )


@contextlib.asynccontextmanager
async def engines() -> AsyncIterator[list[Simulator]]:
    config = SimulatorConfig(ttft=0.02, itl=0.01, tokens=20, max_num_seqs=CAPACITY)
    async with run_simulator(config) as one, run_simulator(config) as two:
        yield [one, two]


@contextlib.asynccontextmanager
async def replicas(n: int, env: dict[str, str]) -> AsyncIterator[list[GatewayProcess]]:
    with contextlib.ExitStack() as stack:
        # Started from a thread: the simulators on this loop must answer their health checks.
        gateways = [
            await asyncio.to_thread(stack.enter_context, spawn_gateway(env, name=f"sat-{i}"))
            for i in range(n)
        ]
        yield gateways


async def burst(
    client: httpx.AsyncClient, gateways: list[GatewayProcess], sims: list[Simulator]
) -> tuple[list[int], float]:
    """REQUESTS streams spread over the replicas at once; (their statuses, the largest waiting
    queue one engine's /metrics showed meanwhile)."""
    peak = 0.0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            for sim in sims:
                resp = await client.get(sim.url + "/metrics")
                peak = max(peak, waiting_of(resp.text))
            await asyncio.sleep(0.01)

    async def one(i: int) -> int:
        gw = gateways[i % len(gateways)]
        resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body(stream=True))
        assert resp.status_code != 200 or resp.text.rstrip().endswith("data: [DONE]")
        return resp.status_code

    sampler = asyncio.create_task(sample())
    try:
        statuses = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    finally:
        done.set()
        await sampler
    return list(statuses), peak


@pytest.mark.parametrize("n", [2, 4])
async def test_replicas_keep_each_engines_queue_within_the_threshold(n: int) -> None:
    async with engines() as sims, httpx.AsyncClient(timeout=60) as client:
        env = {
            "VLLM_BACKEND_URL": ",".join(s.url for s in sims),
            "VLLM_POOL_SATURATION_MAX_WAITING": str(THRESHOLD),
            "VLLM_POOL_SATURATION_SCRAPE_SECONDS": "0.05",
        }
        async with replicas(n, env) as gateways:
            statuses, peak = await burst(client, gateways, sims)
        assert statuses == [200] * REQUESTS
        assert sum(s.stats()["completed"] for s in sims) == REQUESTS
        assert sum(s.stats()["waiting"] for s in sims) == 0
    assert peak <= THRESHOLD * n, peak


async def test_the_seeds_default_admits_the_whole_burst_into_the_engines() -> None:
    async with engines() as sims, httpx.AsyncClient(timeout=60) as client:
        env = {"VLLM_BACKEND_URL": ",".join(s.url for s in sims)}
        async with replicas(2, env) as gateways:
            statuses, peak = await burst(client, gateways, sims)
        assert statuses == [200] * REQUESTS
    # 64 requests, 2 x 4 running: the rest wait in the engines, far beyond the rule's bound.
    assert peak > THRESHOLD * 4, peak


async def test_the_simulator_runs_max_num_seqs_and_queues_the_rest() -> None:
    config = SimulatorConfig(ttft=0.05, itl=0.01, tokens=5, max_num_seqs=2)
    async with run_simulator(config) as sim, httpx.AsyncClient(timeout=30) as client:
        calls = [
            asyncio.create_task(
                client.post(sim.url + "/v1/chat/completions", json=chat_body(stream=True))
            )
            for _ in range(5)
        ]
        await wait_for(lambda: sim.stats()["running"] == 5, 10)
        text = (await client.get(sim.url + "/metrics")).text
        assert waiting_of(text) == 3
        assert 'vllm:num_requests_running{model_name="sim-model",engine="0"} 2.0' in text
        assert 'vllm:kv_cache_usage_perc{model_name="sim-model",engine="0"} 1.0' in text
        assert all(r.status_code == 200 for r in await asyncio.gather(*calls))
        assert sim.stats()["completed"] == 5 and sim.stats()["waiting"] == 0
        # Requests whose clients leave, queued or running, are aborted; the queue empties.
        sim.configure(ttft=1.0)
        calls = [
            asyncio.create_task(
                client.post(sim.url + "/v1/chat/completions", json=chat_body(stream=True))
            )
            for _ in range(3)
        ]
        await wait_for(lambda: sim.stats()["waiting"] == 1, 10)
        for call in calls:
            call.cancel()
        await wait_for(lambda: sim.stats()["aborted"] == 3, 10)
        assert sim.stats()["waiting"] == 0 and sim.stats()["running"] == 0
        await asyncio.gather(*calls, return_exceptions=True)
