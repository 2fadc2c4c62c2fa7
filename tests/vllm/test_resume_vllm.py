"""Resumable streams against the real engine: a client dropped after every event of a greedy
stream reattaches with Last-Event-ID and gets exactly the bytes of the unbroken stream after it;
the text is the one an unkeyed request gets."""

from __future__ import annotations

import asyncio

import orjson

from tests.conftest import run_gateway
from tests.resume_client import event_id, request
from tests.vllm.conftest import VllmServer


def _text(events: list[bytes]) -> str:
    out = []
    for event in events:
        data = event.split(b"data: ", 1)[1].strip()
        if data != b"[DONE]":
            out += [c["delta"].get("content") or "" for c in orjson.loads(data)["choices"]]
    return "".join(out)


async def test_a_dropped_greedy_stream_resumes_byte_for_byte(vllm_server: VllmServer) -> None:
    body = {
        "model": vllm_server.model,
        "messages": [{"role": "user", "content": "Count from one to ten in words."}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
    }
    async with run_gateway(
        backend_urls=(vllm_server.url,), request_timeout=300.0, first_token_timeout=290.0
    ) as gw:
        plain = await request(gw.port, body, None)
        assert plain.status == 200 and plain.events[-1] == b"data: [DONE]\n\n"
        count = len(plain.events)

        async def drop_and_resume(position: int) -> None:
            key = f"vllm-{position}"
            first = await request(gw.port, body, key, drop_after=position)
            assert [event_id(e) for e in first.events] == list(range(1, position + 1))
            rest = await request(gw.port, body, key, last_event_id=position)
            unbroken = await request(gw.port, body, key)
            assert rest.status == unbroken.status == 200
            assert first.body + rest.body == unbroken.body
            assert unbroken.events[-1].endswith(b"data: [DONE]\n\n")
            assert len(unbroken.events) == count
            assert _text(unbroken.events) == _text(plain.events)

        await asyncio.gather(*(drop_and_resume(p) for p in range(1, count)))
        store = gw.gateway.resume
        assert store is not None and store.counts["started"] == count - 1
