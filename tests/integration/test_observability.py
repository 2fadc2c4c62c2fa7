"""/metrics, /status/data and the access log, on the real gateway in front of the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import RunningGateway, chat_body, run_gateway, spawn_gateway, wait_for
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator

CHAT = "/v1/chat/completions"


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def scrape(client: httpx.AsyncClient, gw: RunningGateway) -> dict[str, float]:
    r = await client.get(gw.url + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(r.text)


@pytest.fixture
async def obs_gateway(simulator: Simulator) -> AsyncIterator[RunningGateway]:
    settings = Settings(backend_urls=(simulator.url,), max_concurrent_requests=8)
    async with run_gateway(settings) as gw:
        yield gw


async def test_completed_stream_and_body_are_counted(
    obs_gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    gw = obs_gateway
    r = await client.post(
        gw.url + CHAT,
        json=chat_body(stream=True, max_tokens=6, stream_options={"include_usage": True}),
    )
    assert r.status_code == 200
    r = await client.post(gw.url + CHAT, json=chat_body(max_tokens=5))
    assert r.status_code == 200
    got = await scrape(client, gw)
    assert (
        got[f'vllm_gateway_requests_total{{route="{CHAT}",status="200",outcome="completed"}}'] == 2
    )
    assert got["vllm_gateway_time_to_first_token_seconds_count"] == 2
    assert got["vllm_gateway_inter_token_latency_seconds_count"] == 1  # the stream only
    assert got["vllm_gateway_queue_wait_seconds_count"] == 2
    assert got[f'vllm_gateway_request_duration_seconds_count{{route="{CHAT}"}}'] == 2
    assert got["vllm_gateway_requests_in_flight"] == 0
    assert got["vllm_gateway_admission_limit"] == 8
    assert got["vllm_gateway_draining"] == 0
    assert got['vllm_gateway_tokens_total{kind="completion"}'] == 11
    assert got['vllm_gateway_tokens_total{kind="prompt"}'] > 0


async def test_in_flight_follows_open_streams_then_returns_to_zero(
    obs_gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    gw = obs_gateway
    slow = chat_body(stream=True, max_tokens=200, vllm_sim={"itl": 0.05})
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            resp = await stack.enter_async_context(client.stream("POST", gw.url + CHAT, json=slow))
            assert resp.status_code == 200
        got = await scrape(client, gw)
        assert got["vllm_gateway_requests_in_flight"] == 3
        name = gw.gateway.backend.name
        assert got[f'vllm_gateway_backend_in_flight{{backend="{name}"}}'] == 3
        live = (await client.get(gw.url + "/status/data")).json()["live"]
        assert live["in_flight"] == 3
    # Leaving the block closed the three streams: the gateway sees the clients go.
    await wait_for(lambda: gw.gateway.admission.in_flight == 0)
    got = await scrape(client, gw)
    assert got["vllm_gateway_requests_in_flight"] == 0
    key = (
        f'vllm_gateway_requests_total{{route="{CHAT}",status="200",outcome="client_disconnected"}}'
    )
    key_499 = key.replace('status="200"', 'status="499"')
    assert got.get(key, 0) + got.get(key_499, 0) == 3


async def test_backend_failure_is_counted_and_listed_with_its_request_id(
    obs_gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    gw = obs_gateway
    r = await client.post(
        gw.url + CHAT,
        json=chat_body(vllm_sim={"status": 500}),
        headers={"x-request-id": "obs-failed-1"},
    )
    assert r.status_code == 502
    got = await scrape(client, gw)
    name = gw.gateway.backend.name
    assert (
        got[
            f'vllm_gateway_requests_total{{route="{CHAT}",status="502",'
            f'outcome="bad_backend_response"}}'
        ]
        == 1
    )
    assert (
        got[f'vllm_gateway_backend_errors_total{{backend="{name}",type="bad_backend_response"}}']
        == 1
    )
    data = (await client.get(gw.url + "/status/data")).json()
    first = data["errors"][0]
    assert first["request_id"] == "obs-failed-1"
    assert (first["outcome"], first["status"]) == ("bad_backend_response", 502)
    assert data["live"]["errors_total"] == 1


async def test_backend_health_is_sampled(
    obs_gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    gw = obs_gateway
    key = f'vllm_gateway_backend_healthy{{backend="{gw.gateway.backend.name}"}}'

    async def healthy() -> float | None:
        return (await scrape(client, gw)).get(key)

    async with asyncio.timeout(5):
        while await healthy() is None:  # noqa: ASYNC110 - polling another server's state
            await asyncio.sleep(0.05)
    assert await healthy() == 1


async def test_access_log_has_one_line_per_request_with_its_fields(
    obs_gateway: RunningGateway, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    gw = obs_gateway
    with caplog.at_level(logging.INFO, logger="vllm_gateway.access"):
        r = await client.post(
            gw.url + CHAT,
            json=chat_body(stream=True, max_tokens=4),
            headers={"x-request-id": "obs-log-1"},
        )
        assert r.status_code == 200
        r = await client.post(
            gw.url + CHAT,
            json=chat_body(model="no-such-model"),
            headers={"x-request-id": "obs-log-2"},
        )
        assert r.status_code == 404
    lines = {
        getattr(rec, "request_id", None): rec
        for rec in caplog.records
        if rec.name == "vllm_gateway.access"
    }
    ok, missing = lines["obs-log-1"], lines["obs-log-2"]
    assert (ok.route, ok.status, ok.outcome, ok.model) == (CHAT, 200, "completed", "sim-model")  # type: ignore[attr-defined]
    assert ok.chunks >= 4 and ok.ttft_ms > 0 and ok.duration_ms >= ok.ttft_ms  # type: ignore[attr-defined]
    assert 0 < ok.backend_ms <= ok.ttft_ms  # type: ignore[attr-defined]
    assert (missing.status, missing.outcome, missing.ttft_ms) == (404, "model_not_found", None)  # type: ignore[attr-defined]
    assert missing.backend_ms is None  # type: ignore[attr-defined]
    assert "obs-log-1" in ok.getMessage()


async def test_ticker_fills_the_status_series(
    obs_gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    gw = obs_gateway
    r = await client.post(gw.url + CHAT, json=chat_body(stream=True, max_tokens=8))
    assert r.status_code == 200

    async def series() -> dict[str, list[float | None]]:
        data: dict[str, list[float | None]] = (
            await client.get(gw.url + "/status/data?window=30")
        ).json()["series"]
        return data

    async with asyncio.timeout(5):
        while not any((await series())["events"]):  # noqa: ASYNC110 - the ticker's output
            await asyncio.sleep(0.2)
    s = await series()
    assert len(s["t"]) >= 1
    assert sum(v for v in s["requests"] if v) > 0
    assert any(v is not None for v in s["ttft_p50"])


async def test_metrics_and_status_data_need_a_key_when_keys_are_set(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = Settings(backend_urls=(simulator.url,), api_keys=frozenset({"k1"}))
    async with run_gateway(settings) as gw:
        for path in ("/metrics", "/status/data"):
            assert (await client.get(gw.url + path)).status_code == 401
            r = await client.get(gw.url + path, headers={"authorization": "Bearer k1"})
            assert r.status_code == 200


async def test_overhead_is_observed_once_the_relay_records_the_send_time(
    obs_gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    gw = obs_gateway
    r = await client.post(gw.url + CHAT, json=chat_body(max_tokens=2))
    assert r.status_code == 200
    got = await scrape(client, gw)
    assert got["vllm_gateway_overhead_seconds_count"] == 1
    # The gateway's own time before the send is well under the whole request's.
    assert (
        got["vllm_gateway_overhead_seconds_sum"]
        < got[f'vllm_gateway_request_duration_seconds_sum{{route="{CHAT}"}}']
    )


async def test_backend_connections_are_counted_and_reused(
    obs_gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    gw = obs_gateway
    name = gw.gateway.settings.backend_urls[0]
    opened = f'vllm_gateway_backend_connections_opened_total{{backend="{name}"}}'
    held = f'vllm_gateway_backend_connections{{backend="{name}"}}'
    before = (await scrape(client, gw)).get(opened, 0.0)
    for _ in range(3):  # one after the other: one connection, kept alive and reused
        r = await client.post(gw.url + CHAT, json=chat_body(max_tokens=2))
        assert r.status_code == 200
    got = await scrape(client, gw)
    assert got[opened] - before <= 1 and got[opened] >= 1
    assert got[held] >= 1
    # Three at once need three connections.
    results = await asyncio.gather(
        *(client.post(gw.url + CHAT, json=chat_body(max_tokens=20, stream=True)) for _ in range(3))
    )
    assert [r.status_code for r in results] == [200] * 3
    got = await scrape(client, gw)
    assert got[held] >= 3 and got[opened] >= 3


async def test_front_door_rejections_are_counted_once_the_hook_is_in(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = Settings(backend_urls=(simulator.url,), api_keys=frozenset({"k1"}))
    async with run_gateway(settings) as gw:
        r = await client.post(gw.url + CHAT, json=chat_body(), headers={"x-request-id": "no-key"})
        assert r.status_code == 401
        r = await client.get(gw.url + "/metrics", headers={"authorization": "Bearer k1"})
        got = samples(r.text)
        key = (
            f'vllm_gateway_requests_total{{route="{CHAT}",status="401",'
            f'outcome="authentication_error"}}'
        )
        assert got[key] == 1


async def test_json_log_format_gives_one_json_access_line_per_request(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    env = {"VLLM_BACKEND_URL": simulator.url, "VLLM_LOG_FORMAT": "json"}
    with spawn_gateway(env, name="access-json") as gw:
        r = await client.post(
            gw.url + CHAT,
            json=chat_body(stream=True, max_tokens=3),
            headers={"x-request-id": "obs-json-1"},
        )
        assert r.status_code == 200

        def access_lines() -> list[dict[str, object]]:
            found = []
            for line in gw.log().splitlines():
                if line.startswith("{") and '"vllm_gateway.access"' in line:
                    found.append(json.loads(line))
            return found

        async with asyncio.timeout(10):
            while not access_lines():  # noqa: ASYNC110 - another process's log file
                await asyncio.sleep(0.05)
        gw.terminate()
        await asyncio.to_thread(gw.process.wait, 15)
    (line,) = access_lines()
    assert line["request_id"] == "obs-json-1"
    assert line["level"] == "info"
    assert line["route"] == CHAT
    for field in (
        "tenant",
        "model",
        "backend",
        "queue_wait_ms",
        "ttft_ms",
        "duration_ms",
        "chunks",
        "prompt_tokens",
        "completion_tokens",
    ):
        assert field in line, field
    # Regression: uvicorn answers receive() with http.disconnect as soon as a response is
    # complete, and the disconnect watcher used to record a whole stream as a 499.
    assert (line["status"], line["outcome"]) == (200, "completed")


async def test_every_answer_carries_its_overhead_and_the_log_and_metric_say_the_same(
    obs_gateway: RunningGateway, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """X-Gateway-Overhead-Ms on a body, a stream, a relayed 4xx, a 502 after the send and the
    gateway's own 400 and 404: the access log's overhead_ms and the histogram hold its value."""
    gw = obs_gateway
    asks: dict[str, dict[str, object] | bytes] = {
        "ov-body": chat_body(max_tokens=4),
        "ov-stream": chat_body(stream=True, max_tokens=4),
        "ov-4xx": chat_body(vllm_sim={"status": 400}),
        "ov-502": chat_body(vllm_sim={"status": 500}),
        "ov-404": chat_body(model="no-such-model"),
        "ov-400": b"{not json",
    }
    expected = {
        "ov-body": 200,
        "ov-stream": 200,
        "ov-4xx": 400,
        "ov-502": 502,
        "ov-404": 404,
        "ov-400": 400,
    }
    headers: dict[str, float] = {}
    with caplog.at_level(logging.INFO, logger="vllm_gateway.access"):
        for rid, body in asks.items():
            r = await client.post(
                gw.url + CHAT,
                headers={"x-request-id": rid, "content-type": "application/json"},
                content=body if isinstance(body, bytes) else json.dumps(body),
            )
            assert r.status_code == expected[rid], (rid, r.text)
            headers[rid] = float(r.headers["x-gateway-overhead-ms"])
    lines = {
        getattr(rec, "request_id", None): rec
        for rec in caplog.records
        if rec.name == "vllm_gateway.access"
    }
    for rid, ms in headers.items():
        line = lines[rid]
        # Sane: a non-negative share of the request's own time, and the log says the same.
        assert 0 <= ms <= line.duration_ms, rid  # type: ignore[attr-defined]
        assert line.overhead_ms == pytest.approx(ms, abs=0.001), rid  # type: ignore[attr-defined]
        assert f"overhead_ms={ms:.3f}" in line.getMessage(), rid
    # The stream's header went out with its head: the time before the send, below the first byte.
    assert headers["ov-stream"] <= lines["ov-stream"].ttft_ms  # type: ignore[attr-defined]
    got = await scrape(client, gw)
    assert got["vllm_gateway_overhead_seconds_count"] == len(asks)
    assert got["vllm_gateway_overhead_seconds_sum"] == pytest.approx(
        sum(headers.values()) / 1000, abs=len(asks) * 1e-6
    )
