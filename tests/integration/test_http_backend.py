"""HTTPBackend / ConnectionPool against the real simulator on loopback.

What the relay relies on: the body arrives byte for byte as sent, connections are reused, closing a
response early aborts the request upstream, every failure is ``BackendUnavailable`` at the right
moment, cancellation leaves nothing busy, a stalled consumer does not make the client buffer
without bound, and a thousand streams at once complete.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import chat_body, run_gateway, sse_events
from vllm_gateway.backends.base import UpstreamRequest
from vllm_gateway.backends.http.backend import HTTPBackend
from vllm_gateway.backends.http.connection import HIGH_WATER, HTTPResponse
from vllm_gateway.errors import BackendUnavailable
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.timeout(60)

FAST = SimulatorConfig(ttft=0.005, itl=0.002, tokens=8)


def chat(stream: bool = True, rid: str = "r1", **sim: Any) -> UpstreamRequest:
    body: dict[str, Any] = {
        "model": "sim-model",
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
    }
    if sim:
        body["vllm_sim"] = sim
    return UpstreamRequest("POST", "/v1/chat/completions", orjson.dumps(body), None, stream, rid)


async def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(FAST, host="127.0.0.1", port=0) as s:
        yield s


@pytest.fixture
async def backend(sim: Simulator) -> AsyncIterator[HTTPBackend]:
    b = HTTPBackend(sim.url, connect_timeout=2.0)
    await b.start()
    yield b
    await b.aclose()


async def raw_body(port: int, request: UpstreamRequest) -> bytes:
    """The body as sent, de-chunked by hand from a plain socket (the reference)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Request-ID: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (request.path.encode(), request.request_id.encode(), len(request.body), request.body)
    )
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"chunked" in head.lower()
    out = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += rest[:size]
        rest = rest[size + 2 :]


def same_second(body: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', body)


async def test_stream_is_byte_identical_to_what_the_simulator_sent(
    sim: Simulator, backend: HTTPBackend
) -> None:
    request = chat(rid="same-id")
    resp = await backend.send(request)
    assert resp.status == 200 and resp.content_type.startswith("text/event-stream")
    ours, reference = await asyncio.gather(_collect(resp), raw_body(sim.port, request))
    assert same_second(ours) == same_second(reference)
    assert ours.endswith(b"data: [DONE]\n\n") and ours.count(b"data: ") == 8 + 2
    await resp.aclose()


async def _collect(resp: Any) -> bytes:
    return b"".join([piece async for piece in resp.chunks()])


async def test_non_streamed_body_and_keep_alive_reuse(sim: Simulator, backend: HTTPBackend) -> None:
    for i in range(5):
        resp = await backend.send(chat(stream=i % 2 == 0))
        body = await resp.read(1 << 20)
        assert resp.status == 200 and body
        await resp.aclose()
    assert sim.stats()["connections"] == 1
    assert backend.open_connections() == 1
    assert sim.stats()["completed"] == 5


async def test_health_models_and_headers_sent(sim: Simulator) -> None:
    b = HTTPBackend(sim.url, api_key="k")
    await b.start()
    try:
        assert await b.check_health(2) is True
        assert await b.model_ids(2) == ["sim-model"]
        resp = await b.send(chat(stream=False, rid="rid-7"))
        await resp.read(1 << 20)
        headers = sim.stats()["requests"][-1]["headers"]
        assert headers["x-request-id"] == "rid-7"
        assert headers["authorization"] == "Bearer k"
        assert headers["content-type"] == "application/json"
        sim.configure(unhealthy=True)
        assert await b.check_health(2) is False
    finally:
        await b.aclose()


async def test_closing_mid_stream_aborts_upstream(sim: Simulator, backend: HTTPBackend) -> None:
    resp = await backend.send(chat(itl=0.05, tokens=50))
    first = await anext(resp.chunks())
    assert first.startswith(b"data: ")
    await resp.aclose()
    await wait_for(lambda: sim.stats()["aborted"] == 1)
    assert backend.open_connections() == 0  # never returned to the pool


async def test_refused_connection_is_backend_unavailable_within_the_connect_timeout() -> None:
    async with run_simulator(FAST, host="127.0.0.1", port=0) as s:
        url = s.url  # a port that was just free and is now closed
    b = HTTPBackend(url, connect_timeout=1.0)
    await b.start()
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await b.send(chat())
    assert time.monotonic() - t0 < 1.5
    assert await b.check_health(1) is False
    await b.aclose()


async def test_drop_mid_stream_is_an_error_after_the_delivered_chunks(
    sim: Simulator, backend: HTTPBackend
) -> None:
    resp = await backend.send(chat(drop_after=3, tokens=20))
    received = b""
    with pytest.raises(BackendUnavailable):
        async for piece in resp.chunks():
            received += piece
    assert received.count(b"data: ") == 3
    await resp.aclose()
    assert backend.open_connections() == 0


async def test_hang_with_an_outer_timeout_cancels_cleanly(
    sim: Simulator, backend: HTTPBackend
) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await backend.send(chat(hang=True))
    assert backend.open_connections() == 0
    await wait_for(lambda: sim.stats()["aborted"] == 1)
    # The next request works on a fresh connection.
    resp = await backend.send(chat(stream=False))
    assert resp.status == 200
    await resp.read(1 << 20)


async def test_stalled_consumer_pauses_reading(sim: Simulator, backend: HTTPBackend) -> None:
    resp = await backend.send(chat(malformed="huge_line", huge_line_bytes=8 << 20, tokens=4))
    assert isinstance(resp, HTTPResponse)
    await asyncio.sleep(0.5)  # the consumer reads nothing while the backend sends 8 MiB
    held = resp._buffered
    assert resp._paused
    # Bounded by the high-water mark plus at most one socket read beyond it.
    assert HIGH_WATER < held <= HIGH_WATER + (1 << 20)
    total = 0
    async for piece in resp.chunks():  # then it catches up and everything arrives
        total += len(piece)
        assert resp._buffered <= HIGH_WATER + (1 << 20)
    assert total > 8 << 20
    await resp.aclose()


async def test_a_thousand_concurrent_streams_complete(sim: Simulator, backend: HTTPBackend) -> None:
    sim.configure(ttft=0.01, itl=0.02, tokens=5)

    async def one(i: int) -> bytes:
        resp = await backend.send(chat(rid=f"r{i}"))
        try:
            return await _collect(resp)
        finally:
            await resp.aclose()

    bodies = await asyncio.gather(*(one(i) for i in range(1000)))
    assert all(b.endswith(b"data: [DONE]\n\n") and b.count(b"data: ") == 7 for b in bodies)
    assert sim.stats()["completed"] == 1000
    assert backend.open_connections() == backend.pool.idle_connections() == 1000


async def test_error_status_body_is_read_and_the_connection_kept(
    sim: Simulator, backend: HTTPBackend
) -> None:
    resp = await backend.send(chat(stream=False, status=500))
    assert resp.status == 500 and "json" in resp.content_type
    assert b"error" in await resp.read(1 << 20)
    await resp.aclose()
    assert backend.pool.idle_connections() == 1


# --- through the gateway: the relay on HTTPBackend ------------------------------------------


async def test_gateway_relays_a_stream_and_a_body_over_fast_backend(sim: Simulator) -> None:
    backend = HTTPBackend(sim.url)
    settings = Settings(backend_urls=(sim.url,))
    async with (
        run_gateway(settings, backend=backend) as gw,
        httpx.AsyncClient(timeout=10) as client,
    ):
        # The model list and the health check the gateway asks for at start come first; their
        # connections go idle in the pool.
        await wait_for(
            lambda: gw.gateway.models.known("sim-model") and backend.busy_connections() == 0
        )
        kept = backend.open_connections()
        async with client.stream(
            "POST", gw.url + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=6)
        ) as r:
            text = (await r.aread()).decode()
        assert r.status_code == 200
        events = sse_events(text)
        assert events[-1] == "[DONE]" and len(events) == 6 + 2
        r2 = await client.post(gw.url + "/v1/chat/completions", json=chat_body(max_tokens=3))
        assert r2.status_code == 200 and r2.json()["usage"]["completion_tokens"] == 3
        await wait_for(lambda: backend.busy_connections() == 0)
        assert backend.open_connections() == kept  # both went over kept-alive connections


async def test_gateway_client_leaving_aborts_upstream_over_fast_backend(sim: Simulator) -> None:
    backend = HTTPBackend(sim.url)
    settings = Settings(backend_urls=(sim.url,))
    async with run_gateway(settings, backend=backend) as gw:
        await wait_for(
            lambda: gw.gateway.models.known("sim-model") and backend.busy_connections() == 0
        )
        kept = backend.open_connections()  # the start's model list and health check, idle
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        body = orjson.dumps(chat_body(stream=True, max_tokens=500, vllm_sim={"itl": 0.02}))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        assert b" 200 " in await reader.readline()
        await reader.readuntil(b"data: ")
        writer.close()
        await wait_for(lambda: sim.stats()["aborted"] == 1)
        # The stream took an idle connection; the abort closed it rather than pool it.
        await wait_for(lambda: backend.open_connections() == kept - 1)
