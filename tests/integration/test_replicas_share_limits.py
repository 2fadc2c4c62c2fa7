"""Two gateway replicas share one per-key rate limit through one Redis."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import chat_body, run_gateway
from tests.integration.test_ratelimit import pytestmark as needs_redis
from tests.integration.test_ratelimit import redis_server
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator

pytestmark = needs_redis


async def test_two_gateways_hold_one_combined_limit(
    simulator: Simulator, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    with redis_server(tmp=tmp_path) as redis_url:
        settings = Settings(
            backend_urls=(simulator.url,),
            api_keys=frozenset({"k1:team"}),
            rate_limit_rpm=6,
            redis_url=redis_url,
        )
        async with run_gateway(settings) as one, run_gateway(settings) as two:
            statuses = []
            for i in range(10):
                gw = (one, two)[i % 2]
                resp = await client.post(
                    gw.url + "/v1/chat/completions",
                    json=chat_body(),
                    headers={"Authorization": "Bearer k1"},
                )
                statuses.append(resp.status_code)
                if resp.status_code == 429:
                    assert resp.json()["error"]["type"] == "rate_limited"
                    assert int(resp.headers["retry-after"]) >= 1
    # A minute's allowance (6) over both replicas together, not 6 each.
    assert statuses.count(200) == 6 and statuses.count(429) == 4, statuses
    assert simulator.stats()["total"] == 6
