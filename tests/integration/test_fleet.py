"""A fleet that changes under traffic, against real simulators and the real gateway on loopback:
members join (after their checks, then ramping up), drain, leave and come back; a pool with no
member ready makes requests wait instead of failing them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import RunningGateway, chat_body, free_port, run_gateway, wait_for
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.fleet import FleetFull
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator
from vllm_gateway_tools.soak import SimulatorProcess

pytestmark = pytest.mark.timeout(90)

FAST: dict[str, Any] = {
    "health_interval": 0.1,
    "health_timeout": 0.5,
    "watchdog_stall": 5.0,
    "readmit_backoff": 0.2,
    "slow_start": 0.0,
}
PACE = SimulatorConfig(ttft=0.01, itl=0.005, tokens=4)
# The slow members' end of text lies past every stream's max_tokens: a continuation ends at the
# answer's end of text, where the unbroken chat answer wrote its whole budget.
SLOW_EOS = 256


@contextlib.asynccontextmanager
async def gateway(
    urls: list[str], *, queue_wait: float = 30.0, **knobs: Any
) -> AsyncIterator[tuple[RunningGateway, PoolBackend]]:
    settings = Settings(backend_urls=tuple(urls), queue_wait_timeout=queue_wait)
    pool = PoolBackend(settings, config=PoolConfig(**{**FAST, **knobs}))
    async with run_gateway(settings, backend=pool) as gw:
        yield gw, pool


def states(pool: PoolBackend) -> dict[str, str]:
    return {d["url"]: d["state"] for d in pool.fleet.describe()}


async def _chat(client: httpx.AsyncClient, url: str, **extra: Any) -> httpx.Response:
    return await client.post(url + "/v1/chat/completions", json=chat_body(**extra))


# --- no member ready is a wait -----------------------------------------------------------------


async def test_a_request_waits_for_a_member_that_starts_late_instead_of_failing() -> None:
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    async with gateway(urls) as (gw, pool), httpx.AsyncClient(timeout=60) as client:
        assert set(states(pool).values()) == {"joining"}  # nothing listens yet
        task = asyncio.create_task(_chat(client, gw.url))
        await wait_for(lambda: gw.gateway.admission.in_flight == 1)
        assert (await client.get(gw.url + "/health/ready")).status_code == 503
        assert not task.done()
        async with run_simulator(PACE, port=ports[1]) as late:
            resp = await asyncio.wait_for(task, 30)
            assert resp.status_code == 200
            assert late.stats()["total"] == 1
            assert states(pool)[urls[1]] == "ready"
            for _ in range(100):  # the probes' answer is kept a second (READY_TTL)
                if (await client.get(gw.url + "/health/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("/health/ready did not turn ready")


async def test_a_request_that_finds_no_member_ready_gets_503_at_the_queue_wait() -> None:
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    async with gateway(urls, queue_wait=0.3) as (gw, _), httpx.AsyncClient(timeout=30) as client:
        resp = await _chat(client, gw.url)
        assert resp.status_code == 503
        assert resp.json()["error"]["type"] == "no_healthy_backend"


# --- joining: checks first, then a ramp --------------------------------------------------------


async def test_an_added_member_gets_traffic_only_after_its_checks_then_ramps_up() -> None:
    async with (
        run_simulator(PACE) as a,
        run_simulator(PACE) as b,
        run_simulator(PACE) as c,
        gateway([a.url, b.url], slow_start=3.0) as (gw, pool),
        httpx.AsyncClient(timeout=30) as client,
    ):
        c.configure(unhealthy=True)
        member = await pool.fleet.add(c.url)
        assert states(pool)[c.url] == "joining" and not member.up
        for _ in range(6):
            assert (await _chat(client, gw.url)).status_code == 200
        assert c.stats()["total"] == 0  # no traffic while its health check fails
        c.configure(unhealthy=False)
        await wait_for(lambda: member.state == "ready")
        assert member.weight < member.base_weight  # ramping
        await wait_for(lambda: member.weight == member.base_weight, timeout=30)
        results = await asyncio.gather(*(_chat(client, gw.url) for _ in range(30)))
        assert all(r.status_code == 200 for r in results)
        assert c.stats()["total"] > 0


# --- leaving: drain, deadline, gone ------------------------------------------------------------


async def _stream(client: httpx.AsyncClient, url: str, tokens: int) -> str:
    body = chat_body(stream=True, max_tokens=tokens)
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        return "".join([line async for line in resp.aiter_lines()])


async def _busy(pool: PoolBackend) -> Any:
    """The member serving the one request in flight."""
    await wait_for(lambda: sum(m.in_flight for m in pool.fleet.members) == 1)
    return next(m for m in pool.fleet.members if m.in_flight)


def _text(raw: str, tokens: int) -> bool:
    return "data: [DONE]" in raw and all(f'"content":" tok{i}"' in raw for i in range(tokens))


async def test_a_removed_member_finishes_its_streams_then_goes() -> None:
    slow = SimulatorConfig(ttft=0.01, itl=0.05, tokens=SLOW_EOS)
    async with (
        run_simulator(slow) as a,
        run_simulator(PACE) as b,
        gateway([a.url, b.url], drain_timeout=30.0) as (gw, pool),
        httpx.AsyncClient(timeout=30) as client,
    ):
        pool.fleet.find(b.url).weight = 0.001  # the stream goes to a
        task = asyncio.create_task(_stream(client, gw.url, 20))
        first = await _busy(pool)
        assert first.url == a.url
        pool.fleet.find(b.url).weight = 1.0
        pool.fleet.remove(a.url)
        assert first.state == "draining"
        # The stream's own request may still be on its way to a: count from once it has arrived.
        await wait_for(lambda: a.stats()["total"] == 1)
        for _ in range(5):
            assert (await _chat(client, gw.url)).status_code == 200
        assert a.stats()["total"] == 1  # no new request for a draining member
        raw = await task
        assert _text(raw, 20)
        assert a.stats()["completed"] == 1  # it finished there: no failover
        await wait_for(lambda: first.state == "gone")
        assert [m.url for m in pool.fleet.members] == [b.url]
        assert {d["url"]: d["state"] for d in pool.fleet.describe()}[a.url] == "gone"
        metrics = gw.app.observer.metrics.render()
        assert 'outcome="resumed"' not in metrics


async def test_at_the_drain_deadline_streams_move_token_exact() -> None:
    slow = SimulatorConfig(ttft=0.01, itl=0.05, tokens=SLOW_EOS)
    async with (
        run_simulator(slow) as a,
        run_simulator(slow) as b,
        gateway([a.url, b.url], drain_timeout=0.3) as (gw, pool),
        httpx.AsyncClient(timeout=30) as client,
    ):
        task = asyncio.create_task(_stream(client, gw.url, 30))
        first = await _busy(pool)
        pool.fleet.drain(first.url)
        raw = await task
        assert _text(raw, 30) and raw.count("data: [DONE]") == 1
        metrics = gw.app.observer.metrics.render()
        assert 'reason="ejected",outcome="resumed"} 1' in metrics
        assert first.state == "draining"  # drained, not removed: it stays until undrained
        pool.fleet.undrain(first.url)
        await wait_for(lambda: first.state == "ready")


async def test_reconcile_drains_what_a_source_no_longer_names_and_respects_the_cap() -> None:
    async with (
        run_simulator(PACE) as a,
        run_simulator(PACE) as b,
        run_simulator(PACE) as c,
        gateway([a.url, b.url], max_members=3) as (_, pool),
    ):
        fleet = pool.fleet
        got = await fleet.reconcile([c.url], "dns")
        assert got == {"added": 1, "removed": 0, "refused": 0}
        await wait_for(lambda: states(pool)[c.url] == "ready")
        # Another source's members are not its to remove; the cap holds.
        with pytest.raises(FleetFull):
            await fleet.add(f"http://127.0.0.1:{free_port()}")
        got = await fleet.reconcile([c.url, "http://127.0.0.1:1", "http://127.0.0.1:2"], "dns")
        assert got == {"added": 0, "removed": 0, "refused": 2}
        got = await fleet.reconcile([], "dns")
        assert got["removed"] == 1
        await wait_for(lambda: states(pool).get(c.url) == "gone")
        assert {m.url for m in fleet.members} == {a.url, b.url}
        # A member named again while it drains stays (it joins again).
        fleet.remove(a.url)
        await fleet.add(a.url)
        await wait_for(lambda: fleet.find(a.url).state == "ready")


async def test_a_flapping_member_stays_bounded() -> None:
    async with (
        run_simulator(PACE) as a,
        run_simulator(PACE) as b,
        gateway([a.url], max_members=4) as (_, pool),
    ):
        fleet = pool.fleet
        for _ in range(200):
            await fleet.add(b.url)
            fleet.remove(b.url)
        await wait_for(lambda: len(fleet.members) == 1)
        assert len(fleet.describe()) <= 1 + 16  # the members, and the last ones gone


async def test_a_draining_member_that_dies_first_moves_its_streams_at_once() -> None:
    pace = ("--ttft", "0.01", "--itl", "0.05", "--tokens", str(SLOW_EOS))
    with SimulatorProcess(*pace) as a, SimulatorProcess(*pace) as b:
        async with (
            gateway([a.url, b.url], drain_timeout=600.0) as (gw, pool),
            httpx.AsyncClient(timeout=60) as client,
        ):
            task = asyncio.create_task(_stream(client, gw.url, 60))
            first = await _busy(pool)
            pool.fleet.drain(first.url)
            for _ in range(3):  # a few more chunks from the draining member: it is mid-stream
                mark = first.last_progress
                await wait_for(lambda: first.last_progress > mark)  # noqa: B023
            (a if first.url == a.url else b).kill()  # SIGKILL, long before its drain deadline
            raw = await asyncio.wait_for(task, 30)
            assert _text(raw, 60) and raw.count("data: [DONE]") == 1
            metrics = gw.app.observer.metrics.render()
            assert 'outcome="resumed"} 1' in metrics


def test_a_pool_given_more_members_than_its_cap_fails_at_start() -> None:
    urls = tuple(f"http://127.0.0.1:{port}" for port in (1, 2, 3))
    with pytest.raises(ValueError, match="holds 2 at most"):
        PoolBackend(Settings(backend_urls=urls), config=PoolConfig(max_members=2))
