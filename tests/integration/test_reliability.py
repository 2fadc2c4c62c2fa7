"""Reliability cases R1-R11 and R13 of docs/reliability.md, against real servers on loopback.

What tests/integration/test_gateway_core.py already proves is not repeated here (the table in
docs/reliability.md says which test covers which case). Every response is judged by
``vllm_gateway_tools.soak.judge``: it must end in one of the four promised ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import RunningGateway, chat_body, free_port, run_gateway, sse_events, wait_for
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator
from vllm_gateway_tools.soak import SimulatorProcess, judge

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"


def _contents(events: list[str]) -> list[str]:
    out = []
    for e in events:
        if e == "[DONE]":
            continue
        for c in orjson.loads(e).get("choices", []):
            text = c.get("delta", {}).get("content")
            if text:
                out.append(text)
    return out


async def _request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], path: str = CHAT
) -> tuple[int, dict[str, str], bytes]:
    async with client.stream("POST", url + path, json=body) as resp:
        data = b"".join([c async for c in resp.aiter_raw()])
        return resp.status_code, dict(resp.headers), data


def _kept(status: int, headers: dict[str, str], data: bytes) -> str:
    ending, defect = judge(status, headers, data)
    assert defect is None, f"broken promise: {defect}: {status} {data[-300:]!r}"
    return ending


@contextlib.asynccontextmanager
async def _gateway_for(url: str, **settings: Any) -> AsyncIterator[RunningGateway]:
    async with run_gateway(Settings(backend_urls=(url,), **settings)) as gw:
        yield gw


def _acquired(gw: RunningGateway) -> int:
    return int(gw.gateway.backend.busy_connections())  # type: ignore[attr-defined]


async def _settled(gw: RunningGateway, sim: Simulator | None = None, timeout: float = 5.0) -> None:
    g = gw.gateway
    await wait_for(
        lambda: (
            g.admission.in_flight == 0
            and g.admission.queued == 0
            and not g.active
            and _acquired(gw) == 0
        ),
        timeout=timeout,
    )
    if sim is not None:
        await wait_for(lambda: sim.stats()["running"] == 0, timeout=timeout)


# --- R1, R2: overload -----------------------------------------------------------------------


async def test_r1_beyond_queue_gets_503_at_once_and_the_rest_complete(
    client: httpx.AsyncClient,
) -> None:
    c, q = 3, 3
    async with (
        run_simulator(SimulatorConfig(ttft=0.01, itl=0.02)) as sim,
        _gateway_for(
            sim.url, max_concurrent_requests=c, max_queued_requests=q, queue_wait_timeout=20
        ) as gw,
    ):
        loop = asyncio.get_running_loop()

        async def one() -> tuple[int, dict[str, str], bytes, float]:
            start = loop.time()
            status, headers, data = await _request(
                client, gw.url, chat_body(stream=True, max_tokens=40)
            )
            return status, headers, data, loop.time() - start

        results = await asyncio.gather(*[one() for _ in range(c + q + 5)])
        refused = [r for r in results if r[0] == 503]
        served = [r for r in results if r[0] != 503]
        assert len(refused) == 5
        for _, headers, data, took in refused:
            assert orjson.loads(data)["error"]["type"] == "overloaded"
            assert int(headers["retry-after"]) >= 1
            assert took < 0.5  # at once, not after a wait
        for status, headers, data, _ in served:
            assert _kept(status, headers, data) == "stream_done"
        assert sim.stats()["total"] == c + q
        await _settled(gw, sim)


async def test_r2_a_queued_stream_request_times_out_as_json_503(client: httpx.AsyncClient) -> None:
    async with (
        run_simulator(SimulatorConfig(ttft=0.01, itl=0.05)) as sim,
        _gateway_for(sim.url, max_concurrent_requests=2, queue_wait_timeout=0.5) as gw,
    ):
        holders = [
            asyncio.create_task(_request(client, gw.url, chat_body(stream=True, max_tokens=60)))
            for _ in range(2)
        ]
        await wait_for(lambda: sim.stats()["running"] == 2)
        seen = sim.stats()["total"]
        loop = asyncio.get_running_loop()
        start = loop.time()
        status, headers, data = await _request(client, gw.url, chat_body(stream=True))
        waited = loop.time() - start
        assert status == 503 and orjson.loads(data)["error"]["type"] == "queue_timeout"
        assert headers["content-type"] == "application/json"
        assert 0.5 <= waited < 1.0
        assert sim.stats()["total"] == seen
        for h in await asyncio.gather(*holders):
            assert _kept(*h) == "stream_done"


# --- R4: many clients leaving at awkward moments ----------------------------------------------


async def _raw_stream(
    port: int, body: bytes, leave: str | None, rng: random.Random
) -> bytes | None:
    """One streamed request on a raw socket; ``leave`` says when the client walks away."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    try:
        if leave == "before_headers":
            await asyncio.sleep(rng.uniform(0, 0.3))
            return None
        data = b""
        events_to_leave = 1 if leave == "after_first" else rng.randint(2, 8)
        while chunk := await reader.read(65536):
            data += chunk
            if leave and data.count(b"data: ") >= events_to_leave:
                return None
        return data
    finally:
        writer.transport.abort()  # a reset, not a polite close: the worst case for the gateway


async def test_r4_a_thousand_streams_half_abandoned_leave_nothing_behind(
    client: httpx.AsyncClient,
) -> None:
    c = 50
    rng = random.Random(4)
    async with (
        run_simulator(SimulatorConfig(ttft=0.01, itl=0.005)) as sim,
        _gateway_for(
            sim.url, max_concurrent_requests=c, max_queued_requests=1000, queue_wait_timeout=60
        ) as gw,
    ):
        body = orjson.dumps(chat_body(stream=True, max_tokens=12))
        plans = [
            rng.choice(["before_headers", "after_first", "mid"]) if i % 2 else None
            for i in range(1000)
        ]
        results = await asyncio.gather(*[_raw_stream(gw.port, body, p, rng) for p in plans])
        for plan, data in zip(plans, results, strict=True):
            if plan is None:
                assert data is not None and data.startswith(b"HTTP/1.1 200")
                assert b"data: [DONE]" in data and data.endswith(b"0\r\n\r\n")
        await _settled(gw, sim, timeout=10)
        fresh = await asyncio.gather(
            *[client.post(gw.url + CHAT, json=chat_body()) for _ in range(c)]
        )
        assert [r.status_code for r in fresh] == [200] * c
        await _settled(gw, sim)
        assert sim.stats()["aborted"] > 0  # some left mid-stream, and the backend saw them go


# --- R5: a client that leaves before the first token -------------------------------------------


async def test_r5_leaving_before_the_first_token_aborts_the_backend_request(
    client: httpx.AsyncClient,
) -> None:
    async with run_simulator(SimulatorConfig(ttft=30)) as sim, _gateway_for(sim.url) as gw:
        task = asyncio.create_task(_request(client, gw.url, chat_body(stream=True)))
        await wait_for(lambda: sim.stats()["running"] == 1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await wait_for(lambda: sim.stats()["running"] == 0, timeout=2)
        assert sim.stats()["aborted"] == 1
        await _settled(gw)


# --- R6, R7: the backend dies or refuses -----------------------------------------------------


async def test_r6_backend_process_killed_mid_stream(client: httpx.AsyncClient) -> None:
    with SimulatorProcess("--ttft", "0.01", "--itl", "0.02") as proc:
        async with _gateway_for(proc.url) as gw:
            async with client.stream(
                "POST", gw.url + CHAT, json=chat_body(stream=True, max_tokens=500)
            ) as resp:
                assert resp.status_code == 200
                data = b""
                async for chunk in resp.aiter_raw():
                    data += chunk
                    if data.count(b"data: ") >= 6 and not proc.process.poll():  # type: ignore[union-attr]
                        proc.kill()
                events = sse_events(data.decode())
            assert _kept(200, dict(resp.headers), data) == "stream_error"
            assert "[DONE]" not in events
            assert orjson.loads(events[-1])["error"]["type"] == "backend_unavailable"
            got = _contents(events[:-1])
            assert len(got) >= 5 and got == [f" tok{i}" for i in range(len(got))]
            await _settled(gw)

    # Not streamed: the backend dies while the request waits for its answer.
    with SimulatorProcess("--ttft", "5") as proc:
        async with _gateway_for(proc.url) as gw:
            task = asyncio.create_task(_request(client, gw.url, chat_body()))
            await wait_for(lambda: gw.gateway.admission.in_flight == 1)
            await asyncio.sleep(0.2)
            proc.kill()
            status, headers, data = await task
            assert status == 502 and _kept(status, headers, data) == "error_json"
            assert orjson.loads(data)["error"]["type"] == "backend_unavailable"
            await _settled(gw)


async def test_r7_refused_connections_are_502_within_the_connect_timeout(
    client: httpx.AsyncClient,
) -> None:
    async with _gateway_for(f"http://127.0.0.1:{free_port()}", connect_timeout=1.0) as gw:
        loop = asyncio.get_running_loop()
        for stream in (False, True):
            start = loop.time()
            status, headers, data = await _request(client, gw.url, chat_body(stream=stream))
            assert loop.time() - start < 1.0
            assert status == 502 and _kept(status, headers, data) == "error_json"
        await _settled(gw)


# --- R9, R10: stalls and malformed output ----------------------------------------------------


async def test_r9_idle_timeout_fires_at_ti_after_the_last_byte(client: httpx.AsyncClient) -> None:
    async with (
        run_simulator(SimulatorConfig(ttft=0.01, itl=0.01, stall_after=4)) as sim,
        _gateway_for(sim.url, stream_idle_timeout=0.5) as gw,
    ):
        loop = asyncio.get_running_loop()
        arrivals: list[tuple[float, bytes]] = []
        async with client.stream("POST", gw.url + CHAT, json=chat_body(stream=True)) as resp:
            async for chunk in resp.aiter_raw():
                arrivals.append((loop.time(), chunk))
        data = b"".join(c for _, c in arrivals)
        assert _kept(200, dict(resp.headers), data) == "stream_error"
        assert b"stream_idle_timeout" in arrivals[-1][1]
        gap = arrivals[-1][0] - arrivals[-2][0]
        assert 0.45 <= gap < 1.0
        await _settled(gw, sim)


@pytest.mark.parametrize(
    ("knobs", "status", "kind"),
    [
        ({"malformed": "html"}, 502, "bad_backend_response"),
        ({"malformed": "bad_json"}, 502, "bad_backend_response"),
        ({"drop_after": 2}, 502, "backend_unavailable"),
        ({"stall_after": 2}, 504, "request_timeout"),
    ],
)
async def test_r10_malformed_non_stream_answers_are_a_clear_error(
    client: httpx.AsyncClient, knobs: dict[str, Any], status: int, kind: str
) -> None:
    async with (
        run_simulator(SimulatorConfig(ttft=0.01, itl=0.01)) as sim,
        _gateway_for(sim.url, request_timeout=1.0) as gw,
    ):
        got, headers, data = await _request(
            client, gw.url, chat_body(max_tokens=20, vllm_sim=knobs)
        )
        assert (got, orjson.loads(data)["error"]["type"]) == (status, kind)
        _kept(got, headers, data)
        await _settled(gw, sim)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


async def test_r10_an_enormous_line_keeps_memory_bounded(client: httpx.AsyncClient) -> None:
    huge = 64 << 20  # 16 times the gateway's event cap
    with SimulatorProcess(
        "--ttft",
        "0.01",
        "--itl",
        "0.01",
        "--malformed",
        "huge_line",
        "--huge-line-bytes",
        str(huge),
    ) as proc:
        async with _gateway_for(proc.url) as gw:
            with open("/proc/self/clear_refs", "w") as f:  # noqa: ASYNC230 - a 1-byte /proc write
                f.write("5")  # reset this process's peak RSS
            before = _rss_kib("VmRSS")
            status, headers, data = await _request(
                client, gw.url, chat_body(stream=True, max_tokens=10)
            )
            peak = _rss_kib("VmHWM")
            assert _kept(status, headers, data) in ("stream_error", "error_json")
            assert b"bad_backend_response" in data
            assert (peak - before) < 32 << 10  # KiB: well under the 64 MiB line
            await _settled(gw)


# --- R11: nothing buffers ---------------------------------------------------------------------


async def test_r11_each_chunk_arrives_when_the_backend_sends_it(client: httpx.AsyncClient) -> None:
    async with (
        run_simulator(SimulatorConfig(ttft=0.2, itl=0.2)) as sim,
        _gateway_for(sim.url) as gw,
    ):
        loop = asyncio.get_running_loop()

        async def arrivals(url: str) -> list[float]:
            start = loop.time()
            times: list[float] = []
            buf = b""
            async with client.stream(
                "POST", url + CHAT, json=chat_body(stream=True, max_tokens=8)
            ) as r:
                async for chunk in r.aiter_raw():
                    buf += chunk
                    while b"\n\n" in buf:
                        _, buf = buf.split(b"\n\n", 1)
                        times.append(loop.time() - start)
            return times

        direct, via = await asyncio.gather(arrivals(sim.url), arrivals(gw.url))
        assert len(direct) == len(via) >= 9
        # Each event through the gateway arrives within 50 ms of the same event sent directly:
        # the backend's 200 ms pace survives, nothing is held back to fill a buffer.
        lags = [v - d for d, v in zip(direct, via, strict=True)]
        assert max(abs(lag) for lag in lags) < 0.05, lags


# --- R13: the backend restarts under load ------------------------------------------------------


async def test_r13_backend_restart_under_load_keeps_every_promise(
    client: httpx.AsyncClient,
) -> None:
    with SimulatorProcess("--ttft", "0.01", "--itl", "0.01") as proc:
        async with _gateway_for(
            proc.url, max_concurrent_requests=8, connect_timeout=1.0, first_token_timeout=2.0
        ) as gw:
            loop = asyncio.get_running_loop()
            stop = loop.time() + 5.0
            endings: list[str] = []

            async def worker(i: int) -> None:
                while loop.time() < stop:
                    body = chat_body(stream=i % 2 == 0, max_tokens=10)
                    endings.append(_kept(*await _request(client, gw.url, body)))

            workers = [asyncio.create_task(worker(i)) for i in range(8)]
            await asyncio.sleep(1.5)
            proc.kill()
            await wait_for(lambda: "error_json" in endings)
            assert (await client.get(gw.url + "/health/ready")).status_code == 503
            await asyncio.to_thread(proc.start)
            await wait_for(lambda: endings[-1] in ("json_200", "stream_done"), timeout=5)
            await asyncio.gather(*workers)
            assert (await client.get(gw.url + "/health/ready")).status_code == 200
            # Traffic resumed: the last request of every worker was served.
            assert endings.count("json_200") + endings.count("stream_done") > 16
            ok = await asyncio.gather(
                *[client.post(gw.url + CHAT, json=chat_body()) for _ in range(8)]
            )
            assert [r.status_code for r in ok] == [200] * 8
            await _settled(gw)
