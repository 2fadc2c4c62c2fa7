"""The rate limiter's arithmetic, on its in-process store (no Redis)."""

from __future__ import annotations

import pytest

from vllm_gateway.errors import RateLimited
from vllm_gateway.ratelimit import Limit, RateLimiter


async def test_requests_per_minute_allows_the_burst_then_refuses_with_retry_after() -> None:
    rl = RateLimiter(requests_per_minute=3)
    for _ in range(3):
        await rl.acquire("k")
    with pytest.raises(RateLimited) as caught:
        await rl.acquire("k")
    assert 19.0 <= caught.value.retry_after <= 20.5  # one request's worth of a 3/min rate
    assert caught.value.status == 429
    assert dict(caught.value.headers()) == {b"retry-after": b"20"}
    assert rl.limited == 1 and rl.mode == "local"


async def test_keys_are_independent_and_overrides_apply() -> None:
    rl = RateLimiter(requests_per_minute=1, overrides={"vip": Limit(requests_per_minute=5)})
    await rl.acquire("a")
    await rl.acquire("b")
    for _ in range(5):
        await rl.acquire("vip")
    for key in ("a", "b", "vip"):
        with pytest.raises(RateLimited):
            await rl.acquire(key)


async def test_no_limits_never_refuses() -> None:
    rl = RateLimiter()
    for _ in range(1000):
        await rl.acquire("k", tokens=10_000)
    await rl.record_tokens("k", 10_000)


async def test_tokens_per_minute_counts_acquired_and_recorded_tokens() -> None:
    rl = RateLimiter(tokens_per_minute=100)
    await rl.acquire("k", tokens=60)
    with pytest.raises(RateLimited) as caught:
        await rl.acquire("k", tokens=60)
    assert 11.0 <= caught.value.retry_after <= 12.5  # 20 tokens over the allowance at 100/min
    await rl.acquire("k", tokens=40)  # exactly the rest of the allowance
    await rl.record_tokens("k", -50)  # refund an over-estimate
    await rl.acquire("k", tokens=50)
    await rl.record_tokens("k", 30)  # counted after the response: the key is now in debt
    with pytest.raises(RateLimited) as debt:
        await rl.acquire("k")
    assert 17.0 <= debt.value.retry_after <= 18.5


async def test_a_request_larger_than_the_allowance_passes_on_a_full_bucket_only() -> None:
    rl = RateLimiter(tokens_per_minute=100)
    await rl.acquire("k", tokens=500)
    with pytest.raises(RateLimited):
        await rl.acquire("k", tokens=1)


async def test_both_limits_are_charged_only_when_both_allow() -> None:
    rl = RateLimiter(requests_per_minute=2, tokens_per_minute=100)
    await rl.acquire("k", tokens=90)
    with pytest.raises(RateLimited):
        await rl.acquire("k", tokens=50)  # tokens refuse: the request must not be charged either
    await rl.acquire("k", tokens=10)  # the second request still fits
    with pytest.raises(RateLimited):
        await rl.acquire("k")


async def test_password_is_hidden_in_logged_url() -> None:
    rl = RateLimiter(redis_url="redis://user:secret@redis.example:6379/0")
    assert "secret" not in rl._safe_url() and rl._safe_url().endswith("redis.example:6379/0")
