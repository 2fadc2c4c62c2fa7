"""Deadlines, priority classes into vLLM, shedding and an honest queue, through the real gateway in
front of the simulator (docs/admission.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import RunningGateway, chat_body, run_gateway, sse_blocks, wait_for
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator

pytestmark = pytest.mark.timeout(60)

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def _settings(simulator: Simulator, **changes: Any) -> Settings:
    base: dict[str, Any] = {
        "backend_urls": (simulator.url,),
        "max_concurrent_requests": 1,
        "max_queued_requests": 10,
        "queue_wait_timeout": 30.0,
    }
    return Settings(**{**base, **changes})


def _engine_records(simulator: Simulator) -> list[dict[str, Any]]:
    return [r for r in simulator.state.records if r["path"] != "/v1/models"]


@contextlib.asynccontextmanager
async def _holding(
    gw: RunningGateway, client: httpx.AsyncClient, ttft: float, key: str | None = None
) -> AsyncIterator[asyncio.Task[httpx.Response]]:
    """A request that holds the gateway's one slot for about ``ttft`` seconds."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    task = asyncio.create_task(
        client.post(
            gw.url + "/v1/chat/completions",
            json=chat_body(vllm_sim={"ttft": ttft}),
            headers=headers,
        )
    )
    try:
        await wait_for(lambda: gw.gateway.admission.in_flight == 1)
        yield task
    finally:
        resp = await task
        assert resp.status_code == 200


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Request-Deadline-Ms", "-1"),
        ("X-Request-Deadline-Ms", "0"),
        ("X-Request-Deadline-Ms", "1" + "0" * 30),
        ("X-Request-Deadline-Ms", "soon"),
        ("X-Request-Deadline-Ms", ""),
        ("X-Queue-Updates", "yes"),
    ],
)
async def test_a_bad_admission_header_is_a_400_naming_it_and_never_reaches_the_backend(
    simulator: Simulator, client: httpx.AsyncClient, header: str, value: str
) -> None:
    async with run_gateway(_settings(simulator)) as gw:
        resp = await client.post(
            gw.url + "/v1/chat/completions", json=chat_body(), headers={header: value}
        )
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["param"] == header and header in error["message"]
        assert _engine_records(simulator) == []
        ok = await client.post(gw.url + "/v1/chat/completions", json=chat_body())
        assert ok.status_code == 200  # the connection and the gateway are fine


async def test_a_deadline_that_passes_while_queued_leaves_the_queue_with_retry_after(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    async with run_gateway(_settings(simulator)) as gw, _holding(gw, client, 3.0):
        resp = await client.post(
            gw.url + "/v1/chat/completions",
            json=chat_body(),
            headers={"X-Request-Deadline-Ms": "300"},
        )
        # Refused at its deadline, not at the queue timeout (30 s: the holder ends before it).
        assert resp.status_code == 503
        assert resp.json()["error"]["type"] == "deadline_exceeded"
        assert int(resp.headers["retry-after"]) >= 1
        assert gw.gateway.admission.queued == 0
        assert len(_engine_records(simulator)) == 1  # the holder only
    assert gw.gateway.admission.in_flight == 0


async def test_a_deadline_the_predicted_wait_passes_is_refused_at_once(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    keys = frozenset({"quick:impatient:0:1", "plain:patient"})
    async with run_gateway(_settings(simulator, api_keys=keys)) as gw:
        auth = {"Authorization": "Bearer plain"}
        for _ in range(3):  # a measured release rate
            ok = await client.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=auth)
            assert ok.status_code == 200
        async with _holding(gw, client, 3.0, key="plain") as holder:
            refused = await client.post(
                gw.url + "/v1/chat/completions",
                json=chat_body(),
                headers={**auth, "X-Request-Deadline-Ms": "1"},
            )
            # The tenant's default deadline (its key entry's fourth field) is the same.
            by_default = await client.post(
                gw.url + "/v1/chat/completions",
                json=chat_body(),
                headers={"Authorization": "Bearer quick"},
            )
            assert not holder.done()  # both answered while the slot was still held
            for resp in (refused, by_default):
                assert resp.status_code == 503
                assert resp.json()["error"]["type"] == "deadline_unmeetable"
                assert int(resp.headers["retry-after"]) >= 1
            assert gw.gateway.admission.queued == 0
            patient = await client.post(
                gw.url + "/v1/chat/completions",
                json=chat_body(),
                headers={**auth, "X-Request-Deadline-Ms": "60000"},
            )
            assert patient.status_code == 200  # queued, then served within its deadline
        assert len(_engine_records(simulator)) == 5  # 3 + the holder + the patient one


async def test_the_tenants_class_goes_to_vllm_as_its_request_priority(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    keys = frozenset({"hi:gold:5", "lo:bronze"})
    for scheduling in (True, False):
        simulator.reset()
        settings = _settings(simulator, api_keys=keys, priority_scheduling=scheduling)
        async with run_gateway(settings) as gw:
            for key, asked in (("hi", None), ("lo", -100)):
                body = chat_body() if asked is None else chat_body(priority=asked)
                resp = await client.post(
                    gw.url + "/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert resp.status_code == 200
        sent = [r["priority"] for r in _engine_records(simulator)]
        # vLLM serves a lower priority first; a client's own value never passes the mapping.
        assert sent == ([-5, 0] if scheduling else [0, -100])


async def test_shedding_refuses_a_queued_lower_class_for_a_higher_one(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    keys = frozenset({"lo:bronze:0", "hi:gold:5"})
    settings = _settings(simulator, api_keys=keys, max_queued_requests=1, shed_low_priority=True)
    async with run_gateway(settings) as gw, _holding(gw, client, 3.0, key="lo"):
        low = asyncio.create_task(
            client.post(
                gw.url + "/v1/chat/completions",
                json=chat_body(),
                headers={"Authorization": "Bearer lo"},
            )
        )
        await wait_for(lambda: gw.gateway.admission.queued == 1)
        high = await client.post(
            gw.url + "/v1/chat/completions",
            json=chat_body(),
            headers={"Authorization": "Bearer hi"},
        )
        assert high.status_code == 200
        shed = await low
        assert shed.status_code == 503
        assert shed.json()["error"]["type"] == "shed"
        assert int(shed.headers["retry-after"]) >= 1


async def test_a_queued_stream_that_asks_gets_its_head_and_queue_comments_then_its_stream(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = _settings(simulator, queue_update_interval=0.1)
    async with (
        run_gateway(settings) as gw,
        _holding(gw, client, 2.0),
        client.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json=chat_body(stream=True),
            headers={"X-Queue-Updates": "1"},
        ) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = resp.aiter_raw()
        first = await anext(chunks)
        assert first.startswith(b": queue position=1 eta_ms=")
        assert gw.gateway.admission.queued == 1  # the head came while it queued
        raw = first + b"".join([c async for c in chunks])
    events = sse_blocks(raw)
    comments = [e for e in events if e.startswith(b": queue ")]
    assert len(comments) >= 2 and events[: len(comments)] == comments
    assert events[-1] == b"data: [DONE]"
    assert len(events) > len(comments) + 1  # the stream's own events followed


async def test_with_queue_updates_a_queue_timeout_is_the_streams_final_error_event(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = _settings(simulator, queue_update_interval=0.1, queue_wait_timeout=0.4)
    # The holder outlasts the three queue timeouts below, however slow the machine.
    async with run_gateway(settings) as gw, _holding(gw, client, 6.0):
        async with client.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json=chat_body(stream=True),
            headers={"X-Queue-Updates": "1"},
        ) as resp:
            assert resp.status_code == 200
            raw = b"".join([c async for c in resp.aiter_raw()])
        events = sse_blocks(raw)
        assert events[0].startswith(b": queue position=1")
        error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
        assert error["type"] == "queue_timeout"
        assert b"[DONE]" not in raw
        assert gw.gateway.admission.queued == 0
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20
        ) as sdk:
            stream = await sdk.chat.completions.create(
                model="sim-model",
                messages=MESSAGES,
                max_tokens=6,
                stream=True,
                extra_headers={"X-Queue-Updates": "1"},
            )
            with pytest.raises(openai.APIError, match="slot"):
                async for _ in stream:
                    pass
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key="x", max_retries=0, timeout=20
        ) as ant:
            with pytest.raises(anthropic.APIStatusError, match="slot"):
                async with ant.messages.stream(
                    model="sim-model",
                    max_tokens=6,
                    messages=[{"role": "user", "content": "hello"}],
                    extra_headers={"X-Queue-Updates": "1"},
                ) as messages:
                    async for _ in messages.text_stream:
                        pass


async def test_a_queued_stream_with_queue_updates_whose_client_leaves_leaves_the_queue(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = _settings(simulator, queue_update_interval=0.1)
    async with run_gateway(settings) as gw, _holding(gw, client, 3.0):
        async with client.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json=chat_body(stream=True),
            headers={"X-Queue-Updates": "1"},
        ) as resp:
            assert (await anext(resp.aiter_raw())).startswith(b": queue position=1")
        # The client closed its connection while queued: out of the queue, its wait's task
        # ended, nothing sent upstream.
        await wait_for(lambda: gw.gateway.admission.queued == 0 and len(gw.gateway.active) == 1)
    assert gw.gateway.admission.in_flight == 0
    assert len(_engine_records(simulator)) == 1  # the holder only


async def test_the_sdks_stream_a_response_with_queue_comments_unchanged(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = _settings(simulator, queue_update_interval=0.1)
    updates = {"X-Queue-Updates": "1"}
    async with (
        run_gateway(settings) as gw,
        openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20) as oai,
        anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0, timeout=20) as ant,
    ):

        async def chat(headers: dict[str, str]) -> str:
            stream = await oai.chat.completions.create(
                model="sim-model", messages=MESSAGES, max_tokens=6, stream=True,
                extra_headers=headers,
            )  # fmt: skip
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def message(headers: dict[str, str]) -> str:
            async with ant.messages.stream(
                model="sim-model", max_tokens=6, messages=[{"role": "user", "content": "hello"}],
                extra_headers=headers,
            ) as stream:  # fmt: skip
                return "".join([text async for text in stream.text_stream])

        alone = (await chat({}), await message({}))
        assert all(alone)
        for ask in (chat, message):
            async with _holding(gw, client, 2.0):
                queued = asyncio.create_task(ask(updates))
                await wait_for(lambda: gw.gateway.admission.queued == 1)
                text = await queued
            assert text == alone[0 if ask is chat else 1]


async def test_the_status_page_shows_the_queue_by_tenant_and_class_to_its_tenant(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    keys = frozenset({"a:team-a:0", "b:team-b:3"})
    async with (
        run_gateway(_settings(simulator, api_keys=keys)) as gw,
        _holding(gw, client, 3.0, key="a"),
    ):
        waiting = [
            asyncio.create_task(
                client.post(
                    gw.url + "/v1/chat/completions",
                    json=chat_body(),
                    headers={"Authorization": f"Bearer {key}"},
                )
            )
            for key in ("a", "a", "b")
        ]
        await wait_for(lambda: gw.gateway.admission.queued == 3)
        seen = {}
        for key in ("a", "b"):
            resp = await client.get(
                gw.url + "/status/data", headers={"Authorization": f"Bearer {key}"}
            )
            assert resp.status_code == 200
            seen[key] = [(q["tenant"], q["priority"], q["queued"]) for q in resp.json()["queue"]]
        assert seen == {"a": [("team-a", 0, 2)], "b": [("team-b", 3, 1)]}
        for resp in await asyncio.gather(*waiting):
            assert resp.status_code == 200


async def test_a_rate_limits_retry_after_is_no_sooner_than_its_tenants_turn_in_the_queue(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    # Three requests a minute: the fourth is told to wait about 20 s by the limit alone.
    settings = _settings(
        simulator, api_keys=frozenset({"k:team"}), rate_limit_rpm=3, queue_wait_timeout=45.0
    )
    auth = {"Authorization": "Bearer k"}
    async with run_gateway(settings) as gw:
        async with _holding(gw, client, 3.0, key="k"):
            queued = [
                asyncio.create_task(
                    client.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=auth)
                )
                for _ in range(2)
            ]
            await wait_for(lambda: gw.gateway.admission.queued == 2)
            limited = await client.post(
                gw.url + "/v1/chat/completions", json=chat_body(), headers=auth
            )
            assert limited.status_code == 429
            # Its tenant's turn in the queue comes later than the limit's 20 s: before any
            # release is measured, the estimate is the queue wait timeout.
            assert limited.headers["retry-after"] == "45"
            for resp in await asyncio.gather(*queued):
                assert resp.status_code == 200
        assert gw.gateway.admission.queued == 0
        alone = await client.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=auth)
        assert alone.status_code == 429
        assert int(alone.headers["retry-after"]) <= 20  # the limit's own, with no queue
