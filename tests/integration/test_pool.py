"""The pool against real simulators on loopback: directly, and through the full gateway."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypedDict

import httpx
import orjson
import pytest

from tests.conftest import chat_body, run_gateway, sse_events, wait_for
from vllm_gateway.backends.base import UpstreamRequest
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.config import BackendSpec, PoolConfig
from vllm_gateway.errors import NoHealthyBackend, UpstreamError
from vllm_gateway.settings import PoolSettings, Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, start_simulator


class _Fast(TypedDict):
    health_interval: float
    health_timeout: float
    watchdog_stall: float
    canary_timeout: float
    readmit_backoff: float
    admission_wait: float
    retry_budget_min: int


FAST = _Fast(
    health_interval=0.1,
    health_timeout=0.5,
    watchdog_stall=0.3,
    canary_timeout=0.3,
    readmit_backoff=0.2,
    admission_wait=1.0,
    retry_budget_min=100,
)


@contextlib.asynccontextmanager
async def sims(n: int, **cfg: Any) -> AsyncIterator[list[Simulator]]:
    base = dict(ttft=0.01, itl=0.005, tokens=4)
    started = [await start_simulator(SimulatorConfig(**{**base, **cfg})) for _ in range(n)]
    try:
        yield started
    finally:
        for s in started:
            await s.close()


@contextlib.asynccontextmanager
async def pool_of(
    members: list[Simulator] | list[BackendSpec], **knobs: Any
) -> AsyncIterator[PoolBackend]:
    specs = [m if isinstance(m, BackendSpec) else BackendSpec(url=m.url) for m in members]
    pool = PoolBackend(
        # A request that finds no member ready waits for one up to the queue wait.
        Settings(backend_urls=tuple(s.url for s in specs), queue_wait_timeout=0.5),
        specs=specs,
        config=PoolConfig(**{**FAST, **knobs}),
    )
    await pool.start()
    try:
        yield pool
    finally:
        await pool.aclose()


def request(
    stream: bool = False,
    model: str = "sim-model",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> UpstreamRequest:
    body = chat_body(stream=stream, max_tokens=4, model=model, **extra)
    return UpstreamRequest(
        "POST", "/v1/chat/completions", orjson.dumps(body), body, stream, "t", model, headers or {}
    )


async def call(pool: PoolBackend, req: UpstreamRequest) -> tuple[int, bytes]:
    resp = await pool.send(req)
    try:
        return resp.status, await resp.read(1 << 20)
    finally:
        await resp.aclose()


def totals(members: list[Simulator]) -> list[int]:
    return [s.stats()["total"] for s in members]


async def test_least_outstanding_spreads_concurrent_load() -> None:
    async with sims(3, ttft=0.1) as members, pool_of(members) as pool:
        results = await asyncio.gather(*(call(pool, request()) for _ in range(30)))
        assert all(status == 200 for status, _ in results)
        assert sum(totals(members)) == 30
        assert min(totals(members)) >= 5, totals(members)
        assert all(m["in_flight"] == 0 and m["requests"] >= 5 for m in pool.stats())


async def test_requests_go_only_to_members_serving_the_model() -> None:
    async with (
        sims(1, models=("alpha",)) as a,
        sims(2, models=("beta", "gamma")) as b,
        pool_of([*a, *b]) as pool,
    ):
        assert await pool.model_ids(1.0) == ["alpha", "beta", "gamma"]
        results = await asyncio.gather(*(call(pool, request(model="beta")) for _ in range(10)))
        assert [s for s, _ in results] == [200] * 10
        assert totals(a) == [0] and sum(totals(b)) == 10
        status, _ = await call(pool, request(model="alpha"))
        assert status == 200 and totals(a) == [1]
        # The merged /v1/models listing, as the gateway's models route asks for it.
        resp = await pool.send(UpstreamRequest("GET", "/v1/models"))
        ids = [d["id"] for d in orjson.loads(await resp.read(1 << 20))["data"]]
        assert sorted(ids) == ["alpha", "beta", "gamma"]


async def test_declared_models_from_specs_are_trusted() -> None:
    async with sims(2) as members:
        specs = [
            BackendSpec(url=members[0].url, models=("sim-model",)),
            BackendSpec(url=members[1].url, models=("other",)),
        ]
        async with pool_of(specs) as pool:
            for _ in range(6):
                assert (await call(pool, request()))[0] == 200
            assert totals(members) == [6, 0]
            resp = await pool.send(UpstreamRequest("GET", "/v1/models"))
            ids = [d["id"] for d in orjson.loads(await resp.read(1 << 20))["data"]]
            assert ids == ["sim-model", "other"] == await pool.model_ids(1.0)


async def test_pool_from_a_backends_file(tmp_path: Path) -> None:
    async with sims(2, ttft=0.2) as members:
        path = tmp_path / "backends.yaml"
        path.write_text(
            "backends:\n"
            f"  - url: {members[0].url}\n    name: big\n    weight: 3\n"
            f"  - url: {members[1].url}\n    name: small\n    max_outstanding: 1\n"
        )
        settings = Settings(
            backends_file=str(path),
            connect_timeout=1.0,
            pool=PoolSettings(health_interval=0.1, admission_wait=5.0),
        )
        pool = PoolBackend(settings)
        await pool.start()
        try:
            assert [m["name"] for m in pool.stats()] == ["big", "small"]
            results = await asyncio.gather(*(call(pool, request()) for _ in range(8)))
            assert [s for s, _ in results] == [200] * 8
            big, small = totals(members)
            assert big > small >= 1  # weight 3 takes most; the small one never holds two
        finally:
            await pool.aclose()


async def test_session_affinity_sticks_to_one_member() -> None:
    async with sims(3) as members, pool_of(members, routing="session") as pool:
        for _ in range(8):
            assert (await call(pool, request(headers={"X-Session-ID": "abc"})))[0] == 200
        assert sorted(totals(members))[-1] == 8
        # The body's "user" field is a session key too; many sessions spread over the members.
        for i in range(30):
            await call(pool, request(user=f"user-{i}"))
        assert sum(1 for t in totals(members) if t > 0) >= 2


async def test_affinity_yields_when_its_member_is_a_hot_spot() -> None:
    async with sims(3, ttft=0.3) as members, pool_of(members, routing="session") as pool:
        reqs = [request(headers={"x-session-id": "hot"}) for _ in range(12)]
        results = await asyncio.gather(*(call(pool, r) for r in reqs))
        assert all(s == 200 for s, _ in results)
        assert sum(1 for t in totals(members) if t > 0) >= 2, totals(members)
        assert pool.pool_stats()["affinity_yields"] > 0


async def test_prefix_affinity_routes_a_shared_prefix_together() -> None:
    async with (
        sims(3) as members,
        pool_of(members, routing="prefix", affinity_prefix_chars=40) as pool,
    ):
        system = {"role": "system", "content": "You are a careful assistant. " * 4}
        for i in range(8):
            messages = [system, {"role": "user", "content": f"question {i}"}]
            assert (await call(pool, request(messages=messages)))[0] == 200
        assert sorted(totals(members))[-1] == 8


async def test_stopped_member_is_ejected_and_no_request_is_lost() -> None:
    async with sims(3, ttft=0.02) as members, pool_of(members, eject_after_failures=2) as pool:
        await members[1].close()  # refused connections from now on
        results = await asyncio.gather(*(call(pool, request()) for _ in range(30)))
        assert [s for s, _ in results] == [200] * 30
        await wait_for(lambda: not pool.stats()[1]["healthy"], timeout=3)
        assert sum(totals([members[0], members[2]])) == 30
        dead = pool.stats()[1]
        assert dead["ejections"] >= 1 and dead["in_flight"] == 0
        assert pool.pool_stats()["retries"] >= 1 or dead["errors"].get("health", 0) > 0
        assert await pool.check_health(1.0)


async def test_5xx_is_retried_elsewhere_and_the_member_ejected() -> None:
    async with (
        sims(2) as members,
        pool_of(members, eject_after_failures=3, readmit_backoff=1.0) as pool,
    ):
        members[0].configure(status=500)
        results = [await call(pool, request()) for _ in range(10)]
        assert [s for s, _ in results] == [200] * 10
        bad = pool.stats()[0]
        assert bad["errors"]["status_5xx"] == 3 and not bad["healthy"]
        assert bad["down_reason"] == "failures"
        # /health still passes: it comes back once its backoff has passed.
        await wait_for(lambda: pool.stats()[0]["healthy"], timeout=5)


async def test_all_members_failing_gives_the_last_error_within_the_retry_limit() -> None:
    async with (
        sims(4) as members,
        pool_of(members, max_retries=2, eject_after_failures=100) as pool,
    ):
        for s in members:
            s.configure(status=503)
        status, _ = await call(pool, request())
        assert status == 503
        assert sum(totals(members)) == 3  # the first try and two retries, no more


async def test_retry_budget_bounds_retries() -> None:
    async with (
        sims(2) as members,
        pool_of(
            members, retry_budget_min=2, retry_budget_ratio=0.0, eject_after_failures=100
        ) as pool,
    ):
        members[0].configure(status=500)
        members[1].configure(status=500)
        for _ in range(6):
            await call(pool, request())
        assert (
            pool.pool_stats()["retries"] == 2 and pool.pool_stats()["retry_budget_exhausted"] >= 1
        )


async def test_drop_before_first_byte_is_retried() -> None:
    async with sims(2) as members, pool_of(members, eject_after_failures=100) as pool:
        members[0].configure(drop_after=0)
        for _ in range(6):
            status, body = await call(pool, request(stream=True))
            assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        assert members[0].stats()["dropped"] >= 1
        assert pool.stats()[0]["errors"]["dropped"] == members[0].stats()["dropped"]
        assert members[1].stats()["completed"] == 6
        resp = await pool.send(request(stream=True))
        await resp.read(1 << 20)
        await resp.aclose()
        assert resp.served_by == members[1].url  # the retried one


async def test_drop_mid_body_of_a_non_streamed_answer_is_retried() -> None:
    # The relay forwards a non-streamed answer only once it is whole: a drop mid-body is retried.
    async with sims(2) as members, pool_of(members, eject_after_failures=100) as pool:
        members[0].configure(drop_after=1)
        for _ in range(4):
            status, body = await call(pool, request())
            assert status == 200 and orjson.loads(body)["choices"]
        assert members[0].stats()["dropped"] >= 1
        assert members[1].stats()["completed"] == 4 and pool.pool_stats()["retries"] >= 1


async def test_drop_mid_stream_is_an_error_not_a_retry() -> None:
    async with sims(2) as members, pool_of(members, eject_after_failures=100) as pool:
        for s in members:
            s.configure(drop_after=2)
        resp = await pool.send(request(stream=True))
        got = []
        try:
            with pytest.raises(UpstreamError):
                async for chunk in resp.chunks():
                    got.append(chunk)
        finally:
            await resp.aclose()
        assert got and sum(totals(members)) == 1 and pool.pool_stats()["retries"] == 0


async def test_hung_member_is_caught_by_the_watchdog_and_its_requests_move() -> None:
    async with sims(2) as members, pool_of(members) as pool:
        members[0].configure(hang=True)
        results = await asyncio.wait_for(
            asyncio.gather(*(call(pool, request()) for _ in range(8))), timeout=10
        )
        assert [s for s, _ in results] == [200] * 8
        hung = pool.stats()[0]
        assert not hung["healthy"] and hung["down_reason"] == "watchdog"
        assert hung["errors"]["canary"] >= 1
        # /health passes, but a watchdog ejection also needs a canary to come back: it stays out.
        await asyncio.sleep(0.8)
        assert not pool.stats()[0]["healthy"]
        members[0].configure(hang=False)
        await wait_for(lambda: pool.stats()[0]["healthy"], timeout=5)


async def test_stalled_stream_trips_the_watchdog() -> None:
    async with sims(2) as members, pool_of(members) as pool:
        members[0].configure(stall_after=1)
        members[1].configure(stall_after=1)
        resp = await pool.send(request(stream=True))
        try:
            first = await anext(resp.chunks())
            assert first
            stalled = pool.stats()
            name = resp.served_by
            assert name is not None
            idx = [m["name"] for m in stalled].index(name)
            await wait_for(lambda: not pool.stats()[idx]["healthy"], timeout=5)
            assert pool.stats()[idx]["down_reason"] == "watchdog"
        finally:
            await resp.aclose()
        assert pool.stats()[idx]["in_flight"] == 0


async def test_unhealthy_member_leaves_and_comes_back() -> None:
    async with sims(2) as members, pool_of(members, health_fail_threshold=2) as pool:
        members[0].configure(unhealthy=True)
        await wait_for(lambda: not pool.stats()[0]["healthy"], timeout=3)
        for _ in range(4):
            await call(pool, request())
        assert totals(members) == [0, 4]
        members[0].configure(unhealthy=False)
        await wait_for(lambda: pool.stats()[0]["healthy"], timeout=3)
        members[1].configure(unhealthy=True)
        await wait_for(lambda: not pool.stats()[1]["healthy"], timeout=3)
        members[0].configure(unhealthy=True)
        await wait_for(lambda: not pool.stats()[0]["healthy"], timeout=3)
        assert not await pool.check_health(1.0)
        with pytest.raises(NoHealthyBackend):
            await pool.send(request())


async def test_per_member_limit_holds_and_full_pool_answers_503() -> None:
    async with (
        sims(2, ttft=0.2) as members,
        pool_of(members, max_outstanding=2, admission_wait=5.0) as pool,
    ):
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, *(s.stats()["running"] for s in members))
                await asyncio.sleep(0.005)

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            results = await asyncio.gather(*(call(pool, request()) for _ in range(12)))
        finally:
            watcher.cancel()
        assert [s for s, _ in results] == [200] * 12
        assert 1 <= peak <= 2
    async with (
        sims(1, ttft=0.5) as members,
        pool_of(members, max_outstanding=1, admission_wait=0.05) as pool,
    ):
        outcomes = await asyncio.gather(
            *(call(pool, request()) for _ in range(3)), return_exceptions=True
        )
        assert sum(isinstance(o, NoHealthyBackend) for o in outcomes) == 2
        assert NoHealthyBackend().status == 503


# --- through the full gateway ----------------------------------------------------------------


async def test_gateway_builds_a_pool_and_spreads_load(client: httpx.AsyncClient) -> None:
    async with sims(3, ttft=0.05) as members:
        settings = Settings(backend_urls=tuple(s.url for s in members), max_concurrent_requests=32)
        async with run_gateway(settings) as gw:
            assert isinstance(gw.gateway.backend, PoolBackend)
            resps = await asyncio.gather(
                *(client.post(gw.url + "/v1/chat/completions", json=chat_body()) for _ in range(15))
            )
            assert [r.status_code for r in resps] == [200] * 15
            assert all(t > 0 for t in totals(members))
            models = (await client.get(gw.url + "/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["sim-model"]


async def test_gateway_loses_no_request_when_a_member_stops(client: httpx.AsyncClient) -> None:
    async with sims(3, ttft=0.02) as members:
        urls = tuple(s.url for s in members)
        pool = PoolBackend(Settings(backend_urls=urls), config=PoolConfig(**FAST))
        async with run_gateway(
            Settings(backend_urls=urls, max_concurrent_requests=32), backend=pool
        ) as gw:
            await members[2].close()
            resps = await asyncio.gather(
                *(
                    client.post(gw.url + "/v1/chat/completions", json=chat_body(stream=s % 2 == 0))
                    for s in range(20)
                )
            )
            assert [r.status_code for r in resps] == [200] * 20
            assert (await client.get(gw.url + "/health/ready")).status_code == 200


async def test_gateway_mid_stream_drop_is_an_error_event_when_failover_is_off(
    client: httpx.AsyncClient,
) -> None:
    # With failover on, tests/integration/test_failover.py shows the stream going on instead.
    async with sims(2) as members:
        for s in members:
            s.configure(drop_after=2)
        urls = tuple(s.url for s in members)
        pool = PoolBackend(Settings(backend_urls=urls), config=PoolConfig(**FAST, failover_max=0))
        async with run_gateway(Settings(backend_urls=urls), backend=pool) as gw:
            async with client.stream(
                "POST", gw.url + "/v1/chat/completions", json=chat_body(stream=True)
            ) as resp:
                text = (await resp.aread()).decode()
            assert resp.status_code == 200
            events = sse_events(text)
            assert "[DONE]" not in events and "error" in orjson.loads(events[-1])
            assert sum(totals(members)) == 1 and pool.pool_stats()["retries"] == 0


async def test_gateway_all_members_down_is_503_after_the_queue_wait(
    client: httpx.AsyncClient,
) -> None:
    async with sims(2) as members:
        for s in members:
            s.configure(unhealthy=True)
        urls = tuple(s.url for s in members)
        settings = Settings(backend_urls=urls, queue_wait_timeout=0.5)
        pool = PoolBackend(settings, config=PoolConfig(**FAST))
        async with run_gateway(settings, backend=pool) as gw:
            resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body())
            assert resp.status_code == 503
            assert resp.json()["error"]["type"] == "no_healthy_backend"
            assert (await client.get(gw.url + "/health/ready")).status_code == 503


async def test_gateway_hung_member_is_ejected_and_requests_move(client: httpx.AsyncClient) -> None:
    async with sims(2) as members:
        members[0].configure(hang=True)
        urls = tuple(s.url for s in members)
        pool = PoolBackend(Settings(backend_urls=urls), config=PoolConfig(**FAST))
        async with run_gateway(
            Settings(backend_urls=urls, max_concurrent_requests=16), backend=pool
        ) as gw:
            resps = await asyncio.gather(
                *(
                    client.post(gw.url + "/v1/chat/completions", json=chat_body(stream=i % 2 == 0))
                    for i in range(10)
                )
            )
            assert [r.status_code for r in resps] == [200] * 10
            assert pool.stats()[0]["down_reason"] == "watchdog"
            assert members[1].stats()["completed"] == 10


async def test_gateway_session_affinity_by_user_field(client: httpx.AsyncClient) -> None:
    async with sims(3) as members:
        urls = tuple(s.url for s in members)
        pool = PoolBackend(
            Settings(backend_urls=urls), config=PoolConfig(**FAST, routing="session")
        )
        async with run_gateway(Settings(backend_urls=urls), backend=pool) as gw:
            for _ in range(6):
                resp = await client.post(
                    gw.url + "/v1/chat/completions", json=chat_body(user="alice")
                )
                assert resp.status_code == 200
            assert sorted(totals(members)) == [0, 0, 6]
