"""The gateway core against the simulator on loopback: relay, admission, timeouts, faults."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import RunningGateway, chat_body, run_gateway, sse_events, wait_for
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator


def _contents(events: list[str]) -> list[str]:
    out = []
    for event in events:
        if event == "[DONE]":
            continue
        delta = orjson.loads(event)["choices"][0].get("delta", {})
        if delta.get("content"):
            out.append(delta["content"])
    return out


async def _stream_text(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[int, str]:
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        text = (await resp.aread()).decode()
        return resp.status_code, text


# --- relay ---------------------------------------------------------------------------------


async def test_stream_relays_every_chunk_in_order(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    status, direct = await _stream_text(
        client, simulator.url, chat_body(stream=True, max_tokens=12)
    )
    status_gw, via = await _stream_text(client, gateway.url, chat_body(stream=True, max_tokens=12))
    assert status == status_gw == 200
    direct_events, via_events = sse_events(direct), sse_events(via)
    assert len(via_events) == len(direct_events) == 12 + 2  # role chunk, 12 tokens, [DONE]
    assert _contents(via_events) == _contents(direct_events) == [f" tok{i}" for i in range(12)]
    assert via_events[-1] == "[DONE]"
    assert orjson.loads(via_events[-2])["choices"][0]["finish_reason"] == "length"


async def test_stream_is_event_stream_with_request_id(
    gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    headers = {"X-Request-ID": "abc-123"}
    async with client.stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body(stream=True), headers=headers
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"] == "abc-123"
        await resp.aread()


async def test_chunks_arrive_as_they_are_produced(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    # 5 chunks 200 ms apart: a buffering relay would deliver them together at the end.
    simulator.configure(itl=0.2, ttft=0.01)
    arrivals = []
    loop = asyncio.get_running_loop()
    async with client.stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=5)
    ) as resp:
        async for _ in resp.aiter_raw():
            arrivals.append(loop.time())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) >= 5
    assert sum(1 for g in gaps if g > 0.1) >= 3  # each token came on its own


async def test_non_stream_returns_the_backends_json(
    gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    resp = await client.post(gateway.url + "/v1/chat/completions", json=chat_body(max_tokens=3))
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == " tok0 tok1 tok2"
    assert body["usage"]["completion_tokens"] == 3


async def test_completions_and_models_routes(
    gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    resp = await client.post(
        gateway.url + "/v1/completions",
        json={"model": "sim-model", "prompt": "hi", "max_tokens": 2},
    )
    assert resp.status_code == 200 and resp.json()["object"] == "text_completion"
    status, text = 0, ""
    async with client.stream(
        "POST",
        gateway.url + "/v1/completions",
        json={"model": "sim-model", "prompt": "hi", "max_tokens": 2, "stream": True},
    ) as r:
        status, text = r.status_code, (await r.aread()).decode()
    assert status == 200 and sse_events(text)[-1] == "[DONE]"
    models = await client.get(gateway.url + "/v1/models")
    assert [m["id"] for m in models.json()["data"]] == ["sim-model"]


async def test_model_alias_reaches_the_backend_under_its_real_name(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = Settings(backend_urls=(simulator.url,), model_aliases={"short": "sim-model"})
    async with run_gateway(settings) as gw:
        resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body(model="short"))
        assert resp.status_code == 200
        ids = [m["id"] for m in (await client.get(gw.url + "/v1/models")).json()["data"]]
        assert set(ids) == {"sim-model", "short"}


async def test_health_endpoints(gateway: RunningGateway, client: httpx.AsyncClient) -> None:
    resp = await client.get(gateway.url + "/v1/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    assert (await client.get(gateway.url + "/health/live")).status_code == 200
    assert (await client.get(gateway.url + "/health/ready")).status_code == 200


async def test_readiness_fails_when_the_backend_is_unhealthy(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(unhealthy=True)
    resp = await client.get(gateway.url + "/health/ready")
    assert resp.status_code == 503 and resp.json()["reason"] == "backend_unhealthy"
    assert (await client.get(gateway.url + "/health/live")).status_code == 200


# --- client errors -------------------------------------------------------------------------


async def test_malformed_json_is_400(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    resp = await client.post(
        gateway.url + "/v1/chat/completions",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_json"
    assert resp.json()["error"]["request_id"] == resp.headers["x-request-id"]
    assert simulator.stats()["total"] == 0


async def test_wrong_content_type_is_415_and_oversized_body_413(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    async with run_gateway(Settings(backend_urls=(simulator.url,), max_body_bytes=2048)) as gw:
        resp = await client.post(
            gw.url + "/v1/chat/completions",
            content=b"a=b",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert resp.status_code == 415
        big = chat_body(extra_text="x" * 5000)
        resp = await client.post(gw.url + "/v1/chat/completions", json=big)
        assert resp.status_code == 413
        assert resp.json()["error"]["type"] == "body_too_large"
    assert simulator.stats()["total"] == 0


async def test_unknown_model_is_404_and_not_forwarded(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    resp = await client.post(gateway.url + "/v1/chat/completions", json=chat_body(model="nope"))
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "model_not_found"
    assert simulator.stats()["total"] == 0


async def test_unknown_route_is_openai_shaped_404(
    gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    resp = await client.get(gateway.url + "/v2/nothing")
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found"
    resp = await client.get(gateway.url + "/v1/chat/completions")
    assert resp.status_code == 405


async def test_backend_4xx_reaches_the_client_with_status_and_body(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(status=400)
    direct = await client.post(simulator.url + "/v1/chat/completions", json=chat_body())
    via = await client.post(gateway.url + "/v1/chat/completions", json=chat_body())
    assert via.status_code == direct.status_code == 400
    assert via.json() == direct.json()


async def test_backend_500_with_traceback_shows_nothing_of_it(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(error_traceback=True)
    direct = await client.post(simulator.url + "/v1/chat/completions", json=chat_body())
    assert "Traceback" in direct.text
    via = await client.post(gateway.url + "/v1/chat/completions", json=chat_body())
    assert via.status_code == 502
    assert "Traceback" not in via.text and "/" not in via.json()["error"]["message"]
    assert via.json()["error"]["request_id"]


# --- admission -----------------------------------------------------------------------------


async def _open_streams(
    client: httpx.AsyncClient, url: str, n: int
) -> list[asyncio.Task[tuple[int, str]]]:
    async def one() -> tuple[int, str]:
        return await _stream_text(client, url, chat_body(stream=True, max_tokens=400))

    return [asyncio.create_task(one()) for _ in range(n)]


async def test_queue_timeout_is_503_with_retry_after_and_never_reaches_the_backend(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(itl=0.01)
    holders = await _open_streams(client, gateway.url, 4)  # the gateway's limit is 4
    await wait_for(lambda: simulator.stats()["running"] == 4)
    seen = simulator.stats()["total"]
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = await client.post(gateway.url + "/v1/chat/completions", json=chat_body())
    waited = loop.time() - start
    assert resp.status_code == 503
    assert resp.json()["error"]["type"] == "queue_timeout"
    assert int(resp.headers["retry-after"]) >= 1
    assert 0.9 <= waited < 1.5  # the queue wait timeout is 1 s
    assert simulator.stats()["total"] == seen
    results = await asyncio.gather(*holders)
    assert all(status == 200 and text.rstrip().endswith("[DONE]") for status, text in results)


async def test_full_queue_is_refused_at_once(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = Settings(
        backend_urls=(simulator.url,),
        max_concurrent_requests=1,
        max_queued_requests=1,
        queue_wait_timeout=5,
    )
    async with run_gateway(settings) as gw:
        holders = await _open_streams(client, gw.url, 2)  # one in flight, one queued
        await wait_for(lambda: gw.gateway.admission.queued == 1)
        resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body())
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "overloaded"
        assert "retry-after" in resp.headers
        for t in holders:
            t.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await wait_for(lambda: gw.gateway.admission.in_flight == 0)


async def test_queued_client_that_leaves_never_reaches_the_backend(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    holders = await _open_streams(client, gateway.url, 4)
    await wait_for(lambda: simulator.stats()["running"] == 4)
    seen = simulator.stats()["total"]
    leaver = asyncio.create_task(
        client.post(gateway.url + "/v1/chat/completions", json=chat_body())
    )
    await wait_for(lambda: gateway.gateway.admission.queued == 1)
    leaver.cancel()
    await wait_for(lambda: gateway.gateway.admission.queued == 0, timeout=1)
    for t in holders:
        t.cancel()
    await asyncio.gather(leaver, *holders, return_exceptions=True)
    await wait_for(lambda: gateway.gateway.admission.in_flight == 0)
    assert simulator.stats()["total"] == seen


async def test_client_disconnect_mid_stream_aborts_the_upstream_request(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    async with client.stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=2000)
    ) as resp:
        got = 0
        async for _ in resp.aiter_raw():
            got += 1
            if got == 3:
                break
    assert simulator.stats()["running"] <= 1
    await wait_for(lambda: simulator.stats()["running"] == 0, timeout=2)
    assert simulator.stats()["aborted"] == 1
    await wait_for(lambda: gateway.gateway.admission.in_flight == 0, timeout=2)


# --- timeouts and backend faults -----------------------------------------------------------


async def test_unreachable_backend_is_502(client: httpx.AsyncClient) -> None:
    from tests.conftest import free_port

    async with run_gateway(Settings(backend_urls=(f"http://127.0.0.1:{free_port()}",))) as gw:
        resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body())
        assert resp.status_code == 502
        assert resp.json()["error"]["type"] == "backend_unavailable"
        assert "127.0.0.1" not in resp.text
        assert (await client.get(gw.url + "/health/ready")).status_code == 503
        assert gw.gateway.admission.in_flight == 0


async def test_first_token_timeout_is_504_and_closes_upstream(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(hang=True)
    settings = Settings(backend_urls=(simulator.url,), first_token_timeout=0.3)
    async with run_gateway(settings) as gw:
        for stream in (False, True):
            resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body(stream=stream))
            assert resp.status_code == 504
            assert resp.json()["error"]["type"] == "first_token_timeout"
        await wait_for(lambda: simulator.stats()["running"] == 0, timeout=2)
        assert gw.gateway.admission.in_flight == 0


async def test_stalled_stream_ends_with_an_idle_timeout_event(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(stall_after=3)
    settings = Settings(backend_urls=(simulator.url,), stream_idle_timeout=0.3)
    async with run_gateway(settings) as gw:
        status, text = await _stream_text(client, gw.url, chat_body(stream=True, max_tokens=20))
        events = sse_events(text)
        assert status == 200
        assert "[DONE]" not in events
        assert orjson.loads(events[-1])["error"]["type"] == "stream_idle_timeout"
        assert len(_contents(events[:-1])) >= 2  # what was sent before the stall arrived intact
        await wait_for(lambda: simulator.stats()["running"] == 0, timeout=2)
        assert gw.gateway.admission.in_flight == 0


async def test_request_timeout_mid_stream_is_an_error_event_not_a_clean_end(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(itl=0.05)
    settings = Settings(backend_urls=(simulator.url,), request_timeout=0.5, first_token_timeout=0.5)
    async with run_gateway(settings) as gw:
        status, text = await _stream_text(client, gw.url, chat_body(stream=True, max_tokens=100))
        events = sse_events(text)
        assert status == 200 and "[DONE]" not in events
        assert orjson.loads(events[-1])["error"]["type"] == "request_timeout"
        resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body(max_tokens=100))
        assert resp.status_code == 504
        await wait_for(lambda: simulator.stats()["running"] == 0, timeout=2)


async def test_backend_dying_mid_stream_gives_an_error_event(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(drop_after=4)
    status, text = await _stream_text(client, gateway.url, chat_body(stream=True, max_tokens=20))
    events = sse_events(text)
    assert status == 200 and "[DONE]" not in events
    assert _contents(events[:-1]) == [f" tok{i}" for i in range(len(_contents(events[:-1])))]
    assert orjson.loads(events[-1])["error"]["type"] == "backend_unavailable"
    resp = await client.post(gateway.url + "/v1/chat/completions", json=chat_body(max_tokens=20))
    assert resp.status_code == 502


@pytest.mark.parametrize(
    ("malformed", "stream", "expected"),
    [
        ("html", True, 502),
        ("bad_json", True, "bad_backend_response"),
        ("no_done", True, "bad_backend_response"),
        ("huge_line", True, "bad_backend_response"),
    ],
)
async def test_malformed_backend_output_is_an_error(
    gateway: RunningGateway,
    simulator: Simulator,
    client: httpx.AsyncClient,
    malformed: str,
    stream: bool,
    expected: int | str,
) -> None:
    simulator.configure(malformed=malformed)
    status, text = await _stream_text(client, gateway.url, chat_body(stream=stream, max_tokens=6))
    if isinstance(expected, int):
        assert status == expected
        assert orjson.loads(text)["error"]["type"] == "bad_backend_response"
    else:
        events = sse_events(text)
        assert "[DONE]" not in events
        if status == 200:
            assert orjson.loads(events[-1])["error"]["type"] == expected
        else:
            assert status == 502 and orjson.loads(text)["error"]["type"] == expected
    await wait_for(lambda: gateway.gateway.admission.in_flight == 0, timeout=2)
