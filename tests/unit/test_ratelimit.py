"""The rate limiter's arithmetic, on its in-process store (no Redis)."""

from __future__ import annotations

import pytest

from vllm_gateway.errors import RateLimited
from vllm_gateway.proxy.ratelimit import Limit, RateLimiter, _LocalStore


async def test_requests_per_minute_allows_the_burst_then_refuses_with_retry_after() -> None:
    rl = RateLimiter(requests_per_minute=3)
    for _ in range(3):
        await rl.acquire("k")
    with pytest.raises(RateLimited) as caught:
        await rl.acquire("k")
    assert caught.value.retry_after is not None
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
    assert caught.value.retry_after is not None
    assert 11.0 <= caught.value.retry_after <= 12.5  # 20 tokens over the allowance at 100/min
    await rl.acquire("k", tokens=40)  # exactly the rest of the allowance
    await rl.record_tokens("k", -50)  # refund an over-estimate
    await rl.acquire("k", tokens=50)
    await rl.record_tokens("k", 30)  # counted after the response: the key is now in debt
    with pytest.raises(RateLimited) as debt:
        await rl.acquire("k")
    assert debt.value.retry_after is not None
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


class _PinnedClock:
    def __init__(self, seconds: float) -> None:
        self.ns = round(seconds * 1e9)

    def __call__(self) -> int:
        return self.ns


@pytest.mark.parametrize("rpm", [1, 3, 7, 60, 0.5])
def test_a_new_key_is_never_refused_its_first_request_whatever_the_clock(rpm: float) -> None:
    # Regression: with floats, `tat - now - 60` came out a hair above 0 for about 2.6% of clock
    # values (1000.07 s among them) and a new key's very first request was refused.
    req_iv = 60.0 / rpm
    for i in range(4000):
        seconds = 100.0 + i * 0.4737 + (0.07 if i % 7 == 0 else 0.0)
        store = _LocalStore(_PinnedClock(seconds))
        assert store.apply("k", req_iv, 0.0, 0, True) == 0.0, (rpm, seconds)
    store = _LocalStore(_PinnedClock(1000.07))
    burst = max(1, int(rpm))
    for _ in range(burst):
        assert store.apply("k", req_iv, 0.0, 0, True) == 0.0
    wait = store.apply("k", req_iv, 0.0, 0, True)
    assert wait == pytest.approx(req_iv, rel=1e-9)


def test_exactly_a_full_window_of_tokens_fits_and_one_more_does_not() -> None:
    clock = _PinnedClock(1000.07)
    store = _LocalStore(clock)
    tok_iv = 60.0 / 7  # a rate whose interval is not a whole number of nanoseconds
    assert store.apply("k", 0.0, tok_iv, 7, True) == 0.0
    assert store.apply("k", 0.0, tok_iv, 1, True) > 0
    clock.ns += round(tok_iv * 1e9)  # one token's worth later, one token fits again
    assert store.apply("k", 0.0, tok_iv, 1, True) == 0.0


@pytest.mark.parametrize("rpm", [7, 11, 13, 17, 23, 29, 31, 37, 41, 43, 97, 101, 997])
def test_a_minute_s_allowance_of_n_always_fits_n_at_once(rpm: int) -> None:
    # Regression: an interval rounded up to whole nanoseconds (60/11 s) made N of them exceed the
    # window by a few ns, and the N-th request of a fresh key's burst was refused.
    store = _LocalStore(_PinnedClock(1000.07))
    req_iv, tok_iv = Limit(rpm, rpm).intervals()
    for _ in range(rpm):
        assert store.apply("r", req_iv, 0.0, 0, True) == 0.0
    assert store.apply("r", req_iv, 0.0, 0, True) > 0
    assert store.apply("t", 0.0, tok_iv, rpm, True) == 0.0
    assert store.apply("t", 0.0, tok_iv, 1, True) > 0


async def test_acquire_says_what_it_charged_and_a_settlement_charges_the_rest() -> None:
    rl = RateLimiter(requests_per_minute=100, tokens_per_minute=100)
    assert await rl.acquire("k", tokens=30) == 30
    await rl.record_tokens("k", 45 - 30)  # used 45
    # A budget above the whole allowance is charged as the allowance, and says so: settling with
    # what the request asked for instead would refund tokens never charged.
    assert await rl.acquire("big", tokens=1000) == 100
    await rl.record_tokens("big", 75 - 100)  # used 75: the key stays charged 75
    with pytest.raises(RateLimited):
        await rl.acquire("big", tokens=26)
    assert await rl.acquire("big", tokens=25) == 25
    with pytest.raises(RateLimited):
        await rl.acquire("k", tokens=56)
    assert await rl.acquire("k", tokens=55) == 55
    assert await RateLimiter(requests_per_minute=5).acquire("k", tokens=9) is None  # no token limit
    assert await RateLimiter().acquire("k", tokens=9) is None
