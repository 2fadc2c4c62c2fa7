"""A pool whose members are the real vLLM engine and a simulator serving the same model name."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import run_gateway
from tests.vllm.conftest import VllmServer
from vllm_gateway.settings import PoolSettings, Settings
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator


async def test_pool_spreads_over_real_vllm_and_a_simulator_and_survives_losing_one(
    vllm_server: VllmServer,
) -> None:
    body = {
        "model": vllm_server.model,
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi."}],
    }
    config = SimulatorConfig(models=(vllm_server.model,), ttft=0.2, itl=0.05)
    async with run_simulator(config) as sim:
        settings = Settings(
            backend_urls=(vllm_server.url, sim.url), pool=PoolSettings(health_interval=0.5)
        )
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=120) as client:
            answers = await asyncio.gather(
                *[client.post(gw.url + "/v1/chat/completions", json=body) for _ in range(8)]
            )
            assert all(r.status_code == 200 for r in answers)
            served_by_sim = sim.stats()["total"]
            assert 0 < served_by_sim < 8  # both members took a share
            stats = gw.gateway.backend.stats()
            assert stats is not None
            members = {m["url"]: m for m in stats}
            assert members[vllm_server.url]["requests"] > 0
            # The simulator goes away: traffic moves to vLLM with no request lost.
            await sim.close()
            after = await asyncio.gather(
                *[client.post(gw.url + "/v1/chat/completions", json=body) for _ in range(4)]
            )
            assert [r.status_code for r in after] == [200] * 4
