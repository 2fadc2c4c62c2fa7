"""Tokens-per-minute limits charged from what a request really used, streams included.

A stream is charged from its own usage: vLLM's usage chunk, asked for when the client did not ask
(and then taken out of what it sees: its bytes stay vLLM's own), the final events of the Responses
and Messages streams; a stream cut before its usage is charged as far as the gateway can tell. The
budget charged up front is the field vLLM reads.

Every test reads a key's charge the way a client would: at 60 tokens a minute a token is a second,
and a request for a whole minute's allowance is refused with a Retry-After of exactly the seconds
(tokens) the key still owes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import RunningGateway, chat_body, run_gateway, sse_blocks, wait_for
from tests.integration.test_failover import pool
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"
TPM = 60.0  # a token a second
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sse"


async def owed(client: httpx.AsyncClient, gw: RunningGateway, model: str = "sim-model") -> int:
    """The tokens the (anonymous, loopback) key still owes, once every request has settled."""
    await wait_for(lambda: not gw.gateway.active)
    resp = await client.post(gw.url + CHAT, json=chat_body(max_tokens=int(TPM), model=model))
    assert resp.status_code == 429, (resp.status_code, resp.text)  # refused: charged nothing
    return int(resp.headers["retry-after"])


async def stream(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any]) -> bytes:
    async with client.stream("POST", url + path, json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        return b"".join([c async for c in resp.aiter_raw()])


@contextlib.asynccontextmanager
async def limited(config: SimulatorConfig, **settings: Any) -> AsyncIterator[Any]:
    async with (
        run_simulator(config) as sim,
        run_gateway(Settings(backend_urls=(sim.url,), rate_limit_tpm=TPM, **settings)) as gw,
        httpx.AsyncClient(timeout=30) as client,
    ):
        yield sim, gw, client


async def prompt_tokens(client: httpx.AsyncClient, sim: Simulator, body: dict[str, Any]) -> int:
    """What the backend counts for the prompt of ``body`` (asked of it directly)."""
    direct = await client.post(sim.url + CHAT, json={**body, "stream": False, "max_tokens": 1})
    return int(direct.json()["usage"]["prompt_tokens"])


def _upstream_bodies(sim: Simulator) -> list[dict[str, Any]]:
    return [r["body"] for r in sim.stats()["requests"] if r["path"] == CHAT]


async def test_a_stream_without_a_budget_or_usage_is_charged_its_real_count() -> None:
    # The case: streams of 65 tokens, no max_tokens, no usage asked, all passed 100 TPM.
    async with limited(SimulatorConfig(ttft=0.005, itl=0.001, tokens=65)) as (sim, gw, client):
        body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
        prompt = await prompt_tokens(client, sim, body)
        headers = {"x-request-id": "same-id"}
        async with client.stream(
            "POST", gw.url + CHAT, json={**body, "stream": True}, headers=headers
        ) as resp:
            raw = b"".join([c async for c in resp.aiter_raw()])
        assert await owed(client, gw) == prompt + 65
        # The gateway asked vLLM for the usage; the client, which did not, never sees it: its bytes
        # are the ones the backend sends a request without the ask.
        assert _upstream_bodies(sim)[-1]["stream_options"] == {"include_usage": True}
        async with client.stream(
            "POST", sim.url + CHAT, json={**body, "stream": True}, headers=headers
        ) as direct:
            plain = b"".join([c async for c in direct.aiter_raw()])
        assert b'"usage"' not in raw and raw.endswith(b"data: [DONE]\n\n")
        assert raw.count(b'"content":" tok') == 65
        assert _normalised(raw) == _normalised(plain)
        # In debt past a minute: the next stream waits (before, every one of 8 passed).
        resp = await client.post(gw.url + CHAT, json={**body, "stream": True})
        assert resp.status_code == 429


def _normalised(raw: bytes) -> bytes:
    """A stream with its id and creation time made constant (two requests' own)."""
    return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb'"id":"[^"]*"', b'"id":""', raw))


async def test_a_client_that_asks_for_usage_gets_it_as_sent_and_is_charged_by_it() -> None:
    async with limited(SimulatorConfig(ttft=0.005, itl=0.001, tokens=8)) as (sim, gw, client):
        body = chat_body(stream=True, max_tokens=20, stream_options={"include_usage": True})
        prompt = await prompt_tokens(client, sim, body)
        raw = await stream(client, gw.url, CHAT, body)
        events = sse_blocks(raw)
        usage = orjson.loads(events[-2][6:])
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
        assert _upstream_bodies(sim)[-1]["stream_options"] == {"include_usage": True}
        assert await owed(client, gw) == prompt + 20


async def test_the_up_front_charge_is_the_budget_vllm_uses() -> None:
    # vLLM generates max_completion_tokens when both are sent: the charge at admission must be
    # that one, not max_tokens (which let a 1-token charge run 50 tokens).
    async with limited(SimulatorConfig(ttft=0.005, itl=0.05)) as (sim, gw, client):
        body = chat_body(stream=True, max_tokens=1, max_completion_tokens=50)
        started = time.monotonic()
        async with client.stream("POST", gw.url + CHAT, json=body) as resp:
            lines = resp.aiter_lines()
            async for line in lines:
                if '"content":" tok1"' in line:
                    break
            # Mid-stream, the key owes the 50 it reserved (less the seconds gone by).
            probe = await client.post(gw.url + CHAT, json=chat_body(max_tokens=int(TPM)))
            assert probe.status_code == 429
            elapsed = time.monotonic() - started
            assert 50 - elapsed - 1 <= int(probe.headers["retry-after"]) <= 50
            rest = "".join([line async for line in lines])
        assert "data: [DONE]" in rest
        prompt = await prompt_tokens(client, sim, body)
        elapsed = time.monotonic() - started
        assert prompt + 50 - elapsed - 1 <= await owed(client, gw) <= prompt + 50


async def test_a_budget_above_the_allowance_is_settled_to_what_was_used() -> None:
    # 200 asked, 60 (the whole allowance) charged at admission: the settlement charges the rest of
    # what was used, not "used - asked" (which refunded tokens never charged).
    async with limited(SimulatorConfig(ttft=0.005, itl=0.001)) as (sim, gw, client):
        body = chat_body(stream=True, max_tokens=200)
        prompt = await prompt_tokens(client, sim, body)
        started = time.monotonic()
        await stream(client, gw.url, CHAT, body)
        elapsed = time.monotonic() - started
        assert prompt + 200 - elapsed - 1 <= await owed(client, gw) <= prompt + 200
        non_stream = await client.post(gw.url + CHAT, json=chat_body(max_tokens=100))
        assert non_stream.status_code == 429  # still in debt


@pytest.mark.parametrize("budget", [None, 50])
async def test_a_stream_the_client_leaves_is_charged_what_was_relayed_or_its_budget(
    budget: int | None,
) -> None:
    async with limited(SimulatorConfig(ttft=0.005, itl=0.01, tokens=300)) as (sim, gw, client):
        body = chat_body(stream=True)
        if budget is None:
            del body["max_tokens"]
        else:
            body["max_tokens"] = budget
        seen = 0
        started = time.monotonic()
        async with client.stream("POST", gw.url + CHAT, json=body) as resp:
            async for line in resp.aiter_lines():
                seen += '"content":" tok' in line
                if seen == 30:
                    break  # the client leaves mid-stream
        await wait_for(lambda: sim.stats()["running"] == 0)
        charged = await owed(client, gw)
        elapsed = time.monotonic() - started
        if budget is None:
            # One token per content event relayed (at least the 30 read, the role chunk too).
            assert 30 - elapsed - 1 <= charged <= 300
        else:
            # The budget stands: a stream cut before its usage costs what asking for it did.
            assert budget - elapsed - 1 <= charged <= budget


async def test_a_request_that_never_reached_the_backend_is_refunded() -> None:
    async with limited(
        SimulatorConfig(ttft=0.005, itl=0.3, tokens=8),
        max_concurrent_requests=1,
        max_queued_requests=4,
        queue_wait_timeout=0.3,
    ) as (_sim, gw, client):
        async with client.stream("POST", gw.url + CHAT, json=chat_body(stream=True)) as resp:
            async for line in resp.aiter_lines():
                if "tok0" in line:
                    break
            # Queued behind it, then out of time: charged 40 at admission, refunded at its end.
            queued = await client.post(gw.url + CHAT, json=chat_body(max_tokens=40))
            assert queued.status_code == 503
        # 8 (the stream's budget, the stream cut by its client) and nothing for the refused one.
        assert 6 <= await owed(client, gw) <= 8


async def test_responses_and_messages_streams_are_charged_from_their_final_events() -> None:
    async with limited(SimulatorConfig(ttft=0.005, itl=0.001, tokens=40)) as (_sim, gw, client):
        raw = await stream(
            client, gw.url, "/v1/responses", {"model": "sim-model", "input": "hi", "stream": True}
        )
        final = orjson.loads(raw.split(b"event: response.completed\ndata: ")[1].split(b"\n")[0])
        usage = final["response"]["usage"]
        assert usage["output_tokens"] == 40
        assert await owed(client, gw) == usage["input_tokens"] + 40
    async with limited(SimulatorConfig(ttft=0.005, itl=0.001)) as (_sim, gw, client):
        body = {
            "model": "sim-model",
            "max_tokens": 30,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        started = time.monotonic()
        raw = await stream(client, gw.url, "/v1/messages", body)
        delta = orjson.loads(raw.split(b"event: message_delta\ndata: ")[1].split(b"\n")[0])
        spent = delta["usage"]["input_tokens"] + delta["usage"]["output_tokens"]
        elapsed = time.monotonic() - started
        assert spent - elapsed - 1 <= await owed(client, gw) <= spent


async def test_a_stream_continued_on_another_member_is_charged_its_exact_ids(
    tmp_path: Path,
) -> None:
    async with pool(tmp_path, rate_limit_tpm=TPM) as (first, second, gw):
        first.configure(drop_after=4)
        body = {
            "model": "sim-model",
            "messages": [{"role": "user", "content": "hello there"}],
            "stream": True,
            "max_tokens": 8,
        }
        async with httpx.AsyncClient(timeout=30) as client:
            raw = await stream(client, gw.url, CHAT, body)
            metrics = gw.app.observer.metrics.render()
            assert 'reason="connection_lost",outcome="resumed"} 1' in metrics
            text = b"".join(
                orjson.loads(e[6:])["choices"][0]["delta"].get("content", "").encode()
                for e in sse_blocks(raw)
                if e.startswith(b"data: {") and b'"choices":[{' in e
            )
            assert text == b"".join(b" tok%d" % i for i in range(8))
            assert b'"usage"' not in raw and raw.endswith(b"data: [DONE]\n\n")
            direct = await client.post(
                second.url + CHAT, json={**body, "stream": False, "max_tokens": 1}
            )
            prompt = direct.json()["usage"]["prompt_tokens"]
            assert prompt + 8 - 2 <= await owed(client, gw) <= prompt + 8


# --- vLLM's own bytes: its system_fingerprint moves when usage is asked for ---------------------


def _fixture_events() -> list[bytes]:
    raw = (FIXTURES / "chat_ok.sse").read_bytes()
    return [e + b"\n\n" for e in sse_blocks(raw)]


ASKED = _fixture_events()  # captured from vLLM 0.32 with include_usage
USAGE_EVENT = ASKED[-2]
FINGERPRINT = orjson.loads(USAGE_EVENT[6:])["system_fingerprint"]
# What vLLM sends the same request without the ask: the fingerprint on the finished chunk (its last
# field), no usage chunk (vllm/entrypoints/openai/chat_completion/serving.py).
PLAIN = [
    *ASKED[:-3],
    ASKED[-3][:-3] + b',"system_fingerprint":' + orjson.dumps(FINGERPRINT) + b"}\n\n",
    ASKED[-1],
]


class VllmReplay:
    """A backend that answers a chat stream with the captured vLLM stream: with its usage chunk
    when the request asks for one, else as vLLM sends it without. Each event is its own write
    (separate reads at the gateway); ``cut`` drops the connection after that many events."""

    def __init__(self, cut: int | None = None) -> None:
        self.cut = cut
        self.bodies: list[dict[str, Any]] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = orjson.loads(await reader.readexactly(length)) if length else {}
            if not head.startswith(b"POST"):
                answer = b'{"object":"list","data":[{"id":"smol","object":"model"}]}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
                return
            self.bodies.append(body)
            options = body.get("stream_options") or {}
            events = ASKED if options.get("include_usage") else PLAIN
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            )
            for i, event in enumerate(events):
                if i == self.cut:
                    await writer.drain()
                    return  # dropped: no terminating chunk
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.003)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[VllmReplay]:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self._server.close()


REPLAY_BODY = {
    "model": "smol",
    "messages": [{"role": "user", "content": "capital of France?"}],
    "stream": True,
    "max_tokens": 8,
}


async def test_the_client_gets_vllms_own_bytes_fingerprint_included() -> None:
    replay = VllmReplay()
    async with (
        replay.running(),
        run_gateway(Settings(backend_urls=(replay.url,), rate_limit_tpm=TPM)) as gw,
        httpx.AsyncClient(timeout=30) as client,
    ):
        raw = await stream(client, gw.url, CHAT, REPLAY_BODY)
        assert replay.bodies[-1]["stream_options"] == {"include_usage": True}
        assert raw == b"".join(PLAIN)
        assert FINGERPRINT.encode() in raw  # back on the finished chunk, where vLLM puts it
        usage = orjson.loads(USAGE_EVENT[6:])["usage"]
        spent = usage["prompt_tokens"] + usage["completion_tokens"]
        assert await owed(client, gw, "smol") == spent
        # A client that asks gets the usage chunk as vLLM sent it, and nothing is taken out.
        asked = await stream(
            client,
            gw.url,
            CHAT,
            {**REPLAY_BODY, "max_tokens": 1, "stream_options": {"include_usage": True}},
        )
        assert asked == b"".join(ASKED)


async def test_what_was_held_reaches_the_client_before_the_error_of_a_stream_cut_after_it() -> None:
    # Cut after the finished chunk, before the usage chunk: the finished chunk was being held for
    # the fingerprint; the client still gets it (as sent: no fingerprint came), then the error.
    replay = VllmReplay(cut=len(ASKED) - 2)
    async with (
        replay.running(),
        run_gateway(Settings(backend_urls=(replay.url,), rate_limit_tpm=TPM)) as gw,
        httpx.AsyncClient(timeout=30) as client,
    ):
        raw = await stream(client, gw.url, CHAT, REPLAY_BODY)
        sent = b"".join(ASKED[:-2])
        assert raw.startswith(sent)
        error = orjson.loads(raw[len(sent) :].split(b"data: ", 1)[1])
        assert error["error"]["type"] == "backend_unavailable"
        assert b"[DONE]" not in raw
        # Cut before its usage: charged its budget (8), or one token per content event relayed
        # (9: the role chunk is one), the prompt's tokens unknown to the gateway.
        assert 7 <= await owed(client, gw, "smol") <= 9


@pytest.mark.parametrize("cut", range(1, 12))
async def test_a_stream_cut_at_any_event_and_continued_looks_the_same_with_a_token_limit(
    tmp_path: Path, cut: int
) -> None:
    # The first member dies after ``cut`` events (role, 8 tokens, then, asked for by the gateway,
    # the usage chunk and [DONE]): the client's stream is the one it gets without a token limit,
    # and the key is charged the whole generation (the ids the failover tracked, or the usage).
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": True,
        "max_tokens": 8,
    }
    streams = []
    for settings in ({}, {"rate_limit_tpm": TPM}):
        async with pool(tmp_path, **settings) as (first, second, gw):
            first.configure(drop_after=cut)
            async with httpx.AsyncClient(timeout=30) as client:
                started = time.monotonic()
                streams.append(_normalised(await stream(client, gw.url, CHAT, body)))
                if settings:
                    direct = await client.post(
                        second.url + CHAT, json={**body, "stream": False, "max_tokens": 1}
                    )
                    prompt = direct.json()["usage"]["prompt_tokens"]
                    elapsed = time.monotonic() - started
                    assert prompt + 8 - elapsed - 1 <= await owed(client, gw) <= prompt + 8
    assert streams[0] == streams[1]
    assert streams[1].endswith(b"data: [DONE]\n\n") and b'"usage"' not in streams[1]
