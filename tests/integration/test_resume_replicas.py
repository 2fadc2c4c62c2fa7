"""Idempotency-Key across two gateway replicas through one real redis-server: a stream begun on
one replica resumes on the other; a retry on the other replica is not generated again; a reader
of a generation whose replica was killed gets an error, not a hang."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import redis.asyncio as aioredis

from tests.conftest import chat_body, run_gateway, spawn_gateway
from tests.integration.test_ratelimit import pytestmark as needs_redis
from tests.integration.test_ratelimit import redis_server
from tests.resume_client import event_id, request
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator

pytestmark = needs_redis


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_a_stream_begun_on_one_replica_resumes_on_the_other(tmp_path: Path) -> None:
    config = SimulatorConfig(ttft=0.05, itl=0.05, tokens=12)
    with redis_server(tmp=tmp_path) as redis_url:
        async with (
            run_simulator(config) as sim,
            run_gateway(backend_urls=(sim.url,), redis_url=redis_url) as one,
            run_gateway(backend_urls=(sim.url,), redis_url=redis_url) as two,
        ):
            body = chat_body(stream=True, max_tokens=12)
            first = await request(one.port, body, "across", drop_after=3)
            assert [event_id(e) for e in first.events] == [1, 2, 3]
            rest = await request(two.port, body, "across", last_event_id=3)
            assert rest.status == 200 and rest.headers["idempotent-replayed"] == "true"
            assert rest.body.endswith(b"data: [DONE]\n\n")
            whole = await request(two.port, body, "across")
            assert first.body + rest.body == whole.body
            # A non-streamed retry on the other replica: one upstream request in all.
            answer = await request(one.port, chat_body(max_tokens=4), "plain")
            again = await request(two.port, chat_body(max_tokens=4), "plain")
            assert answer.status == again.status == 200 and answer.body == again.body
            other = await request(two.port, chat_body(max_tokens=5), "plain")
            assert other.status == 422
            assert sim.stats()["total"] == 2


async def test_a_reader_of_a_killed_replicas_generation_gets_an_error(tmp_path: Path) -> None:
    config = SimulatorConfig(ttft=0.05, itl=0.05, tokens=400)
    with redis_server(tmp=tmp_path) as redis_url:
        async with (
            run_simulator(config) as sim,
            run_gateway(backend_urls=(sim.url,), redis_url=redis_url) as two,
        ):
            env = {"VLLM_BACKEND_URL": sim.url, "VLLM_REDIS_URL": redis_url}
            with spawn_gateway(env, name="resume-killed") as one:
                body = chat_body(stream=True, max_tokens=400)
                first = await request(_port(one.url), body, "killed", drop_after=3)
                assert len(first.events) == 3
                # The generation goes on without its client: wait until it has kept more.
                store = aioredis.Redis.from_url(redis_url)
                logs = await store.keys("vllm_gateway:idem:*:log")

                async def kept() -> int:
                    return int(await store.xlen(logs[0]))

                async with asyncio.timeout(20):
                    while await kept() < 8:  # noqa: ASYNC110 - state in Redis
                        await asyncio.sleep(0.02)
                await store.aclose()
                one.terminate(signal.SIGKILL)  # the replica running the generation
                one.process.wait(10)
            # The other replica relays what was kept, then says the generation is gone.
            rest = await request(two.port, body, "killed", last_event_id=3)
            assert rest.status == 200
            last = rest.events[-1]
            assert b"result_lost" in last and b"[DONE]" not in rest.body
            assert [event_id(e) for e in rest.events[:-1]] == list(
                range(4, 4 + len(rest.events) - 1)
            )
            # The key again, from the start: the lost generation runs again, on this replica.
            again = await request(two.port, body, "killed")
            assert again.status == 200 and again.events[-1].endswith(b"data: [DONE]\n\n")
            assert sim.stats()["total"] == 2
