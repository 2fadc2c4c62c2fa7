"""Idempotency-Key: a stream's client that drops reattaches with Last-Event-ID and gets exactly the
bytes it missed; a retried request is generated once; keys never cross tenants; the kept bytes
stay within their budget however many clients drop at once."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningGateway, chat_body, run_gateway, wait_for
from tests.integration.rogue import raw_connect
from tests.resume_client import event_id, request, request_bytes
from vllm_gateway.proxy.resume.store import Store
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator


@pytest.fixture
async def slow_sim() -> AsyncIterator[Simulator]:
    # Slow enough that a client dropping after any event drops while the generation runs.
    async with run_simulator(SimulatorConfig(ttft=0.05, itl=0.05, tokens=8)) as sim:
        yield sim


@contextlib.asynccontextmanager
async def _behind(
    config: SimulatorConfig, **settings: Any
) -> AsyncIterator[tuple[Simulator, RunningGateway]]:
    """A simulator with ``config`` and the gateway in front of it."""
    async with run_simulator(config) as sim, run_gateway(backend_urls=(sim.url,), **settings) as gw:
        yield sim, gw


def _store(gw_store: Store | None) -> Store:
    assert gw_store is not None
    return gw_store


async def test_a_client_dropped_after_every_event_gets_the_rest_exactly(
    slow_sim: Simulator,
) -> None:
    body = chat_body(stream=True, max_tokens=8, temperature=0)
    async with run_gateway(backend_urls=(slow_sim.url,), max_concurrent_requests=64) as gw:
        whole = await request(gw.port, body, "probe")
        assert whole.status == 200, whole.body
        count = len(whole.events)
        assert count >= 10 and whole.events[-1].endswith(b"data: [DONE]\n\n")
        assert [event_id(e) for e in whole.events] == list(range(1, count + 1))

        async def drop_and_resume(position: int) -> None:
            key = f"drop-{position}"
            first = await request(gw.port, body, key, drop_after=position)
            assert len(first.events) == position
            rest = await request(gw.port, body, key, last_event_id=position)
            assert rest.status == 200
            # The unbroken stream of this generation: the key again, from the start.
            unbroken = await request(gw.port, body, key)
            assert unbroken.headers["idempotent-replayed"] == "true"
            assert first.body + rest.body == unbroken.body
            assert unbroken.body.endswith(b"data: [DONE]\n\n")
            # The same stream as a generation nobody left (ids and timestamps aside).
            assert len(unbroken.events) == count

        await asyncio.gather(*(drop_and_resume(p) for p in range(1, count)))
        stats = slow_sim.stats()
        # One upstream request per key, each generated to its end: none aborted.
        assert stats["total"] == count and stats["completed"] == count
        assert stats["aborted"] == 0


@pytest.mark.parametrize(
    ("path", "body", "end"),
    [
        (
            "/v1/messages",
            {
                "model": "sim-model",
                "max_tokens": 8,
                "stream": True,
                "messages": [{"role": "user", "content": "hello"}],
            },
            b"message_stop",
        ),
        (
            "/v1/responses",
            {"model": "sim-model", "input": "hello", "max_output_tokens": 8, "stream": True},
            b"response.completed",
        ),
    ],
)
async def test_messages_and_responses_streams_resume_too(
    slow_sim: Simulator, path: str, body: dict[str, Any], end: bytes
) -> None:
    async with run_gateway(backend_urls=(slow_sim.url,)) as gw:
        first = await request(gw.port, body, "p", drop_after=2, path=path)
        assert first.status == 200 and [event_id(e) for e in first.events] == [1, 2]
        rest = await request(gw.port, body, "p", last_event_id=2, path=path)
        whole = await request(gw.port, body, "p", path=path)
        assert first.body + rest.body == whole.body
        assert end in whole.events[-1]
        assert slow_sim.stats()["total"] == 1


async def test_a_retried_request_is_generated_once(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    async with run_gateway(backend_urls=(simulator.url,)) as gw:
        url = gw.url + "/v1/chat/completions"
        headers = {"Idempotency-Key": "once"}
        first = await client.post(url, json=chat_body(), headers=headers)
        second = await client.post(url, json=chat_body(), headers=headers)
        assert first.status_code == second.status_code == 200
        assert first.content == second.content
        assert second.headers["idempotent-replayed"] == "true"
        assert first.headers["x-request-id"] != second.headers["x-request-id"]
        # A client that left before its answer: the retry gets the one generation's answer.
        dropped = await request(gw.port, chat_body(max_tokens=8), "left", drop_after=0)
        assert dropped.status == 200
        retried = await client.post(
            url, json=chat_body(max_tokens=8), headers={"Idempotency-Key": "left"}
        )
        assert retried.status_code == 200 and retried.json()["choices"]
        assert simulator.stats()["total"] == 2
        store = _store(gw.gateway.resume)
        assert store.counts["started"] == 2 and store.counts["replayed"] == 2


async def test_the_same_key_with_another_body_is_refused_naming_it(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    async with run_gateway(backend_urls=(simulator.url,)) as gw:
        url = gw.url + "/v1/chat/completions"
        headers = {"Idempotency-Key": "k-123"}
        assert (await client.post(url, json=chat_body(), headers=headers)).status_code == 200
        other = await client.post(url, json=chat_body(max_tokens=3), headers=headers)
        assert other.status_code == 422
        error = other.json()["error"]
        assert error["type"] == "idempotency_key_reused" and "k-123" in error["message"]
        bad = await client.post(url, json=chat_body(), headers={"Idempotency-Key": "a b"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"
        bad_id = await client.post(
            url,
            json=chat_body(stream=True),
            headers={"Idempotency-Key": "k-9", "Last-Event-ID": "x"},
        )
        assert bad_id.status_code == 400 and bad_id.json()["error"]["param"] == "Last-Event-ID"
        # Resuming a key nothing is kept under: no new generation, a clear 410.
        unknown = await client.post(
            url,
            json=chat_body(stream=True),
            headers={"Idempotency-Key": "never-seen", "Last-Event-ID": "4"},
        )
        assert unknown.status_code == 410
        assert unknown.json()["error"]["type"] == "result_lost"
        assert "never-seen" in unknown.json()["error"]["message"]
        assert simulator.stats()["total"] == 1
        assert gw.gateway.admission.in_flight == 0


async def test_two_tenants_with_one_key_never_see_each_others_answers(
    simulator: Simulator,
) -> None:
    async with run_gateway(
        backend_urls=(simulator.url,), api_keys=frozenset({"ka:alpha", "kb:beta"})
    ) as gw:
        a = await request(gw.port, chat_body(max_tokens=3), "shared", api_key="ka")
        b = await request(gw.port, chat_body(max_tokens=5), "shared", api_key="kb")
        assert a.status == b.status == 200
        assert "idempotent-replayed" not in b.headers
        assert a.body != b.body
        again = await request(gw.port, chat_body(max_tokens=3), "shared", api_key="ka")
        assert again.body == a.body and again.headers["idempotent-replayed"] == "true"
        assert simulator.stats()["total"] == 2


async def test_a_generation_nobody_reads_stops_after_the_grace_period() -> None:
    config = SimulatorConfig(ttft=0.01, itl=0.05, tokens=400)
    async with _behind(config, idempotency_grace=0.3) as (sim, gw):
        body = chat_body(stream=True, max_tokens=400)
        await request(gw.port, body, "gone", drop_after=2)
        await wait_for(lambda: sim.stats()["aborted"] == 1, timeout=20)
        store = _store(gw.gateway.resume)
        assert store.counts["abandoned"] == 1
        await wait_for(lambda: gw.gateway.admission.in_flight == 0)
        assert store.used == 0 and store.entries == 0
        # The key again runs a new generation.
        again = await request(gw.port, chat_body(stream=True, max_tokens=4), "gone")
        assert again.status == 200 and again.events[-1].endswith(b"data: [DONE]\n\n")


async def test_without_a_key_a_client_that_leaves_aborts_upstream_at_once() -> None:
    async with _behind(SimulatorConfig(ttft=0.01, itl=0.05, tokens=400)) as (sim, gw):
        body = chat_body(stream=True, max_tokens=400)
        dropped = await request(gw.port, body, None, drop_after=2)
        assert not dropped.events[0].startswith(b"id:")
        await wait_for(lambda: sim.stats()["aborted"] == 1, timeout=10)
        assert _store(gw.gateway.resume).counts["started"] == 0


async def test_the_budget_holds_when_a_thousand_clients_drop_at_once() -> None:
    limit = 256 * 1024
    async with _behind(
        SimulatorConfig(ttft=0.05, itl=0.02, tokens=40),
        max_concurrent_requests=1000,
        max_queued_requests=1000,
        max_connections=4096,
        idempotency_budget_bytes=limit,
        idempotency_grace=2.0,
    ) as (sim, gw):
        store = _store(gw.gateway.resume)
        peak = 0
        watching = True

        async def watch() -> None:
            nonlocal peak
            while watching:
                peak = max(peak, store.used)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        body = chat_body(stream=True, max_tokens=40)
        sem = asyncio.Semaphore(200)  # connections opened at once (the test's own sockets)

        async def one(i: int) -> int:
            async with sem:
                answer = await request(gw.port, body, f"many-{i}", drop_after=1)
                return answer.status

        statuses = await asyncio.gather(*(one(i) for i in range(1000)))
        assert set(statuses) <= {200, 503}, set(statuses)
        await wait_for(lambda: gw.gateway.admission.in_flight == 0, timeout=90)
        await wait_for(lambda: store.entries == 0, timeout=30)
        watching = False
        await watcher
        assert peak <= limit
        assert store.used == 0 and sim.stats()["running"] == 0
        # The budget was reached: generations were cut or evicted, and counted.
        assert store.counts["cut"] + store.counts["evicted"] > 0
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(gw.url + "/metrics")).text
        assert 'vllm_gateway_idempotency_events_total{event="cut"}' in metrics


async def test_a_reader_that_stops_reading_is_dropped_and_the_kept_stream_stays() -> None:
    config = SimulatorConfig(ttft=0.0, itl=0.0, tokens=16000, max_model_len=32768)
    async with _behind(config, client_send_timeout=0.5) as (sim, gw):
        body = chat_body(stream=True, max_tokens=16000)
        whole = await request(gw.port, body, "big")
        assert whole.status == 200 and whole.events[-1].endswith(b"data: [DONE]\n\n")
        # A reader of the kept stream that reads nothing: the send timeout drops it.
        stuck = await raw_connect(gw.port, rcvbuf=4096)
        await asyncio.get_running_loop().sock_sendall(stuck, request_bytes(body, "big"))
        await wait_for(lambda: gw.app.server_stats.send_timeouts >= 1, timeout=30)
        stuck.close()
        again = await request(gw.port, body, "big")
        assert again.body == whole.body
        assert sim.stats()["total"] == 1


async def test_sdk_retries_with_one_key_get_one_generation(simulator: Simulator) -> None:
    async with run_gateway(backend_urls=(simulator.url,)) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        key = str(uuid.uuid4())
        made = [
            await sdk.chat.completions.create(
                model="sim-model",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=8,
                extra_headers={"Idempotency-Key": key},
            )
            for _ in range(3)
        ]
        assert len({c.id for c in made}) == 1
        stream_key = str(uuid.uuid4())
        texts = []
        for _ in range(2):
            stream = await sdk.chat.completions.create(
                model="sim-model",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=8,
                stream=True,
                extra_headers={"Idempotency-Key": stream_key},
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            texts.append("".join(parts))
        assert texts[0] and texts[0] == texts[1]
        # A stream the SDK left after 3 chunks (an event each) goes on from event 3.
        resumed_key = str(uuid.uuid4())
        head: list[str] = []
        cut = await sdk.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=8,
            stream=True,
            extra_headers={"Idempotency-Key": resumed_key},
        )
        async for chunk in cut:
            head.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            if len(head) == 3:
                break
        await cut.close()
        rest = await sdk.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=8,
            stream=True,
            extra_headers={"Idempotency-Key": resumed_key, "Last-Event-ID": "3"},
        )
        tail = [c.choices[0].delta.content or "" async for c in rest if c.choices]
        assert "".join(head + tail) == texts[0]
        assert simulator.stats()["total"] == 3
        await sdk.close()
