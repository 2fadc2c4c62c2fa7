"""The gateway in front of a real vLLM engine (CPU build here): relay, SDK, abort, queue, faults.

Few and short: the engine makes about 70 tokens/s in total on this machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests._progress import note
from tests.conftest import RunningGateway, run_gateway, spawn_gateway, sse_events, wait_for
from tests.vllm.conftest import ARTIFACTS, STARTUP_DEADLINE_S, VllmServer
from tests.vllm.helpers import num_requests_running
from vllm_gateway.runtime.up.preflight import free_port
from vllm_gateway.runtime.up.vllm_command import (
    build_vllm_command,
    child_environment,
    has_nvidia_gpu,
    served_names,
)
from vllm_gateway.runtime.up.vllm_log import last_line
from vllm_gateway.runtime.up.vllm_process import VllmChild
from vllm_gateway.runtime.up.warmup import wait_healthy
from vllm_gateway.settings import Settings

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."}
]


def _body(model: str, stream: bool, max_tokens: int = 16, **extra: object) -> dict[str, object]:
    return {
        "model": model,
        "messages": QUESTION,
        "stream": stream,
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def _shape(value: object) -> object:
    """The structure of a JSON value: keys and types, not contents."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


@pytest.fixture
async def gateway(vllm_server: VllmServer) -> AsyncIterator[RunningGateway]:
    settings = Settings(
        backend_urls=(vllm_server.url,),
        max_concurrent_requests=8,
        queue_wait_timeout=30,
        request_timeout=120,
    )
    async with run_gateway(settings) as gw:
        yield gw


async def test_chat_completion_through_the_gateway_matches_vllm(
    vllm_server: VllmServer, gateway: RunningGateway
) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        direct = (
            await client.post(
                vllm_server.url + "/v1/chat/completions", json=_body(vllm_server.model, False)
            )
        ).json()
        via = await client.post(
            gateway.url + "/v1/chat/completions", json=_body(vllm_server.model, False)
        )
    assert via.status_code == 200
    body = via.json()
    assert "paris" in body["choices"][0]["message"]["content"].lower()
    assert _shape(body) == _shape(direct)
    assert body["usage"]["completion_tokens"] > 0


async def test_stream_through_the_gateway_matches_vllm(
    vllm_server: VllmServer, gateway: RunningGateway
) -> None:
    body = _body(vllm_server.model, True, stream_options={"include_usage": True})
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", vllm_server.url + "/v1/chat/completions", json=body) as r:
            direct = sse_events((await r.aread()).decode())
        async with client.stream("POST", gateway.url + "/v1/chat/completions", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            via = sse_events((await r.aread()).decode())
    assert via[-1] == direct[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in via[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "paris" in text.lower()
    assert chunks[-1]["usage"]["completion_tokens"] > 0  # include_usage's final chunk
    assert [_shape(c) for c in chunks[:2]] == [_shape(orjson.loads(e)) for e in direct[:2]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] in ("stop", "length")


async def test_openai_sdk_through_the_gateway(
    vllm_server: VllmServer, gateway: RunningGateway
) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model=vllm_server.model, messages=QUESTION, max_tokens=16, temperature=0
        )
        assert "paris" in (reply.choices[0].message.content or "").lower()
        assert reply.usage is not None and reply.usage.total_tokens > 0
        stream = await client.chat.completions.create(
            model=vllm_server.model, messages=QUESTION, max_tokens=16, temperature=0, stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "paris" in "".join(parts).lower()
    finally:
        await client.close()


async def _wait_running(url: str, predicate: object, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await num_requests_running(url)
        if predicate(value):  # type: ignore[operator]
            return value
        if loop.time() > end:
            raise AssertionError(f"vllm:num_requests_running stayed at {value}")
        await asyncio.sleep(0.1)


async def test_client_disconnect_mid_stream_aborts_the_request_in_vllm(
    vllm_server: VllmServer, gateway: RunningGateway
) -> None:
    body = _body(vllm_server.model, True, max_tokens=1000, ignore_eos=True)
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream("POST", gateway.url + "/v1/chat/completions", json=body) as r,
    ):
        seen = 0
        async for _ in r.aiter_raw():
            seen += 1
            if seen == 3:
                break
        assert await num_requests_running(vllm_server.url) >= 1
    await _wait_running(vllm_server.url, lambda v: v == 0, timeout=2.0)
    assert gateway.gateway.admission.in_flight == 0


async def test_excess_waits_then_gets_503_and_admitted_ones_complete(
    vllm_server: VllmServer,
) -> None:
    settings = Settings(
        backend_urls=(vllm_server.url,),
        max_concurrent_requests=1,
        queue_wait_timeout=1.0,
        request_timeout=120,
    )
    async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=120) as client:

        async def ask() -> httpx.Response:
            return await client.post(
                gw.url + "/v1/chat/completions",
                json=_body(vllm_server.model, False, max_tokens=150, ignore_eos=True),
            )

        first = asyncio.create_task(ask())
        await wait_for(lambda: gw.gateway.admission.in_flight == 1)
        rest = await asyncio.gather(ask(), ask())
        assert [r.status_code for r in rest] == [503, 503]
        assert all(r.json()["error"]["type"] == "queue_timeout" for r in rest)
        assert all(int(r.headers["retry-after"]) >= 1 for r in rest)
        done = await first
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 150


async def test_sigterm_to_the_gateway_mid_stream_lets_the_stream_finish(
    vllm_server: VllmServer,
) -> None:
    env = {"VLLM_BACKEND_URL": vllm_server.url, "VLLM_SHUTDOWN_TIMEOUT_SECONDS": "60"}
    with spawn_gateway(env, name="gateway-vllm-drain") as gw:
        async with httpx.AsyncClient(timeout=120) as client:
            body = _body(vllm_server.model, True, max_tokens=40, ignore_eos=True)
            async with client.stream("POST", gw.url + "/v1/chat/completions", json=body) as r:
                it = r.aiter_text()
                text = await anext(it)
                gw.terminate(signal.SIGTERM)
                # The signal reaches the gateway's loop on its own time: a readiness probe sent
                # at once may be answered before it. Within a bound, readiness says draining.
                async with asyncio.timeout(5):
                    while (await client.get(gw.url + "/health/ready")).status_code != 503:  # noqa: ASYNC110  # noqa: ASYNC110 - another process drains
                        await asyncio.sleep(0.02)
                async for part in it:
                    text += part
        events = sse_events(text)
        assert events[-1] == "[DONE]"
        assert await asyncio.to_thread(gw.process.wait, 30) == 0


@pytest.fixture
def victim_vllm(vllm_model_dir: Path) -> Iterator[VllmServer]:
    """A vLLM server of this test's own, to be killed."""
    port = free_port()
    gpu = has_nvidia_gpu()
    log_path = ARTIFACTS / "vllm-victim.log"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    child = VllmChild.start(
        build_vllm_command(sys.executable, str(vllm_model_dir), port, gpu=gpu),
        child_environment(os.environ, gpu=gpu),
        log_path,
        served_names(str(vllm_model_dir))[0],
        port,
    )
    note(lambda: f"a second vLLM warming up (its log: {last_line(log_path)})")
    try:
        wait_healthy(child, STARTUP_DEADLINE_S, sys.stderr)
        yield VllmServer(child.url, child.model, child)
    finally:
        child.stop(10.0)


@pytest.mark.timeout(int(STARTUP_DEADLINE_S) + 120)
async def test_vllm_killed_mid_stream_gives_an_error_event_and_readiness_503(
    victim_vllm: VllmServer,
) -> None:
    settings = Settings(backend_urls=(victim_vllm.url,), request_timeout=120)
    async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=120) as client:
        assert (await client.get(gw.url + "/health/ready")).status_code == 200
        body = _body(victim_vllm.model, True, max_tokens=1000, ignore_eos=True)
        async with client.stream("POST", gw.url + "/v1/chat/completions", json=body) as r:
            it = r.aiter_text()
            text = await anext(it)
            os.killpg(victim_vllm.process.pid, signal.SIGKILL)
            async for part in it:
                text += part
        events = sse_events(text)
        assert "[DONE]" not in events
        assert "error" in orjson.loads(events[-1])
        # Probes share one check whose answer is kept a second: 503 within that and one check.
        async with asyncio.timeout(5):
            while (await client.get(gw.url + "/health/ready")).status_code != 503:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        resp = await client.post(
            gw.url + "/v1/chat/completions", json=_body(victim_vllm.model, False)
        )
        assert resp.status_code == 502 and resp.json()["error"]["type"] == "backend_unavailable"
