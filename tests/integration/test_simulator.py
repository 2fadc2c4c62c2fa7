"""The vLLM simulator on loopback, checked with plain HTTP clients (httpx, raw sockets, the openai SDK).

Each test starts its own simulator on 127.0.0.1 with port 0, on the test's event loop. Pace is kept
fast; the only time checks are sanity bounds (a hang is a hang, ttft is not skipped).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator

FAST = SimulatorConfig(ttft=0.01, itl=0.005, tokens=8)
CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hello"}]}
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def sim() -> AsyncIterator[Any]:
    async with run_simulator(FAST) as s:
        yield s


@pytest.fixture
async def client(sim: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
        yield c


def events(text: str) -> list[str]:
    """The data of each SSE event, in order."""
    out = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            out.append(block[len("data: ") :])
    return out


async def stream_events(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[str]]:
    async with client.stream("POST", path, json=body) as r:
        text = (await r.aread()).decode()
    return r, events(text)


async def wait_for(predicate: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- routes ---------------------------------------------------------------------------------------
async def test_chat_stream_has_vllms_sequence(client: httpx.AsyncClient, sim: Any) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 5, "stream_options": {"include_usage": True}}
    r, evs = await stream_events(client, "/v1/chat/completions", body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    assert evs[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in evs[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-1]
    assert [c["choices"][0]["delta"]["content"] for c in content] == [f" tok{i}" for i in range(5)]
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 4 + ["length"]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith(
        "chatcmpl-"
    )
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "sim-model" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    u = usage["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert sim.stats()["completed"] == 1


async def test_stream_without_max_tokens_uses_tokens_knob_and_stops(
    client: httpx.AsyncClient,
) -> None:
    _, evs = await stream_events(client, "/v1/chat/completions", {**CHAT, "stream": True})
    chunks = [orjson.loads(e) for e in evs[:-1]]
    assert len(chunks) == 1 + FAST.tokens  # role chunk, one per token, no usage chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[-1]


async def test_max_completion_tokens_counts_like_max_tokens(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 3})
    assert r.json()["usage"]["completion_tokens"] == 3


async def test_chat_non_stream(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == " tok0 tok1 tok2 tok3"
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4


async def test_completions_stream_and_not(client: httpx.AsyncClient) -> None:
    body = {"model": "sim-model", "prompt": "Once upon", "max_tokens": 3}
    r = await client.post("/v1/completions", json=body)
    assert r.json()["object"] == "text_completion"
    assert r.json()["choices"][0]["text"] == " tok0 tok1 tok2"
    _, evs = await stream_events(
        client,
        "/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    chunks = [orjson.loads(e) for e in evs[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [" tok0", " tok1", " tok2"]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and evs[-1] == "[DONE]"
    assert chunks[0]["id"].startswith("cmpl-")


async def test_models_health_and_metrics(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(models=("a", "b"), max_model_len=1234)
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["owned_by"], m["max_model_len"], m["parent"]) for m in models["data"]] == [
        ("a", "vllm", 1234, None),
        ("b", "vllm", 1234, None),
    ]
    health = await client.get("/health")
    assert (health.status_code, health.content) == (200, b"")
    sim.configure(unhealthy=True)
    assert (await client.get("/health")).status_code == 503
    metrics = (await client.get("/metrics")).text
    assert 'vllm:num_requests_running{model_name="a",engine="0"} 0.0' in metrics
    assert 'vllm:num_requests_waiting{model_name="b",engine="0"} 0.0' in metrics


async def test_running_gauge_counts_streams_in_flight(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(stall_after=1)
    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        pieces = r.aiter_raw()  # keep a reference: a collected iterator closes the response
        await pieces.__anext__()
        async with httpx.AsyncClient(base_url=sim.url) as other:
            metrics = (await other.get("/metrics")).text
            stats = (await other.get("/sim/stats")).json()
    assert 'vllm:num_requests_running{model_name="sim-model",engine="0"} 1.0' in metrics
    assert stats["running"] == 1
    await wait_for(lambda: sim.stats()["running"] == 0)


async def test_unknown_model_is_vllms_404(client: httpx.AsyncClient, sim: Any) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("NotFoundError", "model", 404)
    assert "`nope` does not exist" in error["message"]
    assert sim.stats()["failed"] == 1


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [("POST", "/v1/chat/completions", b"{not json", 400),
     ("POST", "/v1/chat/completions", b'{"model": "sim-model"}', 400),
     ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400),
     ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 999999}', 400),
     ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "vllm_sim": {"api_key": "k"}}', 400),
     ("GET", "/v1/chat/completions", b"", 405),
     ("GET", "/nowhere", b"", 404)],
)  # fmt: skip
async def test_bad_requests(
    client: httpx.AsyncClient, method: str, path: str, content: bytes, status: int
) -> None:
    r = await client.request(method, path, content=content)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    if status == 400:
        assert r.json()["error"]["code"] == 400 and r.json()["error"]["type"] == "BadRequestError"


async def test_api_key_guards_v1_only(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
        assert (await client.get("/v1/models", headers=headers)).status_code == 401
    ok = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status_code == 200
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200


async def test_stats_record_request_id_and_headers(client: httpx.AsyncClient, sim: Any) -> None:
    headers = {"X-Request-ID": "req-42", "Authorization": "Bearer abc"}
    async with httpx.AsyncClient(base_url=sim.url, headers=headers) as with_headers:
        _, evs = await stream_events(with_headers, "/v1/chat/completions", {**CHAT, "stream": True})
    assert orjson.loads(evs[0])["id"] == "chatcmpl-req-42"  # vLLM takes X-Request-Id as the id
    stats = (await client.get("/sim/stats")).json()
    (record,) = stats["requests"]
    assert record["request_id"] == "req-42"
    assert record["headers"]["authorization"] == "Bearer abc"
    assert record["headers"]["x-request-id"] == "req-42"
    assert (record["path"], record["stream"], record["status"], record["outcome"]) == (
        "/v1/chat/completions",
        True,
        200,
        "completed",
    )
    assert record["chunks"] == 1 + FAST.tokens + 1  # role, tokens, [DONE]
    assert (stats["total"], stats["completed"], stats["running"]) == (1, 1, 0)


async def test_sim_config_and_reset_over_http(client: httpx.AsyncClient, sim: Any) -> None:
    r = await client.post("/sim/config", json={"tokens": 3, "ttft": 0.0})
    assert r.status_code == 200 and r.json()["tokens"] == 3 and r.json()["itl"] == FAST.itl
    assert sim.config.tokens == 3
    bad = await client.post("/sim/config", json={"nonsense": 1})
    assert bad.status_code == 400 and "nonsense" in bad.json()["error"]["message"]
    await client.post("/v1/chat/completions", json=CHAT)
    assert sim.stats()["total"] == 1
    r = await client.post("/sim/reset")
    assert r.json()["total"] == 0 and r.json()["requests"] == []
    assert sim.reset()["completed"] == 0


async def test_pace_is_roughly_kept(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(ttft=0.2, itl=0.05, tokens=4)
    start = time.monotonic()
    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        arrivals = []
        async for line in r.aiter_lines():
            if '"content":" tok' in line:
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 4
    # Lower bounds only (a busy machine delays a read, never hastens a send): the first token
    # comes after the ttft, and the last after the ttft plus three gaps of 50 ms.
    assert arrivals[0] >= 0.2 - 0.01
    assert arrivals[-1] >= 0.2 + 3 * 0.05 - 0.01


# --- faults ---------------------------------------------------------------------------------------
async def test_status_fault(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(status=503)
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert (
        r.json()["error"]["type"] == "ServiceUnavailableError" and r.json()["error"]["code"] == 503
    )
    assert sim.stats()["failed"] == 1 and sim.stats()["running"] == 0


async def test_error_traceback_fault(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(error_traceback=True)
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500
    assert "Traceback (most recent call last)" in r.text and "/opt/vllm/" in r.text


async def test_hang_sends_nothing_and_counts_abort(sim: Any) -> None:
    sim.configure(hang=True)
    async with httpx.AsyncClient(base_url=sim.url, timeout=httpx.Timeout(10, read=1.0)) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await wait_for(lambda: sim.stats()["aborted"] == 1)
    assert sim.stats()["running"] == 0
    assert sim.stats()["requests"][-1]["fault"] == "hang"


async def test_stall_after_sends_n_chunks_then_holds(sim: Any) -> None:
    sim.configure(stall_after=3)
    received = b""
    async with (
        httpx.AsyncClient(base_url=sim.url, timeout=httpx.Timeout(10, read=1.0)) as c,
        c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        with pytest.raises(httpx.ReadTimeout):
            async for piece in r.aiter_raw():
                received += piece
    assert len(events(received.decode())) == 3
    await wait_for(lambda: sim.stats()["aborted"] == 1)
    assert sim.stats()["requests"][-1]["chunks"] == 3


async def test_drop_after_closes_mid_stream(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(drop_after=3)
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as r:
            async for piece in r.aiter_raw():
                received += piece
    assert len(events(received.decode())) == 3
    stats = sim.stats()
    assert (stats["dropped"], stats["running"], stats["aborted"]) == (1, 0, 0)


async def test_drop_after_non_stream_truncates_the_body(
    client: httpx.AsyncClient, sim: Any
) -> None:
    sim.configure(drop_after=0)
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/v1/chat/completions", json=CHAT)


async def test_malformed_html(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(malformed="html")
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text.startswith("<html>")


async def test_malformed_bad_json(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(malformed="bad_json")
    _, evs = await stream_events(client, "/v1/chat/completions", {**CHAT, "stream": True})
    assert "{not json" in evs
    assert evs[-1] == "[DONE]"
    assert evs.index("{not json") < len(evs) - 2  # mid-stream, not at the end


async def test_malformed_no_done(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(malformed="no_done")
    r, evs = await stream_events(client, "/v1/chat/completions", {**CHAT, "stream": True})
    assert r.status_code == 200  # a clean chunked end...
    assert orjson.loads(evs[-1])["choices"][0]["finish_reason"] == "stop"
    assert "[DONE]" not in evs  # ...without [DONE]


async def test_malformed_huge_line(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(malformed="huge_line", huge_line_bytes=3 * 1024 * 1024)
    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        body = await r.aread()
    tail = body[body.rindex(b"\n\n") + 2 :]
    assert tail.startswith(b"data: xxx") and len(tail) > 3 * 1024 * 1024 and b"\n" not in tail


async def test_per_request_override(client: httpx.AsyncClient, sim: Any) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "vllm_sim": {"status": 429}})
    assert r.status_code == 429
    _, evs = await stream_events(
        client, "/v1/chat/completions", {**CHAT, "stream": True, "vllm_sim": {"tokens": 2}}
    )
    assert len(evs) == 1 + 2 + 1
    ok = await client.post("/v1/chat/completions", json=CHAT)  # the server's config is unchanged
    assert ok.status_code == 200 and sim.config.status is None


# --- connections ------------------------------------------------------------------------------------
async def test_client_disconnect_aborts_at_once(sim: Any) -> None:
    sim.configure(tokens=1000, itl=0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    body = orjson.dumps({**CHAT, "stream": True})
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b"
        % (len(body), body)
    )
    while (await reader.read(65536)).count(b"data: ") < 1:
        pass
    assert sim.stats()["running"] == 1
    writer.close()
    await writer.wait_closed()
    closed_at = time.monotonic()
    await wait_for(lambda: sim.stats()["aborted"] == 1)
    assert time.monotonic() - closed_at < 2.0
    stats = sim.stats()
    assert (stats["running"], stats["completed"], stats["requests"][-1]["outcome"]) == (
        0,
        0,
        "aborted",
    )
    assert 0 < stats["requests"][-1]["chunks"] < 1000


async def test_keep_alive_reuses_one_connection(sim: Any) -> None:
    async with httpx.AsyncClient(base_url=sim.url, limits=httpx.Limits(max_connections=1)) as c:
        for _ in range(3):
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
            _, evs = await stream_events(c, "/v1/chat/completions", {**CHAT, "stream": True})
            assert evs[-1] == "[DONE]"
        assert sim.stats()["connections"] == 1


async def test_pipelined_requests_answer_in_order(sim: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 5)  # until the server closes, as asked
    writer.close()
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.index(b"content-length: 0") < data.index(b'"object":"list"')


async def test_chunked_request_body_is_refused(sim: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 411 ")


async def test_openai_sdk_streams(sim: Any) -> None:
    from openai import AsyncOpenAI

    sdk = AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        models = await sdk.models.list()
    finally:
        await sdk.close()
    assert text == " tok0 tok1 tok2 tok3" and finish == "length"
    assert usage is not None and usage.completion_tokens == 4
    assert [m.id for m in models.data] == ["sim-model"]


async def test_cli_prints_port_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vllm_gateway_tools.simulator", "--port", "0", "--model", "m1,m2", "--tokens", "2",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert line.startswith("simulator listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with httpx.AsyncClient(base_url=url) as c:
            assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["m1", "m2"]
            r = await c.post("/v1/chat/completions", json={**CHAT, "model": "m2"})
            assert r.json()["choices"][0]["message"]["content"] == " tok0 tok1"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
