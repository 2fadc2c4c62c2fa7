"""The rate limiter against a real redis-server on loopback: shared limits, fallback, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from vllm_gateway.errors import RateLimited
from vllm_gateway.proxy.ratelimit import RateLimiter

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")


@contextlib.contextmanager
def redis_server(port: int | None = None, tmp: Path | None = None) -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1 (no persistence); yields its URL."""
    port = port or free_port()
    assert REDIS is not None
    proc = subprocess.Popen(
        [
            REDIS,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp or "/tmp"),
            "--enable-debug-command",
            "local",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(10)


async def outcomes(limiters: list[RateLimiter], n: int, tokens: int = 0) -> list[bool]:
    out = []
    for i in range(n):
        try:
            await limiters[i % len(limiters)].acquire("shared-key", tokens)
            out.append(True)
        except RateLimited:
            out.append(False)
    return out


async def test_two_replicas_share_one_request_limit(tmp_path: Path) -> None:
    with redis_server(tmp=tmp_path) as url:
        a = RateLimiter(requests_per_minute=10, redis_url=url, redis_timeout=1.0)
        b = RateLimiter(requests_per_minute=10, redis_url=url, redis_timeout=1.0)
        await a.start()
        await b.start()
        try:
            got = await outcomes([a, b], 16)
            assert got.count(True) == 10 and got[:10] == [True] * 10
            assert a.mode == b.mode == "redis" and a.fallbacks == b.fallbacks == 0
            with pytest.raises(RateLimited) as caught:
                await b.acquire("shared-key")
            assert caught.value.retry_after is not None
            assert 5.0 <= caught.value.retry_after <= 6.5  # one request at 10/min
            assert dict(caught.value.headers())[b"retry-after"] == b"6"
            await a.acquire("another-key")  # other keys are untouched
        finally:
            await a.aclose()
            await b.aclose()


async def test_two_replicas_share_one_token_limit(tmp_path: Path) -> None:
    with redis_server(tmp=tmp_path) as url:
        a = RateLimiter(tokens_per_minute=100, redis_url=url, redis_timeout=1.0)
        b = RateLimiter(tokens_per_minute=100, redis_url=url, redis_timeout=1.0)
        await a.start()
        await b.start()
        try:
            await a.acquire("shared-key", 60)
            with pytest.raises(RateLimited):
                await b.acquire("shared-key", 60)
            await b.acquire("shared-key", 40)
            await a.record_tokens("shared-key", 30)  # debt, seen by the other replica
            with pytest.raises(RateLimited) as caught:
                await b.acquire("shared-key")
            assert caught.value.retry_after is not None
            assert 17.0 <= caught.value.retry_after <= 18.5
        finally:
            await a.aclose()
            await b.aclose()


async def test_redis_killed_falls_back_with_a_warning_and_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_gateway.proxy.ratelimit")
    port = free_port()
    rl = RateLimiter(
        requests_per_minute=1000,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_timeout=0.5,
        redis_retry_interval=0.2,
    )
    await rl.start()
    try:
        with redis_server(port, tmp_path):
            await rl.acquire("k")
            assert rl.mode == "redis"
        # Killed: the caller sees no exception, only a loud log line.
        for _ in range(5):
            await rl.acquire("k")
        assert rl.mode == "local" and rl.fallbacks == 1
        assert sum("falling back to per-replica limits" in r.message for r in caplog.records) == 1
        with redis_server(port, tmp_path):
            await asyncio.sleep(0.3)
            await rl.acquire("k")
            assert rl.mode == "redis"
            assert any("is back" in r.message for r in caplog.records)
    finally:
        await rl.aclose()


async def test_unreachable_redis_at_start_is_per_replica(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_gateway.proxy.ratelimit")
    rl = RateLimiter(
        requests_per_minute=2, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout=0.2
    )
    await rl.start()
    try:
        await rl.acquire("k")
        await rl.acquire("k")
        with pytest.raises(RateLimited):
            await rl.acquire("k")  # the local limit still holds
        assert rl.mode == "local" and any("falling back" in r.message for r in caplog.records)
    finally:
        await rl.aclose()


async def test_a_slow_redis_does_not_stall_the_request(tmp_path: Path) -> None:
    with redis_server(tmp=tmp_path) as url:
        rl = RateLimiter(requests_per_minute=100, redis_url=url, redis_timeout=0.1)
        await rl.start()
        blocker = await asyncio.create_subprocess_exec(
            "redis-cli",
            "-u",
            url,
            "DEBUG",
            "SLEEP",
            "2",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(0.2)  # the server is asleep now
            await asyncio.wait_for(rl.acquire("k"), timeout=1.5)  # answered well before Redis wakes
            assert rl.mode == "local"
        finally:
            await blocker.wait()
            await rl.aclose()


async def test_a_fresh_keys_first_request_and_whole_burst_pass_on_redis(tmp_path: Path) -> None:
    # The first request of a key Redis has never seen (no stored time): it passes with a whole
    # minute's tokens, is charged in Redis (another replica sees it), and, at rates whose interval
    # is not a whole number of microseconds, a burst of exactly a minute's allowance fits.
    with redis_server(tmp=tmp_path) as url:
        a = RateLimiter(tokens_per_minute=100, redis_url=url, redis_timeout=1.0)
        b = RateLimiter(tokens_per_minute=100, redis_url=url, redis_timeout=1.0)
        await a.start()
        await b.start()
        try:
            assert await a.acquire("fresh", 100) == 100
            assert a.mode == "redis" and a.fallbacks == 0  # served by Redis, not the fallback
            with pytest.raises(RateLimited) as caught:
                await b.acquire("fresh", 1)
            assert caught.value.retry_after is not None
            assert 0.5 <= caught.value.retry_after <= 0.61  # one token at 100 a minute
        finally:
            await a.aclose()
            await b.aclose()
        for rpm in (0.5, 1, 7, 11, 17, 31, 60):
            a = RateLimiter(rpm, redis_url=url, redis_timeout=1.0, key_prefix=f"{rpm}:")
            b = RateLimiter(rpm, redis_url=url, redis_timeout=1.0, key_prefix=f"{rpm}:")
            await a.start()
            await b.start()
            try:
                burst = max(1, int(rpm))
                for i in range(burst):
                    assert await (a, b)[i % 2].acquire("burst") is None, (rpm, i)
                with pytest.raises(RateLimited):
                    await b.acquire("burst")
                assert a.mode == b.mode == "redis" and a.fallbacks == b.fallbacks == 0
            finally:
                await a.aclose()
                await b.aclose()
