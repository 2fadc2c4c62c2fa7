"""Two tenants, two gateway replicas (processes) sharing Redis, two engines with a capacity.

One tenant floods both replicas; the other sends a few requests once the flood is established.
With admission from the engines' state, the flood waits in the gateways, where each replica serves
tenants in turns, so the other tenant's requests pass it: each finishes before three quarters of
the flood's backlog has. With the seed's default the whole flood is admitted into the engines'
queues ahead of it, and it finishes after nearly all of the backlog: the same bound fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.conftest import GatewayProcess, chat_body, spawn_gateway, wait_for
from tests.integration.test_ratelimit import pytestmark as needs_redis
from tests.integration.test_ratelimit import redis_server
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = needs_redis

CAPACITY = 4  # each engine's max_num_seqs
THRESHOLD = 2  # VLLM_POOL_SATURATION_MAX_WAITING
REPLICAS = 2
FLOOD = 80
POLITE = 4
# A polite request must finish before this share of the flood's backlog (the flood's requests not
# yet finished when it was sent) has. Alone it would finish first; behind the backlog, last.
# What does finish before it: what the engines hold when it is admitted (their places and the
# queue bound, threshold x replicas), what runs beside it, and what finishes while it waits for
# its turn in its replica (a few readings, longer on a busy machine).
SHARE = 0.75


@contextlib.asynccontextmanager
async def fleet(env: dict[str, str], tmp: Path) -> AsyncIterator[tuple[list[Simulator], list[GatewayProcess]]]:  # fmt: skip
    config = SimulatorConfig(ttft=0.02, itl=0.01, tokens=20, max_num_seqs=CAPACITY)
    with redis_server(tmp=tmp) as redis_url, contextlib.ExitStack() as stack:
        async with run_simulator(config) as one, run_simulator(config) as two:
            env = {
                "VLLM_BACKEND_URL": f"{one.url},{two.url}",
                "VLLM_API_KEYS": "key-a:team-a,key-b:team-b",
                "VLLM_REDIS_URL": redis_url,
                "VLLM_RATE_LIMIT_RPM": "100000",  # shared through Redis, never reached
                **env,
            }
            gateways = [
                await asyncio.to_thread(stack.enter_context, spawn_gateway(env, name=f"fair-{i}"))
                for i in range(REPLICAS)
            ]
            yield [one, two], gateways


async def polite_places(env: dict[str, str], tmp: Path) -> tuple[list[int], int]:
    """For each of the polite tenant's requests, how many requests finished after it was sent
    and before it did; and the flood's backlog when they were sent."""
    finished: list[str] = []
    async with fleet(env, tmp) as (sims, gateways), httpx.AsyncClient(timeout=60) as client:

        async def one(i: int, key: str, tag: str) -> None:
            resp = await client.post(
                gateways[i % REPLICAS].url + "/v1/chat/completions",
                json=chat_body(stream=True),
                headers={"Authorization": f"Bearer {key}"},
            )
            assert resp.status_code == 200, resp.text
            finished.append(tag)

        flood = [asyncio.create_task(one(i, "key-a", "a")) for i in range(FLOOD)]
        # The flood is established: the engines have finished a few rounds of it.
        await wait_for(lambda: sum(s.stats()["completed"] for s in sims) >= 4 * CAPACITY, 30)
        sent_at = len(finished)
        polite = [asyncio.create_task(one(i, "key-b", f"b{i}")) for i in range(POLITE)]
        await asyncio.gather(*flood, *polite)
    assert len(finished) == FLOOD + POLITE
    return [finished.index(f"b{i}") - sent_at for i in range(POLITE)], FLOOD - sent_at


async def test_a_flooding_tenant_does_not_hold_back_another_across_replicas(
    tmp_path: Path,
) -> None:
    places, backlog = await polite_places(
        {
            "VLLM_POOL_SATURATION_MAX_WAITING": str(THRESHOLD),
            "VLLM_POOL_SATURATION_SCRAPE_SECONDS": "0.05",
        },
        tmp_path,
    )
    assert max(places) <= SHARE * backlog, (places, backlog)


async def test_with_the_seeds_default_the_flood_fills_the_engines_ahead_of_it(
    tmp_path: Path,
) -> None:
    places, backlog = await polite_places({}, tmp_path)
    assert min(places) > SHARE * backlog, (places, backlog)
