"""A tenant's priority class reaches a real vLLM engine started with ``--scheduling-policy
priority`` as the request's own ``priority``, and the engine takes and serves it
(docs/admission.md). Small on purpose: the CPU engine is slow; the classes' TTFT under load belongs
in a benchmark's report, not in a test."""

from __future__ import annotations

import httpx
import openai
import orjson

from tests.conftest import run_gateway
from tests.vllm.conftest import VllmServer
from vllm_gateway.settings import Settings


async def test_a_tenants_class_is_taken_and_served_by_vllm_with_the_priority_policy(
    vllm_server: VllmServer,
) -> None:
    settings = Settings(
        backend_urls=(vllm_server.url,),
        api_keys=frozenset({"hi:gold:5", "lo:bronze:0"}),
        priority_scheduling=True,
    )
    async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=120) as client:
        # The engine itself takes a non-zero priority (vLLM rejects what it cannot parse).
        direct = await client.post(
            vllm_server.url + "/v1/chat/completions",
            json={
                "model": vllm_server.model,
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 4,
                "priority": -5,
            },
        )
        assert direct.status_code == 200, direct.text
        for key in ("hi", "lo"):
            resp = await client.post(
                gw.url + "/v1/chat/completions",
                json={
                    "model": vllm_server.model,
                    "messages": [{"role": "user", "content": "Say hi."}],
                    "max_tokens": 4,
                    # A client's own priority is replaced by its tenant's class: vLLM would
                    # refuse this one with a 400, so a 200 shows the class went in its place.
                    "priority": "not a number",
                },
                headers={"Authorization": f"Bearer {key}"},
            )
            assert resp.status_code == 200, resp.text
            answer = orjson.loads(resp.content)
            assert answer["choices"][0]["message"]["content"]
            assert answer["usage"]["completion_tokens"] >= 1
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="hi", max_retries=0, timeout=120
        ) as sdk:
            stream = await sdk.completions.create(
                model=vllm_server.model, prompt="The sky is", max_tokens=4, stream=True
            )
            text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
        assert text
