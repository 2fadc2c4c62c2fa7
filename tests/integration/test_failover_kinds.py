"""Failover for the kinds of stream beyond one plain choice: several choices (``n`` > 1),
logprobs, continuous usage statistics. For each, a member killed at every event position of a
greedy stream leaves the client with the bytes of the unbroken stream: the same events, field for
field, and the usage added up as if nothing broke. Only the response id and ``created`` differ
between two requests; both are the first member's throughout the failed-over stream.

Several choices need sampling (vLLM refuses ``n`` > 1 with greedy decoding): the simulator's
sampled choices are deterministic and differ (`` tok3`` for the first, `` c1tok3`` for the
second), so each choice's events are compared with the unbroken stream's, byte for byte, in order,
and a continuation that mixed them up would show. How the choices interleave is the engine's
timing (vLLM interleaves them as its steps go), so that is compared as a set. A choice cut before
its first token is sampled afresh, so those cuts are left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import sse_blocks, wait_for
from tests.integration.test_failover import TOKENS, _stream, pool
from vllm_gateway_tools.simulator.tokenizer import IM_START, OUTPUT_BASE

pytestmark = pytest.mark.timeout(90)

_ID = re.compile(rb'"id":"[^"]*","object":"([^"]*)","created":\d+')


def _normal(raw: bytes) -> list[bytes]:
    """The stream's events, its id and ``created`` made the same for every request."""
    return [_ID.sub(rb'"id":"X","object":"\1","created":0', e) for e in sse_blocks(raw)]


def _index(event: bytes) -> int | None:
    if not event.startswith(b"data: {"):
        return None
    choices = orjson.loads(event[6:]).get("choices") or []
    return int(choices[0]["index"]) if choices else None


def _by_choice(events: list[bytes]) -> dict[int | None, list[bytes]]:
    out: dict[int | None, list[bytes]] = {}
    for event in events:
        out.setdefault(_index(event), []).append(event)
    return out


async def _unbroken_and_cut(
    tmp_path: Path,
    path: str,
    body: dict[str, Any],
    cut: int,
    normal: Callable[[bytes], list[bytes]] = _normal,
) -> tuple[list[bytes], list[bytes], str, list[Any]]:
    """The stream unbroken, the stream whose member died after ``cut`` events (both as
    ``normal`` makes them), the metrics, and the ``/v1/completions`` bodies the second member
    was sent."""
    async with pool(tmp_path) as (first, second, gw):
        whole = normal(await _stream(gw.url, path, body))
        first.configure(drop_after=cut)
        broken = normal(await _stream(gw.url, path, body))
        await wait_for(lambda: gw.gateway.admission.in_flight == 0)
        metrics = gw.app.observer.metrics.render()
        continued = [
            r["body"] for r in second.stats()["requests"] if r["path"] == "/v1/completions"
        ]
    return whole, broken, metrics, continued


def _assert_same_stream(whole: list[bytes], broken: list[bytes], cut: int, metrics: str) -> None:
    assert broken[-1] == b"data: [DONE]"
    assert _by_choice(broken) == _by_choice(whole)  # per choice, byte for byte, in order
    assert sorted(broken) == sorted(whole)
    assert len(broken) == len(whole)
    if cut < len(whole) - 1:
        assert (
            'vllm_gateway_failovers_total{reason="connection_lost",outcome="resumed"} 1'
            in (metrics)
            or 'outcome="completed_here"} 1' in metrics
        )


CHAT = {
    "model": "sim-model",
    "messages": [{"role": "user", "content": "hello there"}],
    "stream": True,
    "max_tokens": TOKENS,
    "temperature": 0,
}
COMPLETION = {
    "model": "sim-model",
    "prompt": "say something",
    "stream": True,
    "max_tokens": TOKENS,
    "temperature": 0,
}
USAGE = {"stream_options": {"include_usage": True}}
CONTINUOUS = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}

# Events of an unbroken stream: chat has a role chunk per choice, completions none; the usage
# chunk (when asked) and [DONE] close both.
_CHAT_N2 = 2 + 2 * TOKENS + 2


@pytest.mark.parametrize("cut", range(4, _CHAT_N2))  # after each choice's first token
async def test_a_chat_stream_of_two_choices_goes_on_choice_by_choice(
    tmp_path: Path, cut: int
) -> None:
    body = {**CHAT, "n": 2, "temperature": 1.0, **USAGE}
    whole, broken, metrics, _ = await _unbroken_and_cut(tmp_path, "/v1/chat/completions", body, cut)
    _assert_same_stream(whole, broken, cut, metrics)
    assert _texts(broken) == {
        0: "".join(f" tok{k}" for k in range(TOKENS)),
        1: "".join(f" c1tok{k}" for k in range(TOKENS)),
    }


def _texts(events: list[bytes]) -> dict[int, str]:
    return {
        i: "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in chosen)
        for i, chosen in _by_choice(events).items()
        if i is not None
    }


@pytest.mark.parametrize("cut", [3, 5, 7, 10, 13, 16, 23, 24, 25])
async def test_a_completions_stream_of_three_choices_goes_on(tmp_path: Path, cut: int) -> None:
    body = {**COMPLETION, "n": 3, "temperature": 1.0, **USAGE}
    whole, broken, metrics, _ = await _unbroken_and_cut(tmp_path, "/v1/completions", body, cut)
    _assert_same_stream(whole, broken, cut, metrics)


@pytest.mark.parametrize("cut", range(1, 1 + TOKENS + 1))
async def test_a_chat_stream_with_logprobs_keeps_their_shape(tmp_path: Path, cut: int) -> None:
    body = {**CHAT, "logprobs": True, "top_logprobs": 3, **USAGE}
    whole, broken, metrics, _ = await _unbroken_and_cut(tmp_path, "/v1/chat/completions", body, cut)
    _assert_same_stream(whole, broken, cut, metrics)
    content = orjson.loads(broken[3][6:])["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content[0]["top_logprobs"]] == [" tok2", " alt1", " alt2"]


@pytest.mark.parametrize("cut", range(1, TOKENS + 1))
async def test_a_completions_stream_with_logprobs_keeps_their_offsets(
    tmp_path: Path, cut: int
) -> None:
    body = {**COMPLETION, "logprobs": 2, **USAGE}
    whole, broken, metrics, _ = await _unbroken_and_cut(tmp_path, "/v1/completions", body, cut)
    _assert_same_stream(whole, broken, cut, metrics)
    offsets = [orjson.loads(e[6:])["choices"][0]["logprobs"]["text_offset"][0] for e in broken[:3]]
    assert offsets == [0, len(" tok0"), len(" tok0 tok1")]


@pytest.mark.parametrize("cut", range(1, 1 + TOKENS + 1))
async def test_a_chat_stream_with_continuous_usage_adds_it_up(tmp_path: Path, cut: int) -> None:
    body = {**CHAT, **CONTINUOUS}
    whole, broken, metrics, _ = await _unbroken_and_cut(tmp_path, "/v1/chat/completions", body, cut)
    _assert_same_stream(whole, broken, cut, metrics)
    last = orjson.loads(broken[-3][6:])
    assert last["usage"]["completion_tokens"] == TOKENS


@pytest.mark.parametrize("cut", [2, 3, 6, 9, 12, 16, 17])
async def test_every_kind_at_once(tmp_path: Path, cut: int) -> None:
    """Two choices with logprobs and continuous usage, on completions (offsets per choice)."""
    body = {**COMPLETION, "n": 2, "temperature": 1.0, "logprobs": 1, **CONTINUOUS}
    whole, broken, metrics, _ = await _unbroken_and_cut(tmp_path, "/v1/completions", body, cut)
    _assert_same_stream(whole, broken, cut, metrics)


async def test_greedy_decoding_with_several_choices_is_refused_as_vllm_refuses_it(
    tmp_path: Path,
) -> None:
    async with pool(tmp_path) as (_, _, gw), httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(gw.url + "/v1/chat/completions", json={**CHAT, "n": 2})
    assert resp.status_code == 400
    assert "n must be 1 when using greedy sampling" in resp.text


async def test_a_choice_further_along_ends_at_its_own_budget(tmp_path: Path) -> None:
    """Cut between the two choices' chunks of one step: the first choice is one token ahead, the
    continuation runs to the second's budget, and the first is ended at its own, with
    ``length``, as vLLM ends it."""
    body = {**CHAT, "n": 2, "temperature": 1.0, **USAGE}
    cut = 2 + 2 * 3 + 1  # the role chunks, three steps, and the first choice's fourth token
    async with pool(tmp_path) as (first, second, gw):
        whole = _normal(await _stream(gw.url, "/v1/chat/completions", body))
        first.configure(drop_after=cut)
        broken = _normal(await _stream(gw.url, "/v1/chat/completions", body))
        requests = [r for r in second.stats()["requests"] if r["path"] == "/v1/completions"]
    assert _by_choice(broken) == _by_choice(whole)
    assert len(requests) == 1  # one continuation for both choices: one prompt each
    prompts = requests[0]["body"]["prompt"]
    assert len(prompts) == 2 and len(prompts[0]) == len(prompts[1]) + 1
    assert requests[0]["body"]["max_tokens"] == TOKENS - 3


MESSAGES = {
    "model": "sim-model",
    "system": "be brief",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
    "max_tokens": 2 * TOKENS,  # the answer ends first (end_turn) ...
    "stream": True,
    "temperature": 0,
}
_MESSAGE_ID = re.compile(rb'"id":"[^"]*"')


def _assert_goes_on(continuation: dict[str, Any], sent: int) -> None:
    """The continuation's prompt: the conversation rendered by a member's /tokenize, then the
    answer's ids so far (``sent`` of them)."""
    assert continuation["prompt"][0] == IM_START
    assert [t for t in continuation["prompt"] if t >= OUTPUT_BASE] == [
        OUTPUT_BASE + k for k in range(sent)
    ]


def _messages_normal(raw: bytes) -> list[bytes]:
    return [_MESSAGE_ID.sub(b'"id":"X"', e) for e in sse_blocks(raw)]


@pytest.mark.parametrize("max_tokens", [2 * TOKENS, TOKENS - 2])  # ... or max_tokens does
@pytest.mark.parametrize("cut", range(1, TOKENS + 5))
async def test_a_messages_stream_goes_on_from_its_text(
    tmp_path: Path, cut: int, max_tokens: int
) -> None:
    """The prompt's ids and the answer's come from a member's /tokenize; the continuation's
    text comes back as Messages events, the stream's end with the whole answer's usage."""
    body = {**MESSAGES, "max_tokens": max_tokens}
    events = min(TOKENS, max_tokens) + 5  # start, block start, deltas, block stop, delta, stop
    whole, broken, metrics, continued = await _unbroken_and_cut(
        tmp_path, "/v1/messages", body, cut, _messages_normal
    )
    assert len(whole) == events
    assert broken == whole
    # Every delta relayed: at its budget the answer has ended (the gateway ends the stream);
    # below it, only the member knows (the continuation's first chunk is the EOS).
    spent = cut > events - 3 or (cut == events - 3 and max_tokens <= TOKENS)
    if cut < events:
        outcome = "completed_here" if spent else "resumed"
        assert f'reason="connection_lost",outcome="{outcome}"}} 1' in metrics
    if not spent:
        (continuation,) = continued
        sent = max(0, cut - 2)
        _assert_goes_on(continuation, sent)
        assert continuation["max_tokens"] == max_tokens - sent


async def test_a_messages_stream_with_tools_is_not_continued_and_counted(tmp_path: Path) -> None:
    tool = {"name": "f", "input_schema": {"type": "object"}}
    async with pool(tmp_path) as (first, _, gw):
        first.configure(drop_after=4)
        raw = await _stream(gw.url, "/v1/messages", {**MESSAGES, "tools": [tool]})
        metrics = gw.app.observer.metrics.render()
    assert b"event: message_stop" not in raw and b"event: error" in raw
    assert 'outcome="not_continued:tools"} 1' in metrics


RESPONSES = {
    "model": "sim-model",
    "instructions": "be brief",
    "input": "hello there",
    "stream": True,
    "temperature": 0,
}
_RESPONSE_IDS = re.compile(rb'"(id|item_id)":"[^"]*"|"created_at":\d+')


def _responses_normal(raw: bytes) -> list[bytes]:
    return [_RESPONSE_IDS.sub(b"X", e) for e in sse_blocks(raw)]


@pytest.mark.parametrize("max_tokens", [2 * TOKENS, TOKENS - 2])
@pytest.mark.parametrize("cut", range(1, TOKENS + 8))
async def test_a_responses_stream_goes_on_from_its_text(
    tmp_path: Path, cut: int, max_tokens: int
) -> None:
    """As Messages: ids from /tokenize, the continuation's text as Responses events numbered on,
    the end with the whole text, the status and the usage of the whole answer."""
    body = {**RESPONSES, "max_output_tokens": max_tokens}
    tokens = min(TOKENS, max_tokens)
    events = tokens + 8  # created, in progress, item, part, deltas, text/part/item done, completed
    whole, broken, metrics, continued = await _unbroken_and_cut(
        tmp_path, "/v1/responses", body, cut, _responses_normal
    )
    assert len(whole) == events
    assert broken == whole
    spent = cut > tokens + 4 or (cut == tokens + 4 and max_tokens <= TOKENS)
    if cut < events:
        outcome = "completed_here" if spent else "resumed"
        assert f'reason="connection_lost",outcome="{outcome}"}} 1' in metrics
    if not spent:
        (continuation,) = continued
        _assert_goes_on(continuation, max(0, cut - 4))


async def test_a_responses_stream_with_tools_is_not_continued_and_counted(
    tmp_path: Path,
) -> None:
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    async with pool(tmp_path) as (first, _, gw):
        first.configure(drop_after=6)
        raw = await _stream(gw.url, "/v1/responses", {**RESPONSES, "tools": [tool]})
        metrics = gw.app.observer.metrics.render()
    assert b"event: response.completed" not in raw and b"event: error" in raw
    assert 'outcome="not_continued:tools"} 1' in metrics
