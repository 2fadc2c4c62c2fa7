"""Tenants share the queue fairly: one key's flood does not starve another key."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import chat_body, run_gateway, wait_for
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator


async def test_a_flooding_tenant_does_not_starve_another(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(ttft=0.0, itl=0.01)
    settings = Settings(
        backend_urls=(simulator.url,),
        max_concurrent_requests=2,
        max_queued_requests=100,
        queue_wait_timeout=30,
        api_keys=frozenset({"key-a:team-a", "key-b:team-b"}),
    )
    finished: list[str] = []

    async def one(key: str, tag: str) -> None:
        resp = await client.post(
            gw.url + "/v1/chat/completions",
            json=chat_body(max_tokens=10),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status_code == 200
        finished.append(tag)

    async with run_gateway(settings) as gw:
        flood = [asyncio.create_task(one("key-a", "a")) for _ in range(20)]
        await wait_for(lambda: gw.gateway.admission.queued == 18)
        polite = [asyncio.create_task(one("key-b", "b")) for _ in range(3)]
        await asyncio.gather(*flood, *polite)
        assert gw.gateway.admission.in_flight == 0
    # Served in turns: b's three requests finish among the first requests after they queued,
    # not after a's whole backlog of 18.
    last_b = max(i for i, tag in enumerate(finished) if tag == "b")
    assert last_b < 12, finished
