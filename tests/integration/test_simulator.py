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
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest

from tests.conftest import sse_blocks
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator

if TYPE_CHECKING:
    from anthropic.types import MessageParam

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
    for event in sse_blocks(text.encode()):
        block = event.decode()
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


# === the routes beyond chat and completions =============================================================
# Each protocol's stream and whole shapes, the store, the pooling and dev routes, and every fault
# knob on the new generation routes. Error bodies are compared byte for byte with captures of a
# real vLLM 0.32 (the simulator then serves "smol" with a 2048-token context, as that server did).

RESP = {"model": "sim-model", "input": "hello"}
HELLO: list[MessageParam] = [{"role": "user", "content": "hello"}]
MSG = {"model": "sim-model", "max_tokens": 64, "messages": HELLO}
RESPONSE_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                   "response.content_part.added"]  # fmt: skip
RESPONSE_CLOSING = ["response.output_text.done", "response.content_part.done",
                    "response.output_item.done", "response.completed"]  # fmt: skip


def named(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event, in order."""
    out: list[tuple[str | None, str]] = []
    for event in sse_blocks(text.encode()):
        block = event.decode()
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            else:
                assert line.startswith("data: "), block
                data.append(line[len("data: ") :])
        out.append((name, "\n".join(data)))
    return out


async def stream_named(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[tuple[str | None, Any]]]:
    async with client.stream("POST", path, json=body) as r:
        text = (await r.aread()).decode()
    return r, [(name, orjson.loads(data)) for name, data in named(text)]


def whole_events(received: bytes) -> str:
    """The complete SSE events in ``received`` (a read can end inside one)."""
    return received[: received.rfind(b"\n\n") + 2].decode()


async def read_until_cut(response: httpx.Response) -> bytes:
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async for piece in response.aiter_raw():
            received += piece
    return received


# --- Responses --------------------------------------------------------------------------------------------
async def test_responses_whole_completed_and_incomplete(
    client: httpx.AsyncClient, sim: Any
) -> None:
    r = await client.post("/v1/responses", json=RESP)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert (body["status"], body["incomplete_details"]) == ("completed", None)
    (item,) = body["output"]
    assert item["id"].startswith("msg_") and item["status"] == "completed"
    assert item["content"][0]["text"] == "".join(f" tok{i}" for i in range(FAST.tokens))
    usage = body["usage"]
    assert usage["output_tokens"] == FAST.tokens
    assert usage["total_tokens"] == usage["input_tokens"] + FAST.tokens
    short = (await client.post("/v1/responses", json={**RESP, "max_output_tokens": 3})).json()
    assert (short["status"], short["incomplete_details"]) == (
        "incomplete",
        {"reason": "max_output_tokens"},
    )
    assert short["usage"]["output_tokens"] == 3 and short["max_output_tokens"] == 3
    assert sim.stats()["routes"]["/v1/responses"]["completed"] == 2


async def test_responses_stream_has_vllms_sequence(client: httpx.AsyncClient, sim: Any) -> None:
    async with client.stream("POST", "/v1/responses", json={**RESP, "stream": True}) as r:
        raw = await r.aread()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    events = [(name, orjson.loads(data)) for name, data in named(raw.decode())]
    names = [name for name, _ in events]
    deltas = ["response.output_text.delta"] * FAST.tokens
    assert names == RESPONSE_EVENTS + deltas + RESPONSE_CLOSING
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert all(d["type"] == name for name, d in events)
    assert b"[DONE]" not in raw
    text = "".join(d["delta"] for name, d in events if name == "response.output_text.delta")
    assert text == render_text(FAST.tokens)
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == text
    assert events[0][1]["response"]["status"] == "in_progress"
    assert sim.stats()["requests"][-1]["chunks"] == len(events)


def render_text(n: int) -> str:
    return "".join(f" tok{i}" for i in range(n))


async def test_responses_openai_sdk_create_and_stream_helper(sim: Any) -> None:
    from openai import AsyncOpenAI

    sdk = AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)
    try:
        whole = await sdk.responses.create(model="sim-model", input="hi")
        kinds = [
            event.type
            async for event in await sdk.responses.create(
                model="sim-model", input="hi", stream=True
            )
        ]
        async with sdk.responses.stream(
            model="sim-model", input="hi", max_output_tokens=2
        ) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_response()
    finally:
        await sdk.close()
    assert whole.status == "completed" and whole.output_text == render_text(FAST.tokens)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert (
        final.incomplete_details.reason == "max_output_tokens"
        and final.output_text == render_text(2)
    )


async def test_responses_background_queued_then_final(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(ttft=0.05)
    created = (await client.post("/v1/responses", json={**RESP, "background": True})).json()
    assert (created["status"], created["background"], created["output"], created["usage"]) == (
        "queued", True, [], None)  # fmt: skip
    rid = created["id"]
    assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "queued"
    deadline = time.monotonic() + 5
    while (body := (await client.get(f"/v1/responses/{rid}")).json())["status"] == "queued":
        assert time.monotonic() < deadline, "the background response never finished"
        await asyncio.sleep(0.02)
    assert body["status"] == "completed" and body["output"][0]["content"][0]["text"] == render_text(
        FAST.tokens
    )
    late = await client.post(f"/v1/responses/{rid}/cancel")
    assert late.status_code == 400
    assert late.json()["error"] == {"message": "Cannot cancel a synchronous response.",
                                    "type": "invalid_request_error", "param": "response_id", "code": 400}  # fmt: skip
    assert sim.stats()["running"] == 0


async def test_responses_background_cancel_aborts_the_request(
    client: httpx.AsyncClient, sim: Any
) -> None:
    body = {**RESP, "background": True, "vllm_sim": {"itl": 1.0, "tokens": 100}}
    rid = (await client.post("/v1/responses", json=body)).json()["id"]
    assert sim.stats()["running"] == 1
    metrics = (await client.get("/metrics")).text
    assert 'vllm:num_requests_running{model_name="sim-model",engine="0"} 1.0' in metrics
    cancelled = await client.post(f"/v1/responses/{rid}/cancel")
    assert cancelled.status_code == 200
    assert (cancelled.json()["status"], cancelled.json()["output"]) == ("cancelled", [])
    stats = sim.stats()
    assert (stats["running"], stats["aborted"], stats["routes"]["/v1/responses"]["aborted"]) == (
        0,
        1,
        1,
    )
    assert (await client.get(f"/v1/responses/{rid}")).json()["status"] == "cancelled"
    assert (await client.post(f"/v1/responses/{rid}/cancel")).status_code == 400


async def test_responses_cancelled_stream_never_ends(client: httpx.AsyncClient, sim: Any) -> None:
    body = {**RESP, "background": True, "stream": True, "vllm_sim": {"itl": 0.05, "tokens": 100}}
    received = b""
    async with (
        httpx.AsyncClient(base_url=sim.url, timeout=httpx.Timeout(10, read=0.5)) as c,
        c.stream("POST", "/v1/responses", json=body) as r,
    ):
        pieces = r.aiter_raw()
        while b"response.output_text.delta" not in received:
            received += await next_piece(pieces)
        rid = orjson.loads(named(whole_events(received))[0][1])["response"]["id"]
        assert (await client.post(f"/v1/responses/{rid}/cancel")).json()["status"] == "cancelled"
        with pytest.raises(httpx.ReadTimeout):  # as vLLM's: no response.completed, no end
            async for piece in pieces:
                received += piece
    names = [n for n, _ in named(whole_events(received))]
    assert "response.completed" not in names and names[:4] == RESPONSE_EVENTS
    assert sim.stats()["running"] == 0 and sim.stats()["aborted"] == 1


async def test_responses_background_stream_replays_after_n(client: httpx.AsyncClient) -> None:
    _, live = await stream_named(
        client, "/v1/responses", {**RESP, "background": True, "stream": True}
    )
    assert [n for n, _ in live][-1] == "response.completed"
    assert live[0][1]["response"]["background"] is True
    rid = live[0][1]["response"]["id"]
    async with client.stream("GET", f"/v1/responses/{rid}?stream=true&starting_after=3") as r:
        replay = [(n, orjson.loads(d)) for n, d in named((await r.aread()).decode())]
    assert r.status_code == 200 and replay == live[4:]
    stored = (await client.get(f"/v1/responses/{rid}")).json()
    assert stored["status"] == "completed" and stored == live[-1][1]["response"]
    async with (
        httpx.AsyncClient(base_url=client.base_url, timeout=httpx.Timeout(10, read=0.3)) as c,
        c.stream("GET", f"/v1/responses/{rid}?stream=true&starting_after=1000") as r,
    ):
        assert r.status_code == 200
        with pytest.raises(httpx.ReadTimeout):  # vLLM's replay waits for a completed event
            await r.aread()


async def test_responses_background_stream_survives_its_client(sim: Any) -> None:
    sim.configure(itl=0.02, tokens=20)
    body = orjson.dumps({**RESP, "background": True, "stream": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(
        b"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b"
        % (len(body), body)
    )
    try:
        head = await reader.readuntil(b'"type":"response.created"}')
    finally:
        writer.close()
        await writer.wait_closed()
    rid = head.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode()
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
        assert sim.stats()["running"] == 1  # a background response goes on without its client
        async with c.stream("GET", f"/v1/responses/{rid}?stream=true") as r:
            replay = [n for n, _ in named((await r.aread()).decode())]
        assert replay[:4] == RESPONSE_EVENTS and replay[-1] == "response.completed"
        assert replay.count("response.output_text.delta") == 20
        assert (await c.get(f"/v1/responses/{rid}")).json()["status"] == "completed"
    assert (sim.stats()["aborted"], sim.stats()["completed"]) == (0, 1)


async def test_responses_stream_of_a_response_without_events_is_cut(
    client: httpx.AsyncClient,
) -> None:
    rid = (await client.post("/v1/responses", json=RESP)).json()["id"]
    async with client.stream("GET", f"/v1/responses/{rid}?stream=true") as r:
        assert r.status_code == 200
        assert await read_until_cut(r) == b""


async def test_responses_previous_response_id(client: httpx.AsyncClient) -> None:
    first = (await client.post("/v1/responses", json=RESP)).json()
    second = (
        await client.post("/v1/responses", json={**RESP, "previous_response_id": first["id"]})
    ).json()
    prior = first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert second["previous_response_id"] == first["id"]
    assert second["usage"]["input_tokens"] == prior + first["usage"]["input_tokens"]
    unknown = await client.post("/v1/responses", json={**RESP, "previous_response_id": "resp_gone"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "response_id"


async def test_responses_store_off_is_vllm_without_the_store(
    client: httpx.AsyncClient, sim: Any
) -> None:
    rid = (await client.post("/v1/responses", json=RESP)).json()["id"]
    no_store = (await client.post("/v1/responses", json={**RESP, "store": False})).json()["id"]
    assert (await client.get(f"/v1/responses/{rid}")).status_code == 200
    assert (await client.get(f"/v1/responses/{no_store}")).status_code == 404
    sim.configure(responses_store=False)
    assert (await client.get(f"/v1/responses/{rid}")).status_code == 404
    bg = await client.post("/v1/responses", json={**RESP, "background": True})
    assert bg.status_code == 400 and bg.json()["error"]["param"] == "background"
    assert "VLLM_ENABLE_RESPONSES_API_STORE=1" in bg.json()["error"]["message"]


# --- Messages -------------------------------------------------------------------------------------------------
async def test_messages_whole_and_stream_shapes(client: httpx.AsyncClient, sim: Any) -> None:
    r = await client.post("/v1/messages", json=MSG)
    body = r.json()
    assert r.status_code == 200 and body["id"].startswith("chatcmpl-")
    assert (body["type"], body["role"], body["stop_reason"]) == ("message", "assistant", "end_turn")
    assert body["content"] == [{"type": "text", "text": render_text(FAST.tokens)}]
    assert body["usage"]["output_tokens"] == FAST.tokens and "stop_sequence" not in body
    r, events = await stream_named(client, "/v1/messages", {**MSG, "stream": True, "max_tokens": 3})
    names = [n for n, _ in events]
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                     "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    assert all(d["type"] == n for n, d in events)
    assert "".join(
        d["delta"]["text"] for n, d in events if n == "content_block_delta"
    ) == render_text(3)
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 3
    assert events[0][1]["message"]["usage"]["output_tokens"] == 0
    assert sim.stats()["routes"]["/v1/messages"]["completed"] == 2


async def test_messages_anthropic_sdk(sim: Any) -> None:
    import anthropic

    sdk = anthropic.AsyncAnthropic(base_url=sim.url, api_key="unused", max_retries=0)
    try:
        whole = await sdk.messages.create(model="sim-model", max_tokens=64, messages=HELLO)
        kinds = [
            e.type
            async for e in await sdk.messages.create(
                model="sim-model", max_tokens=64, messages=HELLO, stream=True
            )
        ]
        async with sdk.messages.stream(model="sim-model", max_tokens=2, messages=HELLO) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        counted = await sdk.messages.count_tokens(model="sim-model", messages=HELLO)
        with pytest.raises(anthropic.NotFoundError) as missing:
            await sdk.messages.create(model="nope", max_tokens=64, messages=HELLO, stream=True)
    finally:
        await sdk.close()
    block = whole.content[0]
    assert whole.stop_reason == "end_turn" and block.type == "text"
    assert block.text == render_text(FAST.tokens)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert text == render_text(2) and final.stop_reason == "max_tokens"
    assert counted.input_tokens == whole.usage.input_tokens
    assert missing.value.body == {"type": "error", "error": {"type": "NotFoundError",
                                  "message": "The model `nope` does not exist. Valid aliases: sim-model."}}  # fmt: skip


async def test_messages_with_an_api_key(client: httpx.AsyncClient, sim: Any) -> None:
    import anthropic

    sim.configure(api_key="sk-test")
    sdk = anthropic.AsyncAnthropic(base_url=sim.url, api_key="sk-test", max_retries=0)
    try:
        assert (
            await sdk.messages.create(model="sim-model", max_tokens=64, messages=HELLO)
        ).stop_reason == "end_turn"  # sent as a Bearer token
    finally:
        await sdk.close()
    only_x_api_key = await client.post("/v1/messages", json=MSG, headers={"x-api-key": "sk-test"})
    assert (only_x_api_key.status_code, only_x_api_key.json()) == (401, {"error": "Unauthorized"})


# --- error bodies: byte for byte with vLLM ------------------------------------------------------------
LONG = "hello " * 3000
VLLM_ERRORS = [
    ("POST", "/v1/responses", b'{"model":"smol","stream":true}', 400, b'{"error":{"message":"1 validation error:\\n  {\'type\': \'missing\', \'loc\': \'body.input\', \'msg\': \'Field required\', \'input\': \'<dict of 3 items>\'}","type":"Bad Request","param":"body.input","code":400}}'),
    ("POST", "/v1/responses", b'{"model":"smol","input":"Hi","max_output_tokens":"lots","stream":true}', 400, b'{"error":{"message":"1 validation error:\\n  {\'type\': \'int_parsing\', \'loc\': \'body.max_output_tokens\', \'msg\': \'Input should be a valid integer, unable to parse string as an integer\', \'input\': \'lots\'}","type":"Bad Request","param":"body.max_output_tokens","code":400}}'),
    ("POST", "/v1/responses", b"not json", 400, b'{"error":{"message":"1 validation error:\\n  {\'type\': \'json_invalid\', \'loc\': \'body.0\', \'msg\': \'JSON decode error\', \'input\': \'<dict of 0 items>\', \'ctx\': {\'error\': \'Expecting value\'}}","type":"Bad Request","param":"body.0","code":400}}'),
    ("GET", "/v1/responses/resp_doesnotexist", b"", 404, b'{"error":{"message":"Response with id \'resp_doesnotexist\' not found.","type":"invalid_request_error","param":"response_id","code":404}}'),
    ("POST", "/v1/responses/resp_doesnotexist/cancel", b"", 404, b'{"error":{"message":"Response with id \'resp_doesnotexist\' not found.","type":"invalid_request_error","param":"response_id","code":404}}'),
    ("POST", "/v1/responses", b'{"model":"nope","input":"Hi","stream":true}', 404, b'{"error":{"message":"The model `nope` does not exist. Valid aliases: smol.","type":"NotFoundError","param":"model","code":404}}'),
    ("POST", "/v1/responses", orjson.dumps({"model": "smol", "input": LONG, "stream": True}), 400, b'{"error":{"message":"This model\'s maximum context length is 2048 tokens. However, your prompt contains at least 2049 input tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. (parameter=input_tokens, value=2049)","type":"BadRequestError","param":"input_tokens","code":400}}'),
    ("POST", "/v1/messages", b'{"model":"nope","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"Hi"}]}', 404, b'{"type":"error","error":{"type":"NotFoundError","message":"The model `nope` does not exist. Valid aliases: smol."}}'),
    ("POST", "/v1/messages", b'{"model":"smol","messages":[{"role":"user","content":"Hi"}]}', 400, b'{"error":{"message":"1 validation error:\\n  {\'type\': \'missing\', \'loc\': \'body.max_tokens\', \'msg\': \'Field required\', \'input\': \'<dict of 2 items>\'}","type":"Bad Request","param":"body.max_tokens","code":400}}'),
    ("POST", "/v1/messages", b'{"model":"smol","max_tokens":5,"messages":[{"role":"robot","content":"Hi"}]}', 400, b'{"error":{"message":"1 validation error:\\n  {\'type\': \'literal_error\', \'loc\': \'body.messages.0.role\', \'msg\': \\"Input should be \'user\', \'assistant\' or \'system\'\\", \'input\': \'robot\', \'ctx\': {\'expected\': \\"\'user\', \'assistant\' or \'system\'\\"}}","type":"Bad Request","param":"body.messages.0.role","code":400}}'),
    ("POST", "/v1/messages", b'{"model":"smol","max_tokens":"x","stream":true,"messages":[{"role":"user","content":"Hi"}]}', 400, b'{"error":{"message":"1 validation error:\\n  {\'type\': \'int_parsing\', \'loc\': \'body.max_tokens\', \'msg\': \'Input should be a valid integer, unable to parse string as an integer\', \'input\': \'x\'}","type":"Bad Request","param":"body.max_tokens","code":400}}'),
    ("POST", "/v1/messages", orjson.dumps({"model": "smol", "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": LONG}]}), 400, b'{"type":"error","error":{"type":"BadRequestError","message":"This model\'s maximum context length is 2048 tokens. However, your prompt contains at least 2049 input tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. (parameter=input_tokens, value=2049)"}}'),
    ("POST", "/tokenize", b'{"model":"smol"}', 400, b'{"error":{"message":"2 validation errors:\\n  {\'type\': \'missing\', \'loc\': \'body.prompt\', \'msg\': \'Field required\', \'input\': \'<dict of 1 items>\'}\\n  {\'type\': \'missing\', \'loc\': \'body.messages\', \'msg\': \'Field required\', \'input\': \'<dict of 1 items>\'}","type":"Bad Request","param":"body.prompt","code":400}}'),
    ("POST", "/tokenize", b'{"model":"nope","prompt":"Hi"}', 404, b'{"error":{"message":"The model `nope` does not exist. Valid aliases: smol.","type":"NotFoundError","param":"model","code":404}}'),
    ("POST", "/detokenize", b'{"model":"smol","tokens":[-1]}', 400, b'{"error":{"message":"1 validation error:\\n  {\'type\': \'greater_than_equal\', \'loc\': \'body.tokens.0\', \'msg\': \'Input should be greater than or equal to 0\', \'input\': \'-1\', \'ctx\': {\'ge\': 0}}","type":"Bad Request","param":"body.tokens.0","code":400}}'),
    ("POST", "/detokenize", b'{"model":"smol","tokens":[99999999]}', 200, b'{"prompt":""}'),
    ("POST", "/v1/nothing", b"{}", 404, b'{"detail":"Not Found"}'),
    ("POST", "/sleep", b"", 404, b'{"detail":"Not Found"}'),
]  # fmt: skip
VLLM_POOLING_ERRORS = [
    ("POST", "/v1/embeddings", b'{"model":"minilm","input":"Hello","dimensions":8}', 400, b'{"error":{"message":"Model \'minilm\' does not support Matryoshka embeddings; dimensions must be unset (received dimensions=8).","type":"BadRequestError","param":null,"code":400}}'),
    ("POST", "/v1/embeddings", b'{"model":"nope","input":"Hi"}', 404, b'{"error":{"message":"The model `nope` does not exist.","type":"NotFoundError","param":null,"code":404}}'),
    ("POST", "/v1/embeddings", orjson.dumps({"model": "minilm", "input": "hello " * 600}), 400, b'{"error":{"message":"This model\'s maximum context length is 256 tokens. However, your prompt contains at least 257 input tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. (parameter=input_tokens, value=257)","type":"BadRequestError","param":"input_tokens","code":400}}'),
    ("POST", "/v1/chat/completions", b'{"model":"minilm","messages":[{"role":"user","content":"Hi"}]}', 404, b'{"detail":"Not Found"}'),
    ("POST", "/v1/messages", b'{"model":"minilm","max_tokens":5,"messages":[{"role":"user","content":"Hi"}]}', 404, b'{"detail":"Not Found"}'),
    ("POST", "/v1/responses", b'{"model":"minilm","input":"Hi"}', 404, b'{"detail":"Not Found"}'),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "content", "status", "expected"), VLLM_ERRORS)
async def test_generate_server_errors_are_vllms_bytes(
    client: httpx.AsyncClient,
    sim: Any,
    method: str,
    path: str,
    content: bytes,
    status: int,
    expected: bytes,
) -> None:
    sim.configure(models=("smol",), max_model_len=2048)
    r = await client.request(
        method, path, content=content, headers={"content-type": "application/json"}
    )
    assert (r.status_code, r.content) == (status, expected)
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize(("method", "path", "content", "status", "expected"), VLLM_POOLING_ERRORS)
async def test_pooling_server_errors_are_vllms_bytes(
    client: httpx.AsyncClient,
    sim: Any,
    method: str,
    path: str,
    content: bytes,
    status: int,
    expected: bytes,
) -> None:
    sim.configure(models=("minilm",), max_model_len=256, runner="pooling")
    r = await client.request(
        method, path, content=content, headers={"content-type": "application/json"}
    )
    assert (r.status_code, r.content) == (status, expected)


async def test_background_without_store_is_vllms_bytes(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(models=("smol",), responses_store=False)
    r = await client.post(
        "/v1/responses", content=b'{"model":"smol","input":"Hi","background":true}'
    )
    assert r.status_code == 400
    assert r.content == (
        b'{"error":{"message":"This vLLM engine does not support `store=True` and therefore does not '
        b"support the background mode. To enable these features, set the environment variable "
        b'`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.","type":"invalid_request_error",'
        b'"param":"background","code":400}}'
    )


# --- the fault knobs on the new generation routes ----------------------------------------------------------
STREAMS = [
    ("/v1/responses", {**RESP, "stream": True}),
    ("/v1/messages", {**MSG, "stream": True}),
    ("/v1/audio/transcriptions", None),
]


def open_stream(client: httpx.AsyncClient, path: str, body: dict[str, Any] | None) -> Any:
    if body is None:  # multipart
        return client.stream(
            "POST", path, files={"file": ("a.wav", b"\0" * 64)}, data={"stream": "true"}
        )
    return client.stream("POST", path, json=body)


@pytest.mark.parametrize(("path", "body"), STREAMS)
async def test_drop_after_cuts_new_streams(
    client: httpx.AsyncClient, sim: Any, path: str, body: Any
) -> None:
    sim.configure(drop_after=5)
    async with open_stream(client, path, body) as r:
        assert r.status_code == 200
        received = await read_until_cut(r)
    assert len(named(received.decode())) == 5
    stats = sim.stats()
    assert (stats["dropped"], stats["running"], stats["routes"][path]["dropped"]) == (1, 0, 1)


@pytest.mark.parametrize(("path", "body"), STREAMS)
async def test_stall_after_holds_new_streams(sim: Any, path: str, body: Any) -> None:
    sim.configure(stall_after=3)
    received = b""
    async with (
        httpx.AsyncClient(base_url=sim.url, timeout=httpx.Timeout(10, read=0.5)) as c,
        open_stream(c, path, body) as r,
    ):
        with pytest.raises(httpx.ReadTimeout):
            async for piece in r.aiter_raw():
                received += piece
    assert len(named(received.decode())) == 3
    await wait_for(lambda: sim.stats()["aborted"] == 1)
    assert sim.stats()["routes"][path]["aborted"] == 1 and sim.stats()["running"] == 0


@pytest.mark.parametrize(
    ("path", "body", "terminal"),
    [("/v1/responses", {**RESP, "stream": True}, "response.completed"),
     ("/v1/messages", {**MSG, "stream": True}, "message_stop")],
)  # fmt: skip
async def test_no_done_leaves_out_the_terminal_event(
    client: httpx.AsyncClient, sim: Any, path: str, body: dict[str, Any], terminal: str
) -> None:
    sim.configure(malformed="no_done")
    async with client.stream("POST", path, json=body) as r:
        events = named((await r.aread()).decode())  # a clean chunked end
    names = [n for n, _ in events]
    assert terminal not in names and len(names) > FAST.tokens
    assert sim.stats()["completed"] == 1


@pytest.mark.parametrize(("path", "body"), STREAMS[:2])
async def test_bad_json_and_html_on_new_streams(
    client: httpx.AsyncClient, sim: Any, path: str, body: Any
) -> None:
    sim.configure(malformed="bad_json")
    async with client.stream("POST", path, json=body) as r:
        events = named((await r.aread()).decode())
    assert (None, "{not json") in events[4:-2]
    sim.configure(malformed="html")
    r = await client.post(path, json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    ("path", "body", "envelope"),
    [("/v1/responses", RESP, "openai"), ("/v1/messages", MSG, "anthropic"),
     ("/v1/chat/completions/batch", {"messages": [[{"role": "user", "content": "x"}]]}, "openai")],
)  # fmt: skip
async def test_status_and_traceback_faults_use_each_routes_envelope(
    client: httpx.AsyncClient, sim: Any, path: str, body: dict[str, Any], envelope: str
) -> None:
    r = await client.post(path, json={**body, "stream": True, "vllm_sim": {"status": 503}})
    assert r.status_code == 503
    if envelope == "anthropic":
        assert r.json() == {"type": "error", "error": {"type": "ServiceUnavailableError",
                                                       "message": "simulated error (status 503)"}}  # fmt: skip
    else:
        assert (
            r.json()["error"]["type"] == "ServiceUnavailableError"
            and r.json()["error"]["code"] == 503
        )
    trace = await client.post(path, json={**body, "vllm_sim": {"error_traceback": True}})
    assert trace.status_code == 500 and "/opt/vllm/" in trace.text
    assert sim.stats()["routes"][path]["failed"] == 2


async def test_responses_sdk_sees_a_cut_and_a_missing_completed(sim: Any) -> None:
    import openai

    sdk = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)
    try:
        sim.configure(drop_after=6)
        with pytest.raises(openai.APIConnectionError):
            async for _ in await sdk.responses.create(model="sim-model", input="hi", stream=True):
                pass
        sim.configure(drop_after=None, malformed="no_done")
        async with sdk.responses.stream(model="sim-model", input="hi") as stream:
            async for _ in stream:
                pass
            with pytest.raises(RuntimeError, match=r"response\.completed"):
                await stream.get_final_response()
    finally:
        await sdk.close()


async def test_messages_sdk_sees_a_cut(sim: Any) -> None:
    import anthropic
    import httpx2

    sim.configure(drop_after=4)
    sdk = anthropic.AsyncAnthropic(base_url=sim.url, api_key="unused", max_retries=0)
    try:
        with pytest.raises(httpx2.RemoteProtocolError):
            async with sdk.messages.stream(
                model="sim-model", max_tokens=64, messages=HELLO
            ) as stream:
                async for _ in stream.text_stream:
                    pass
    finally:
        await sdk.close()
    assert sim.stats()["dropped"] == 1


@pytest.mark.parametrize(("path", "body"), [("/v1/responses", RESP), ("/v1/messages", MSG)])
async def test_hang_on_new_routes(sim: Any, path: str, body: dict[str, Any]) -> None:
    sim.configure(hang=True)
    async with httpx.AsyncClient(base_url=sim.url, timeout=httpx.Timeout(10, read=0.5)) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(path, json={**body, "stream": True})
    await wait_for(lambda: sim.stats()["aborted"] == 1)
    assert sim.stats()["requests"][-1]["fault"] == "hang"


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/responses", {**RESP, "stream": True}), ("/v1/messages", {**MSG, "stream": True}),
     ("/v1/responses", RESP), ("/v1/messages", MSG)],
)  # fmt: skip
async def test_client_leaving_aborts_new_routes_at_once(
    sim: Any, path: str, body: dict[str, Any]
) -> None:
    sim.configure(tokens=1000, itl=0.01, ttft=0.0)
    raw = orjson.dumps({**body, "max_tokens": 1000})
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(
        b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b"
        % (path.encode(), len(raw), raw)
    )
    if body.get("stream"):
        await reader.readuntil(b"delta")
    else:
        await wait_for(lambda: sim.stats()["running"] == 1)
    assert sim.stats()["running"] == 1
    writer.close()
    await writer.wait_closed()
    closed_at = time.monotonic()
    await wait_for(lambda: sim.stats()["aborted"] == 1)
    assert time.monotonic() - closed_at < 2.0
    assert sim.stats()["running"] == 0 and sim.stats()["routes"][path]["aborted"] == 1


async def test_running_gauge_counts_a_messages_stream(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(stall_after=2)
    async with client.stream("POST", "/v1/messages", json={**MSG, "stream": True}) as r:
        pieces = r.aiter_raw()
        await pieces.__anext__()
        async with httpx.AsyncClient(base_url=sim.url) as other:
            metrics = (await other.get("/metrics")).text
            routes = (await other.get("/sim/stats")).json()["routes"]
    assert 'vllm:num_requests_running{model_name="sim-model",engine="0"} 1.0' in metrics
    assert routes["/v1/messages"]["running"] == 1
    await wait_for(lambda: sim.stats()["running"] == 0)


# --- pooling -----------------------------------------------------------------------------------------------
@pytest.fixture
async def pooling(sim: Any) -> Any:
    sim.configure(runner="pooling")
    return sim


async def test_runner_picks_the_route_family(client: httpx.AsyncClient, sim: Any) -> None:
    assert (await client.post("/v1/embeddings", json={"input": "x"})).status_code == 404
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    sim.configure(runner="pooling")
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/responses", RESP), ("/v1/messages", MSG),
                       ("/v1/completions", {"prompt": "x"}), ("/v1/audio/transcriptions", {})):  # fmt: skip
        r = await client.post(path, json=body)
        assert (r.status_code, r.content) == (404, b'{"detail":"Not Found"}'), path
    assert (await client.post("/v1/embeddings", json={"input": "x"})).status_code == 200
    assert (await client.post("/tokenize", json={"prompt": "x"})).status_code == 200  # on both


async def test_embeddings_are_deterministic_and_match_the_sdk(
    client: httpx.AsyncClient, pooling: Any
) -> None:
    from openai import AsyncOpenAI

    from vllm_gateway_tools.simulator.render_pooling import embed, f32

    r = await client.post("/v1/embeddings", json={"input": ["a cat", "a dog"]})
    body = r.json()
    assert body["id"].startswith("embd-") and body["object"] == "list"
    vectors = [d["embedding"] for d in body["data"]]
    # Printed as float32's shortest decimals (as vLLM does), they read back as the same float32.
    assert [[f32(x) for x in v] for v in vectors] == [embed("a cat"), embed("a dog")]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-6 and len(v) == 8 for v in vectors)
    tokens = (await client.post("/tokenize", json={"prompt": "a cat"})).json()["count"]
    tokens += (await client.post("/tokenize", json={"prompt": "a dog"})).json()["count"]
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                             "prompt_tokens_details": None, "completion_tokens_details": None}  # fmt: skip
    sdk = AsyncOpenAI(base_url=pooling.url + "/v1", api_key="unused", max_retries=0)
    try:  # the SDK asks for base64 and decodes it
        result = await sdk.embeddings.create(model="sim-model", input=["a cat", "a dog"])
    finally:
        await sdk.close()
    assert [d.embedding for d in result.data] == [embed("a cat"), embed("a dog")]


async def test_v2_embed_pooling_and_classify(client: httpx.AsyncClient, pooling: Any) -> None:
    from vllm_gateway_tools.simulator.render_pooling import embed, probability

    v2 = (
        await client.post("/v2/embed", json={"texts": ["x"], "embedding_types": ["float"]})
    ).json()
    assert (
        v2["embeddings"] == {"float": [embed("x")]} and v2["response_type"] == "embeddings_by_type"
    )
    bad = await client.post("/v2/embed", json={"texts": ["x"], "embedding_types": ["int4"]})
    assert bad.status_code == 400
    pooled = (await client.post("/pooling", json={"input": "x"})).json()
    assert pooled["id"].startswith("pooling-") and pooled["data"][0] == {"index": 0, "object": "pooling",
                                                                         "data": embed("x")}  # fmt: skip
    classified = (await client.post("/classify", json={"input": ["x", "y"]})).json()
    assert [(d["label"], d["probs"], d["num_classes"]) for d in classified["data"]] == [
        ("LABEL_0", [probability("x")], 1), ("LABEL_0", [probability("y")], 1)]  # fmt: skip


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
async def test_score_is_the_cosine(client: httpx.AsyncClient, pooling: Any, path: str) -> None:
    body = (
        await client.post(path, json={"queries": "cat", "documents": ["cat", "stock market"]})
    ).json()
    scores = [d["score"] for d in body["data"]]
    assert abs(scores[0] - 1.0) < 1e-6 and scores[1] < scores[0]
    legacy = (
        await client.post(path, json={"text_1": "cat", "text_2": ["cat", "stock market"]})
    ).json()
    assert [d["score"] for d in legacy["data"]] == scores
    assert body["id"].startswith("score-") and body["object"] == "list"


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
async def test_rerank_sorts_and_cuts(client: httpx.AsyncClient, pooling: Any, path: str) -> None:
    docs = ["stock market", "cat", "weather"]
    body = (await client.post(path, json={"query": "cat", "documents": docs})).json()
    assert body["results"][0]["index"] == 1  # the identical text first
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert body["results"][0]["document"] == {"text": "cat", "multi_modal": None}
    top = (await client.post(path, json={"query": "cat", "documents": docs, "top_n": 1})).json()
    assert top["results"] == body["results"][:1]
    assert list(body) == ["id", "model", "usage", "results"]


async def test_pooling_obeys_the_pace_and_faults(client: httpx.AsyncClient, pooling: Any) -> None:
    pooling.configure(ttft=0.2)
    start = time.monotonic()
    assert (await client.post("/v1/embeddings", json={"input": "x"})).status_code == 200
    assert time.monotonic() - start >= 0.2 - 0.01
    pooling.configure(ttft=0.0)
    r = await client.post("/v1/embeddings", json={"input": "x", "vllm_sim": {"status": 503}})
    assert r.status_code == 503
    pooling.configure(drop_after=0)
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/rerank", json={"query": "x", "documents": ["y"]})
    routes = pooling.stats()["routes"]
    assert (routes["/v1/embeddings"]["failed"], routes["/rerank"]["dropped"]) == (1, 1)


# --- tokenize, batch ----------------------------------------------------------------------------------------
async def test_tokenize_agrees_with_usage(client: httpx.AsyncClient) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is a cat?"},
    ]
    chat = (await client.post("/v1/chat/completions", json={"messages": messages})).json()
    counted = (await client.post("/tokenize", json={"messages": messages})).json()
    assert counted["count"] == len(counted["tokens"]) == chat["usage"]["prompt_tokens"]
    assert counted["max_model_len"] == FAST.max_model_len and counted["token_strs"] is None
    message_usage = (await client.post("/v1/messages", json={**MSG, "system": "be brief",
                                                             "messages": messages[1:]})).json()  # fmt: skip
    count = (await client.post("/v1/messages/count_tokens", json={"model": "sim-model", "system": "be brief",
                                                                  "messages": messages[1:]})).json()  # fmt: skip
    assert count["input_tokens"] == message_usage["usage"]["input_tokens"] == counted["count"]
    prompt = (
        await client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    ).json()
    assert "".join(prompt["token_strs"]) == "Hello world"
    back = (await client.post("/detokenize", json={"tokens": prompt["tokens"]})).json()
    assert back == {"prompt": "Hello world"}
    completion = (await client.post("/v1/completions", json={"prompt": "Hello world"})).json()
    assert completion["usage"]["prompt_tokens"] == prompt["count"]


async def test_tokenize_is_open_with_an_api_key(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(api_key="k", runner="pooling")
    assert (await client.post("/tokenize", json={"prompt": "x"})).status_code == 200
    assert (await client.post("/pooling", json={"input": "x"})).status_code == 200
    assert (
        await client.post("/rerank", json={"query": "x", "documents": ["y"]})
    ).status_code == 200
    assert (await client.post("/v2/embed", json={"texts": ["x"]})).status_code == 401
    assert (
        await client.post("/v2/rerank", json={"query": "x", "documents": ["y"]})
    ).status_code == 401


async def test_chat_batch(client: httpx.AsyncClient, sim: Any) -> None:
    conversations = [
        [{"role": "user", "content": "Capital of France?"}],
        [{"role": "user", "content": "Italy?"}],
    ]
    r = await client.post("/v1/chat/completions/batch", json={"max_tokens": 3, "messages": conversations,
                                                               "stream": True})  # fmt: skip
    body = r.json()  # stream is ignored: always one JSON body
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(
        c["message"]["content"] == render_text(3) and c["finish_reason"] == "length"
        for c in body["choices"]
    )
    singles = [(await client.post("/v1/chat/completions", json={"messages": c})).json()["usage"]["prompt_tokens"]
               for c in conversations]  # fmt: skip
    assert (
        body["usage"]["prompt_tokens"] == sum(singles) and body["usage"]["completion_tokens"] == 6
    )
    bad = await client.post("/v1/chat/completions/batch", json={"messages": [[]]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "Bad Request"
    assert sim.stats()["routes"]["/v1/chat/completions/batch"] == {
        "total": 2, "running": 0, "completed": 1, "aborted": 0, "failed": 1, "dropped": 0}  # fmt: skip


# --- audio --------------------------------------------------------------------------------------------------
AUDIO = {"file": ("clip.wav", b"\0" * 64_000)}  # two seconds of 16 kHz 16-bit mono


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
async def test_audio_whole_and_stream(client: httpx.AsyncClient, path: str) -> None:
    translate = path.endswith("translations")
    r = await client.post(path, files=AUDIO, data={"model": "sim-model", "response_format": "text"})
    expected: dict[str, Any] = {"text": render_text(FAST.tokens)}
    if not translate:
        expected["usage"] = {"type": "duration", "seconds": 2}
    assert (r.status_code, r.json()) == (200, expected)
    async with client.stream(
        "POST", path, files=AUDIO, data={"stream": "true", "stream_include_usage": "true"}
    ) as r:
        evs = events((await r.aread()).decode())
    assert evs[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in evs[:-1]]
    obj = "translation.chunk" if translate else "transcription.chunk"
    assert {c["object"] for c in chunks} == {obj}
    assert chunks[0]["id"].startswith("translate-" if translate else "transcribe-")
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1]) == render_text(
        FAST.tokens
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == FAST.tokens


async def test_audio_openai_sdk(sim: Any) -> None:
    from openai import AsyncOpenAI

    sdk = AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)
    try:
        result = await sdk.audio.transcriptions.create(model="sim-model", file=AUDIO["file"])
    finally:
        await sdk.close()
    assert result.text == render_text(FAST.tokens)


async def test_audio_refuses_what_vllm_refuses(client: httpx.AsyncClient, sim: Any) -> None:
    path = "/v1/audio/transcriptions"
    as_json = await client.post(path, json={"model": "sim-model"})
    assert as_json.status_code == 400 and as_json.json()["error"]["param"] == "body.file"
    broken = await client.post(
        path, content=b"--B\r\nno end", headers={"content-type": "multipart/form-data; boundary=B"}
    )
    assert broken.status_code == 400
    assert broken.json()["error"]["message"] == "There was an error parsing the body"
    no_file = await client.post(path, data={"model": "sim-model"}, files={"other": ("x", b"1")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "body.file"
    verbose = await client.post(path, files=AUDIO, data={"response_format": "verbose_json"})
    assert verbose.status_code == 400 and "verbose_json" in verbose.json()["error"]["message"]
    srt = await client.post(path, files=AUDIO, data={"response_format": "srt"})
    assert srt.status_code == 400
    unknown = await client.post(path, files=AUDIO, data={"model": "nope"})
    assert unknown.status_code == 404
    knobs = await client.post(path, files=AUDIO, data={"vllm_sim": '{"tokens": 2}'})
    assert knobs.json()["text"] == render_text(2)  # per-request knobs ride in a form field
    assert sim.stats()["routes"][path]["failed"] == 6


# --- dev/admin routes ----------------------------------------------------------------------------------------
DEV_ROUTES = [("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"), ("POST", "/pause"),
              ("POST", "/resume"), ("GET", "/is_paused"), ("POST", "/reset_prefix_cache"),
              ("POST", "/collective_rpc"), ("GET", "/server_info"), ("POST", "/v1/load_lora_adapter"),
              ("POST", "/v1/unload_lora_adapter")]  # fmt: skip


async def test_dev_routes_exist_only_in_dev_mode(client: httpx.AsyncClient, sim: Any) -> None:
    for method, path in DEV_ROUTES:
        r = await client.request(method, path)
        assert (r.status_code, r.content) == (404, b'{"detail":"Not Found"}'), path
    sim.configure(dev_mode=True)
    for method, path in DEV_ROUTES:
        assert (await client.request(method, path)).status_code != 404, path
    assert [a["path"] for a in sim.stats()["admin"]] == [p for _, p in DEV_ROUTES]


async def test_dev_route_bodies(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(dev_mode=True)
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
    assert (await client.post("/sleep?level=1")).json() == {"status": "sleeping", "level": 1}
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
    assert (await client.post("/wake_up?tags=weights")).json() == {
        "status": "sleeping",
        "tags": ["weights"],
    }
    assert (await client.post("/wake_up")).json() == {"status": "awake", "tags": None}
    assert (await client.post("/pause?mode=keep")).json() == {"status": "paused"}
    assert (await client.get("/is_paused")).json() == {"is_paused": True}
    assert (await client.post("/resume")).json() == {"status": "resumed"}
    assert (await client.get("/is_paused")).json() == {"is_paused": False}
    assert (await client.post("/pause?mode=later")).status_code == 400
    assert (await client.post("/sleep?level=3")).status_code == 400
    assert (await client.post("/reset_prefix_cache")).json() == {"success": True}
    assert (await client.post("/collective_rpc", json={"method": "echo"})).json() == {
        "results": [None]
    }
    missing = await client.post("/collective_rpc", json={})
    assert (
        missing.status_code == 400
        and missing.json()["error"]["message"] == "Missing 'method' in request body"
    )
    info = (await client.get("/server_info")).json()
    assert (
        list(info) == ["vllm_config", "vllm_env", "system_env"]
        and "sim-model" in info["vllm_config"]
    )
    admin = sim.stats()["admin"]
    assert admin[1] == {
        **admin[1],
        "method": "POST",
        "path": "/sleep",
        "query": "level=1",
        "status": 200,
    }


async def test_lora_adapters(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(dev_mode=True, api_key="k")
    auth = {"Authorization": "Bearer k"}
    loaded = await client.post(
        "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/tmp/sql"}, headers=auth
    )
    assert (loaded.status_code, loaded.text) == (
        200,
        "Success: LoRA adapter 'sql' added successfully.",
    )
    assert "content-type" not in loaded.headers
    models = (await client.get("/v1/models", headers=auth)).json()["data"]
    assert [(m["id"], m["root"], m["parent"]) for m in models] == [
        ("sim-model", "sim-model", None), ("sql", "/tmp/sql", "sim-model")]  # fmt: skip
    chat = await client.post("/v1/chat/completions", json={**CHAT, "model": "sql"}, headers=auth)
    assert chat.status_code == 200 and chat.json()["model"] == "sql"
    again = await client.post(
        "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/x"}, headers=auth
    )
    assert again.status_code == 400 and again.json()["error"]["type"] == "InvalidUserInput"
    gone = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=auth)
    assert (gone.status_code, gone.text) == (
        200,
        "Success: LoRA adapter 'sql' removed successfully.",
    )
    unknown = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=auth)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"
    assert (
        await client.post("/v1/load_lora_adapter", json={})
    ).status_code == 401  # /v1 wants the key


async def next_piece(pieces: Any) -> bytes:
    return bytes(await pieces.__anext__())


async def test_sleep_holds_new_requests_until_wake_up(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(dev_mode=True)
    await client.post("/sleep")
    async with (
        httpx.AsyncClient(base_url=sim.url, timeout=10) as stream_client,
        stream_client.stream("POST", "/v1/messages", json={**MSG, "stream": True}) as r,
    ):
        assert r.status_code == 200  # the head comes at once, as vLLM sends it
        pieces = r.aiter_raw()
        first = asyncio.ensure_future(next_piece(pieces))
        await wait_for(lambda: sim.stats()["held"] == 1)
        done, _ = await asyncio.wait({first}, timeout=0.3)
        assert not done  # nothing while the engine sleeps (vLLM sends not even message_start)
        metrics = (await client.get("/metrics")).text
        assert 'vllm:num_requests_running{model_name="sim-model",engine="0"} 0.0' in metrics
        assert sim.stats()["running"] == 1
        assert (await client.post("/wake_up")).json()["status"] == "awake"
        body = await asyncio.wait_for(first, 5) + b"".join([p async for p in pieces])
    names = [n for n, _ in named(body.decode())]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert sim.stats()["completed"] == 1 and sim.stats()["held"] == 0


async def test_pause_holds_a_responses_stream_after_its_first_events(
    client: httpx.AsyncClient, sim: Any
) -> None:
    sim.configure(dev_mode=True)
    await client.post("/pause?mode=keep")
    async with (
        httpx.AsyncClient(base_url=sim.url, timeout=10) as c,
        c.stream("POST", "/v1/responses", json={**RESP, "stream": True}) as r,
    ):
        pieces = r.aiter_raw()
        received = b""
        while received.count(b"\n\n") < 2:  # created and in_progress come while paused
            received += await next_piece(pieces)
        pending = asyncio.ensure_future(next_piece(pieces))
        done, _ = await asyncio.wait({pending}, timeout=0.3)
        assert not done and sim.stats()["held"] == 1
        await client.post("/resume")
        received += await asyncio.wait_for(pending, 5) + b"".join([p async for p in pieces])
    names = [n for n, _ in named(received.decode())]
    assert (
        names == RESPONSE_EVENTS + ["response.output_text.delta"] * FAST.tokens + RESPONSE_CLOSING
    )


async def test_pause_keep_freezes_a_running_stream(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(dev_mode=True, itl=0.02, tokens=20)
    async with (
        httpx.AsyncClient(base_url=sim.url, timeout=10) as c,
        c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        pieces = r.aiter_raw()
        received = await next_piece(pieces)
        assert (await client.post("/pause?mode=keep")).json() == {"status": "paused"}
        # Chunks sent before the pause may still be on their way: read until 0.3 s pass with
        # nothing new, which must happen long before the 20 tokens are all out.
        for _ in range(25):
            pending = asyncio.ensure_future(next_piece(pieces))
            done, _ = await asyncio.wait({pending}, timeout=0.3)
            if not done:
                break
            received += pending.result()
        assert not done and sim.stats()["held"] == 1
        assert received.count(b'"content":" tok') < 20
        await client.post("/resume")
        received += await asyncio.wait_for(pending, 5) + b"".join([p async for p in pieces])
    evs = events(received.decode())
    content = [orjson.loads(e)["choices"][0]["delta"]["content"] for e in evs[1:-1]]
    assert content == [f" tok{i}" for i in range(20)] and evs[-1] == "[DONE]"


async def test_pause_abort_ends_running_requests(client: httpx.AsyncClient, sim: Any) -> None:
    sim.configure(dev_mode=True, itl=0.01, tokens=1000)
    async with (
        httpx.AsyncClient(base_url=sim.url, timeout=10) as c,
        c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        pieces = r.aiter_raw()
        received = await next_piece(pieces)
        assert (await client.post("/pause")).json() == {"status": "paused"}  # mode=abort
        received += b"".join([p async for p in pieces])
    evs = events(received.decode())
    assert evs[-1] == "[DONE]"
    assert orjson.loads(evs[-2])["choices"][0]["finish_reason"] == "abort"
    assert len(evs) < 1000
    assert (sim.stats()["aborted"], sim.stats()["running"]) == (1, 0)
    await client.post("/resume")


async def test_pause_wait_answers_once_running_requests_end(
    client: httpx.AsyncClient, sim: Any
) -> None:
    sim.configure(dev_mode=True)
    slow = asyncio.ensure_future(
        client.post("/v1/chat/completions", json={**CHAT, "vllm_sim": {"ttft": 0.3}})
    )
    await wait_for(lambda: sim.stats()["running"] == 1)
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
        paused = await c.post("/pause?mode=wait")
    chat = await slow
    assert (paused.json(), chat.status_code) == ({"status": "paused"}, 200)
    ended = sim.stats()["requests"][-1]["ended"]
    assert sim.stats()["admin"][-1]["time"] >= ended  # answered after the request ended
    await client.post("/resume")
