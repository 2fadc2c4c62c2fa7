"""Cache-aware routing from a real vLLM's own KV-cache events: a pool of the session's vLLM CPU
server (which publishes its events) and a simulator serving the same model name. The gateway
finds the endpoint through vLLM's /kv_event_sources, indexes the 128-token blocks vLLM reports,
links the prompt's text to them from the streamed prompt ids, and sends the next turn of the
conversation where its blocks are, which vLLM's own prefix-cache counters confirm."""

from __future__ import annotations

import httpx
import orjson

from tests.conftest import run_gateway, wait_for
from tests.vllm.conftest import VllmServer
from tests.vllm.helpers import read_metric
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.prompt_chain import prompt_chain
from vllm_gateway.settings import PoolSettings, Settings
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator

SYSTEM = (
    "You are a museum guide. Answer in one short sentence, naming the room where the visitor "
    "finds what they ask about. "
) * 24  # about 700 tokens with SmolLM2's tokenizer: five of vLLM's 128-token CPU blocks


async def turn(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, str]]
) -> str:
    body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
    text = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                for choice in orjson.loads(line[6:]).get("choices") or ():
                    text.append(choice["delta"].get("content") or "")
    return "".join(text)


async def test_a_conversation_follows_the_blocks_vllm_reports(vllm_server: VllmServer) -> None:
    sim_config = SimulatorConfig(models=(vllm_server.model,), ttft=0.01, itl=0.01, tokens=4)
    async with run_simulator(sim_config) as sim:
        settings = Settings(
            backend_urls=(vllm_server.url, sim.url),
            pool=PoolSettings(routing="cache_aware", health_interval=0.2),
            request_timeout=300.0,
            first_token_timeout=290.0,
        )
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=300) as client:
            pool = gw.gateway.backend
            assert isinstance(pool, PoolBackend)
            real = next(m for m in pool.members if m.url == vllm_server.url)
            assert real.cache is not None
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": "Where are the dinosaurs?"}]  # fmt: skip
            # Its event stream is connected before the first turn, so no block goes unseen.
            await wait_for(lambda: real.cache is not None and real.cache.events_live, timeout=30)
            # No member holds anything yet: a miss goes to the least loaded member, ties to the
            # emptiest cache, then to the first in the pool's order (vLLM).
            answer = await turn(client, gw.url, vllm_server.model, messages)
            assert real.requests == 1
            messages.append({"role": "assistant", "content": answer})
            cache = real.cache
            try:
                await wait_for(lambda: len(cache.blocks) >= 3, timeout=30)
            except TimeoutError:
                raise AssertionError(f"{len(cache.blocks)} blocks, {cache.counts}") from None
            assert real.cache.events_live and real.cache.block_size == 128
            messages.append({"role": "user", "content": "And the moon rocks?"})
            chain = prompt_chain({"model": vllm_server.model, "messages": messages})
            assert chain is not None
            real.cache.sent.clear()  # only vLLM's events may say what it holds
            links = pool.cache_aware.links.get(128)  # type: ignore[union-attr]
            predicted = real.cache.hit_tokens(chain, links, pool.cache_aware.tokens_per_byte)  # type: ignore[union-attr]
            assert predicted >= 3 * 128 and predicted % 128 == 0
            hits_before = await read_metric(vllm_server.url, "vllm:prefix_cache_hits_total")
            requests_before = real.requests
            await turn(client, gw.url, vllm_server.model, messages)
            assert real.requests == requests_before + 1  # the turn went where its blocks are
            hits = await read_metric(vllm_server.url, "vllm:prefix_cache_hits_total") - hits_before
            assert hits >= predicted  # vLLM served at least the predicted tokens from its cache
            assert pool.pool_stats()["cache_decisions"]["hit"] >= 1
