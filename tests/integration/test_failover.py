"""Mid-stream failover across a pool of simulators: a member that dies at any chunk of a stream
does not break it. The client gets one whole, well-formed stream (one id, one role delta, one
finish_reason, one [DONE], usage that adds up), and the continuation asks the other member for
exactly what was relayed so far.

The simulator numbers its output tokens (`` tok0``, `` tok1``, ...) and, given a prompt of token
ids that ends in its own output ids, goes on from the next one, as a model continues its answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import run_gateway, sse_blocks, wait_for
from vllm_gateway.settings import PoolSettings, Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator
from vllm_gateway_tools.simulator.tokenizer import OUTPUT_BASE

pytestmark = pytest.mark.timeout(60)

TOKENS = 8


@contextlib.asynccontextmanager
async def pool(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[Simulator, Simulator, Any]]:
    """A gateway in front of two simulators; the first (weight 100) gets every fresh request."""
    config = SimulatorConfig(ttft=0.005, itl=0.002, tokens=TOKENS)
    async with run_simulator(config) as first, run_simulator(config) as second:
        path = tmp_path / "backends.yaml"
        path.write_text(
            "backends:\n"
            f"  - url: {first.url}\n    name: first\n    weight: 100\n"
            f"  - url: {second.url}\n    name: second\n"
        )
        async with run_gateway(
            Settings(backends_file=str(path), backend_urls=(), **settings)
        ) as gw:
            yield first, second, gw


def _data(raw: bytes) -> list[Any]:
    out = []
    for event in sse_blocks(raw):
        if event.startswith(b"data: "):
            payload = event[6:]
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


async def _stream(url: str, path: str, body: dict[str, Any]) -> bytes:
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", url + path, json=body) as resp,
    ):
        assert resp.status_code == 200
        return b"".join([c async for c in resp.aiter_raw()])


CHAT_BODY = {
    "model": "sim-model",
    "messages": [{"role": "user", "content": "hello there"}],
    "stream": True,
    "max_tokens": TOKENS,
    "stream_options": {"include_usage": True},
}


@pytest.mark.parametrize("cut", range(1, TOKENS + 2))
async def test_a_chat_stream_survives_its_member_dying_at_any_chunk(
    tmp_path: Path, cut: int
) -> None:
    async with pool(tmp_path) as (first, second, gw):
        first.configure(drop_after=cut)  # the role chunk is event 1, then one per token
        raw = await _stream(gw.url, "/v1/chat/completions", CHAT_BODY)
        await wait_for(lambda: gw.gateway.admission.in_flight == 0)
    events = _data(raw)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {"sim-model"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert len(roles) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "".join(f" tok{i}" for i in range(TOKENS))  # whole, in order, once
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["length"]
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + TOKENS
    # Token ids are asked for upstream, not shown: the client's bytes are vLLM's own.
    assert b'"token_ids":[' not in raw and b'"prompt_token_ids":[' not in raw
    sent = cut - 1  # tokens relayed before the cut
    if sent < TOKENS:
        # The continuation asked the other member for the prompt and exactly those tokens.
        continuation = [r for r in second.stats()["requests"] if r["path"] == "/v1/completions"]
        assert len(continuation) == 1
        body = continuation[0]["body"]
        ids = body["prompt"]
        tail = [t - OUTPUT_BASE for t in ids if t >= OUTPUT_BASE]
        assert tail == list(range(sent))
        assert body["max_tokens"] == TOKENS - sent
    metrics = gw.app.observer.metrics.render()
    expected = "resumed" if sent < TOKENS else "completed_here"
    assert (
        f'vllm_gateway_failovers_total{{reason="connection_lost",outcome="{expected}"}} 1'
        in metrics
    )


async def test_a_completions_stream_survives_too(tmp_path: Path) -> None:
    async with pool(tmp_path) as (first, _, gw):
        first.configure(drop_after=3)
        raw = await _stream(
            gw.url,
            "/v1/completions",
            {"model": "sim-model", "prompt": "say", "stream": True, "max_tokens": TOKENS},
        )
    events = _data(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(
        f" tok{i}" for i in range(TOKENS)
    )


async def test_a_request_that_cannot_be_continued_ends_with_its_error_event(
    tmp_path: Path,
) -> None:
    async with pool(tmp_path) as (first, second, gw):
        first.configure(drop_after=3)
        raw = await _stream(
            gw.url,
            "/v1/chat/completions",
            {**CHAT_BODY, "response_format": {"type": "json_object"}},
        )
        assert b"data: [DONE]" not in raw
        assert b"backend_unavailable" in raw
        assert not [r for r in second.stats()["requests"] if r["path"] == "/v1/completions"]
        metrics = gw.app.observer.metrics.render()
    assert 'outcome="not_continued:structured"} 1' in metrics


async def test_failovers_are_bounded_per_stream(tmp_path: Path) -> None:
    async with pool(tmp_path, pool=PoolSettings(failover_max=1)) as (first, second, gw):
        first.configure(drop_after=2)
        second.configure(drop_after=2)  # the continuation dies too: no third member to try
        raw = await _stream(gw.url, "/v1/chat/completions", CHAT_BODY)
        metrics = gw.app.observer.metrics.render()
    assert b"data: [DONE]" not in raw
    assert raw.rstrip().endswith(b"}")  # the error event is the last
    assert 'outcome="resumed"} 1' in metrics
    assert 'outcome="not_continued:limit"} 1' in metrics or "not_continued:no_member" in metrics


async def test_an_ejected_member_s_streams_go_on_elsewhere_at_once(tmp_path: Path) -> None:
    async with pool(tmp_path) as (first, _, gw):
        first.configure(itl=0.2, tokens=TOKENS)  # slow, so the stream is mid-way when ejected
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("POST", gw.url + "/v1/chat/completions", json=CHAT_BODY) as resp,
        ):
            lines = resp.aiter_lines()
            seen = 0
            async for line in lines:
                if '"content":" tok' in line:
                    seen += 1
                    if seen == 2:
                        backend = gw.gateway.backend
                        member = next(m for m in backend.members if m.name == "first")
                        backend.fleet.eject(member, "test")
                        break
            rest = [line async for line in lines]
    text = "".join(rest)
    assert "data: [DONE]" in text
    assert " tok7" in text
    metrics = gw.app.observer.metrics.render()
    assert 'reason="ejected",outcome="resumed"} 1' in metrics
