"""``--workers N``: several processes on one socket, one drain."""

from __future__ import annotations

import asyncio
import signal

import httpx

from tests.conftest import chat_body, spawn_gateway, sse_events, wait_for
from vllm_gateway_tools.simulator import Simulator


async def _ready(client: httpx.AsyncClient, url: str) -> None:
    """Wait (30 s at most) until the gateway at ``url`` answers ready."""

    async def ready() -> None:
        while True:
            try:
                if (await client.get(url + "/health/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)

    await asyncio.wait_for(ready(), 30)


async def _peak_running(simulator: Simulator, tasks: list[asyncio.Task[httpx.Response]]) -> int:
    """The most requests the simulator ran at once until ``tasks`` are all done."""
    peak = 0
    while not all(t.done() for t in tasks):
        peak = max(peak, simulator.stats()["running"])
        await asyncio.sleep(0.005)
    return peak


async def test_two_workers_serve_and_drain_together(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    simulator.configure(itl=0.01)
    env = {"VLLM_BACKEND_URL": simulator.url}
    with spawn_gateway(env, "--workers", "2", "--shutdown-timeout", "10", name="workers") as gw:
        await _ready(client, gw.url)
        results = await asyncio.gather(
            *[
                client.post(gw.url + "/v1/chat/completions", json=chat_body(max_tokens=3))
                for _ in range(8)
            ]
        )
        assert all(r.status_code == 200 for r in results)

        async def long_stream() -> list[str]:
            async with client.stream(
                "POST", gw.url + "/v1/chat/completions", json=chat_body(stream=True, max_tokens=100)
            ) as resp:
                return sse_events((await resp.aread()).decode())

        stream = asyncio.create_task(long_stream())
        await wait_for(lambda: simulator.stats()["running"] == 1)
        gw.terminate(signal.SIGTERM)
        events = await stream
        assert events[-1] == "[DONE]"  # the in-flight stream finished during the drain
        code = await asyncio.to_thread(gw.process.wait, 20)
        assert code == 0, gw.log()


async def test_stopped_while_workers_start_exits_zero(simulator: Simulator) -> None:
    # The socket is bound before the workers exist, so this SIGTERM reaches workers that are
    # still importing: they hold nothing, and the gateway must still exit 0, not 1.
    env = {"VLLM_BACKEND_URL": simulator.url}
    for attempt in range(3):  # three starts, each stopped at once
        with spawn_gateway(env, "--workers", "2", name=f"workers-early-{attempt}") as gw:
            gw.terminate(signal.SIGTERM)
            code = await asyncio.to_thread(gw.process.wait, 30)
            assert code == 0, gw.log()


async def test_two_workers_hold_one_limit_and_one_scrape_counts_both(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    # Regression: the limit was split statically (one worker could be full while the other had
    # room), and a scrape saw one worker only.
    simulator.configure(itl=0.05, tokens=40)
    env = {"VLLM_BACKEND_URL": simulator.url, "VLLM_MAX_CONCURRENT_REQUESTS": "2"}
    with spawn_gateway(env, "--workers", "2", name="workers-limit") as gw:
        await _ready(client, gw.url)
        # Separate connections, so the kernel spreads them over both workers.
        clients = [httpx.AsyncClient(timeout=30) for _ in range(6)]
        try:
            streams = [
                asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json=chat_body()))
                for c in clients
            ]
            peak = await _peak_running(simulator, streams)
            results = await asyncio.gather(*streams)
        finally:
            for c in clients:
                await c.aclose()
        assert [r.status_code for r in results] == [200] * 6
        assert peak == 2  # never more than the one limit, whichever worker took them
        for _ in range(4):  # whichever worker answers the scrape, it answers for both
            async with httpx.AsyncClient() as fresh:
                text = (await fresh.get(gw.url + "/metrics")).text
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("vllm_gateway_requests_total{")
                and 'route="/v1/chat/completions"' in line
            )
            assert total == 6, text[:2000]


async def test_two_workers_with_leases_hold_one_limit_under_a_flood(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    # A limit of 8 over 2 workers: each may keep up to 2 idle slots while nobody is queued. A
    # first wave leaves slots idle in the workers' leases; the flood then queues, the leases are
    # recalled, and the simulator never sees more than the one limit.
    simulator.configure(itl=0.02, tokens=20)
    env = {"VLLM_BACKEND_URL": simulator.url, "VLLM_MAX_CONCURRENT_REQUESTS": "8"}
    with spawn_gateway(env, "--workers", "2", name="workers-leases") as gw:
        await _ready(client, gw.url)
        clients = [httpx.AsyncClient(timeout=60) for _ in range(24)]
        try:
            first = await asyncio.gather(
                *[c.post(gw.url + "/v1/chat/completions", json=chat_body()) for c in clients[:4]]
            )
            assert [r.status_code for r in first] == [200] * 4
            flood = [
                asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json=chat_body()))
                for c in clients
            ]
            peak = await _peak_running(simulator, flood)
            results = await asyncio.gather(*flood)
        finally:
            for c in clients:
                await c.aclose()
        assert [r.status_code for r in results] == [200] * 24
        assert peak == 8  # reached, never passed, whichever worker held which slot
