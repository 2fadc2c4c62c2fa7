"""Case S10 of docs/reliability.md, request ids: the client's ``X-Request-ID`` never reaches vLLM
and the gateway's own ids cannot be guessed. Two tenants' keys against the real gateway in front
of the simulator.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import chat_body, run_gateway
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.timeout(90)

KEYS = frozenset({"key-a:alpha", "key-b:beta"})
ADMIN = frozenset({"key-root:ops"})
A = {"authorization": "Bearer key-a"}
B = {"authorization": "Bearer key-b"}
ROOT = {"authorization": "Bearer key-root"}
MODEL = "sim-model"


def _settings(sim: Simulator, **changes: Any) -> Settings:
    base = Settings(backend_urls=(sim.url,), api_keys=KEYS, admin_api_keys=ADMIN)
    return base.replace(**changes)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    # Long enough for a background response to still be running while the tests poke at it.
    async with run_simulator(SimulatorConfig(ttft=0.01, itl=0.05, tokens=8)) as s:
        yield s


# --- S10: request ids ---------------------------------------------------------------------------


async def test_s10_the_clients_request_id_never_reaches_the_backend(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    async with run_gateway(_settings(sim)) as gw:

        async def stream(headers: dict[str, str]) -> httpx.Response:
            resp = await client.post(
                gw.url + "/v1/chat/completions",
                json=chat_body(stream=True, model=MODEL),
                headers={**headers, "x-request-id": "same-id"},
            )
            assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
            return resp

        both = await asyncio.gather(stream(A), stream(B))
        # Each client is told its own id back, and its logs know the request by it.
        assert [r.headers["x-request-id"] for r in both] == ["same-id", "same-id"]
        seen = [r["request_id"] for r in sim.stats()["requests"]]
        assert len(seen) == 2 and len(set(seen)) == 2 and "same-id" not in seen
        # The gateway's own ids: nothing in one tells the next.
        fresh = []
        for _ in range(20):
            resp = await client.post(
                gw.url + "/v1/chat/completions", json=chat_body(max_tokens=1), headers=A
            )
            fresh.append(resp.headers["x-request-id"])
        assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in fresh)
        assert len({i[:12] for i in fresh}) == 20  # no shared prefix, no counter
        # Without a client's id, the backend knows the request by the one the client was told.
        assert [r["request_id"] for r in sim.stats()["requests"]][-20:] == fresh
