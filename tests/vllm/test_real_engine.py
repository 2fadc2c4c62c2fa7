"""Smoke tests of the real vLLM engine on the prepared default model, without the gateway.

They pin what the other real-engine tests rely on: the server answers under the short model name,
the model is a real instruct model (it knows the capital of France), streams end with [DONE], and
``/metrics`` carries the gauges the admission tests read.
"""

from __future__ import annotations

import json

import httpx

from tests.vllm.conftest import VllmServer
from tests.vllm.helpers import metric_value, num_requests_running, num_requests_waiting

# "Answer in one word." gives the 135M model a clear margin for "The capital of France is Paris";
# without it, its first token is a near-tie that bf16 rounding on some CPUs tips to French prose.
QUESTION = "What is the capital of France? Answer in one word."


async def test_models_lists_short_name(vllm_server: VllmServer) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{vllm_server.url}/v1/models")
    assert response.status_code == 200
    ids = [item["id"] for item in response.json()["data"]]
    assert vllm_server.model == "SmolLM2-135M-Instruct"
    assert vllm_server.model in ids


async def test_capital_of_france_is_paris(vllm_server: VllmServer) -> None:
    body = {
        "model": vllm_server.model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 24,
        "temperature": 0,
    }
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(f"{vllm_server.url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert "paris" in answer.lower(), answer


async def test_stream_ends_with_done(vllm_server: VllmServer) -> None:
    body = {
        "model": vllm_server.model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
    }
    events: list[str] = []
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{vllm_server.url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    text = "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        for choice in json.loads(event)["choices"]
    )
    assert "paris" in text.lower(), text


async def test_metrics_gauges_idle(vllm_server: VllmServer) -> None:
    assert await num_requests_running(vllm_server.url) == 0
    assert await num_requests_waiting(vllm_server.url) == 0


def test_metric_value_skips_longer_names() -> None:
    text = (
        "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 7.0\n'
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
    )
    assert metric_value(text, "vllm:num_requests_waiting") == 3.0
    assert metric_value(text, "vllm:num_requests_running") == 3.0
