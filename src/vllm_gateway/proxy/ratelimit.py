"""Per-key limits on requests per minute and tokens per minute, shared through Redis when there is one.

``RateLimiter.acquire(key, tokens)`` lets a request through or raises ``errors.RateLimited`` with a
``retry_after`` (seconds until the request would fit), and says how many tokens it charged (None
when the key has no token limit); ``record_tokens(key, tokens)`` charges tokens known only after
the response (a negative value refunds an over-estimate). What a key is charged is the sum of what
``acquire`` charged and ``record_tokens`` was given for it: a caller settles a request with
``record_tokens(key, used - charged)``.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp per
limit): each limit stores a "theoretical arrival time" ``tat``; a cost ``n`` at a rate of ``r`` per
minute moves it to ``max(tat, now) + n * 60/r``; it is allowed while ``tat - now`` stays within one
minute, i.e. a key may burst a full minute's allowance, then goes at the steady rate. Tokens charged
after the fact may push ``tat`` beyond the minute: the key is then in debt and waits it out. The
request and token limits are checked together and charged only if both allow. A cost larger than a
whole minute's allowance is charged as that allowance (it passes on a full bucket rather than
never); ``acquire`` returns what it charged, so that the settlement after the response charges
the rest. Intervals are whole nanoseconds (in process) or microseconds (Redis), rounded down, so
that a minute's allowance of N always fits N.

Two stores: in-process (one dict, per replica), and Redis (one Lua script, atomic, on Redis's own
clock, so that every replica shares one limit). Every Redis call is bounded by ``redis_timeout``;
when Redis fails or is slow the limiter falls back to its in-process store, logs a warning, and
tries Redis again after ``redis_retry_interval``, logging again when it is back. Redis is never the
reason a request fails. Keys are hashed before they reach Redis: API keys are not stored there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_gateway.errors import RateLimited

__all__ = ["Limit", "RateLimiter"]

log = logging.getLogger("vllm_gateway.proxy.ratelimit")

_WINDOW = 60.0  # seconds: the burst a key may take at once is one minute's allowance

# KEYS: request tat, token tat. ARGV: µs per request (0: no limit), µs per token (0: no limit),
# token cost, mode (1 acquire, 0 record). Returns {allowed, wait in µs, tokens charged}.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local req_iv = tonumber(ARGV[1])
local tok_iv = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local acquire = ARGV[4] == '1'
local function tat_of(key)
  local v = redis.call('GET', key)
  if v then return math.max(tonumber(v), now) end
  return now
end
local function store(key, tat)
  local ttl = math.ceil((tat - now) / 1000) + 1000
  redis.call('SET', key, string.format('%.0f', tat), 'PX', ttl)
end
if not acquire then
  if tok_iv > 0 then store(KEYS[2], math.max(tat_of(KEYS[2]) + cost * tok_iv, now)) end
  return {1, 0, 0}
end
local wait = 0
local rtat = 0
local ttat = 0
local charged = 0
if req_iv > 0 then
  rtat = tat_of(KEYS[1]) + req_iv
  wait = math.max(wait, rtat - now - math.max(window, req_iv))
end
if tok_iv > 0 then
  -- a cost above the whole allowance is let through on a full bucket rather than never
  charged = math.min(cost, math.floor(window / tok_iv))
  ttat = tat_of(KEYS[2]) + charged * tok_iv
  wait = math.max(wait, ttat - now - window)
end
if wait > 0 then return {0, math.ceil(wait), 0} end
if req_iv > 0 then store(KEYS[1], rtat) end
if tok_iv > 0 then store(KEYS[2], ttat) end
return {1, 0, charged}
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """Per-minute limits; None means no limit of that kind."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def intervals(self) -> tuple[float, float]:
        """Seconds per request and per token (0.0: unlimited)."""
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        return (_WINDOW / rpm if rpm else 0.0, _WINDOW / tpm if tpm else 0.0)


_WINDOW_NS = 60_000_000_000


class _LocalStore:
    """The same GCRA as the Lua script, on this process's monotonic clock, in integer
    nanoseconds: the comparisons at the edge of the window are exact (a float ``tat - now - 60``
    could come out a hair above 0 and refuse a key's very first request)."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._tats: dict[str, list[int]] = {}
        self._ops = 0
        self._clock = clock

    def apply(self, key: str, req_iv: float, tok_iv: float, cost: int, acquire: bool) -> float:
        """0.0 when allowed (and charged), else the seconds to wait."""
        now = self._clock()
        req_ns, tok_ns = int(req_iv * 1e9), int(tok_iv * 1e9)  # rounded down: N fit a window
        tats = self._tats.get(key)
        if tats is None:
            tats = self._tats[key] = [now, now]
            self._prune(now)
        if not acquire:
            if tok_ns:
                tats[1] = max(max(tats[1], now) + cost * tok_ns, now)
            return 0.0
        wait = 0
        rtat = ttat = 0
        if req_ns:
            rtat = max(tats[0], now) + req_ns
            # A request costlier than the whole window (under 1 a minute) still passes on a
            # full bucket, as a token cost larger than the allowance does.
            wait = max(wait, rtat - now - max(_WINDOW_NS, req_ns))
        if tok_ns:
            ttat = max(tats[1], now) + min(cost, _WINDOW_NS // tok_ns) * tok_ns
            wait = max(wait, ttat - now - _WINDOW_NS)
        if wait > 0:
            return wait / 1e9
        if req_ns:
            tats[0] = rtat
        if tok_ns:
            tats[1] = ttat
        return 0.0

    def _prune(self, now: int) -> None:
        # Bounded memory: every so often forget keys whose buckets are full again.
        self._ops += 1
        if self._ops % 1024 == 0:
            for k in [k for k, (r, t) in self._tats.items() if r <= now and t <= now]:
                del self._tats[k]


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        redis_url: str | None = None,
        overrides: Mapping[str, Limit] | None = None,
        redis_timeout: float = 0.1,
        redis_retry_interval: float = 5.0,
        key_prefix: str = "vllm_gateway:rl:",
    ) -> None:
        self.default = Limit(requests_per_minute, tokens_per_minute)
        self.overrides = dict(overrides or {})
        self.redis_url = redis_url
        self.redis_timeout = redis_timeout
        self.redis_retry_interval = redis_retry_interval
        self.key_prefix = key_prefix
        self.local = _LocalStore()
        self.fallbacks = 0  # times the limiter fell back from Redis
        self.limited = 0  # requests refused
        self._redis: Any = None
        self._script: Any = None
        self._redis_down_until: float | None = None  # None: Redis is (believed) up

    @property
    def mode(self) -> str:
        """'redis' while limits are shared, 'local' when there is no Redis or it is down."""
        if self._redis is None or self._redis_down_until is not None:
            return "local"
        return "redis"

    def limit_for(self, key: str) -> Limit:
        return self.overrides.get(key, self.default)

    async def start(self) -> None:
        if self.redis_url and self._redis is None:
            import redis.asyncio as aioredis  # imported only when a Redis is configured

            self._redis = aioredis.Redis.from_url(
                self.redis_url,
                socket_timeout=self.redis_timeout,
                socket_connect_timeout=self.redis_timeout,
                retry_on_timeout=False,
                health_check_interval=0,
            )
            self._script = self._redis.register_script(_LUA)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def counts_tokens(self, key: str) -> bool:
        """Whether ``key`` has a token limit (its requests' real counts matter)."""
        return bool(self.limit_for(key).tokens_per_minute)

    async def acquire(self, key: str, tokens: int = 0) -> int | None:
        """Let a request through, charging it ``tokens``; else raise ``RateLimited``. Returns the
        tokens charged (at most a minute's allowance), or None when the key has no token limit."""
        limit = self.limit_for(key)
        req_iv, tok_iv = limit.intervals()
        if not req_iv and not tok_iv:
            return None
        wait, charged = await self._apply(key, req_iv, tok_iv, max(0, int(tokens)), True)
        if wait > 0:
            self.limited += 1
            raise RateLimited(retry_after=wait)
        return charged if tok_iv else None

    async def record_tokens(self, key: str, tokens: int) -> None:
        """Charge tokens counted after the response (negative: refund an over-estimate)."""
        _, tok_iv = self.limit_for(key).intervals()
        if tok_iv and tokens:
            await self._apply(key, 0.0, tok_iv, int(tokens), False)

    async def _apply(
        self, key: str, req_iv: float, tok_iv: float, cost: int, acquire: bool
    ) -> tuple[float, int]:
        """(seconds to wait, 0.0 when allowed; the tokens charged)."""
        if self._redis is None or not self._redis_usable():
            return self._apply_local(key, req_iv, tok_iv, cost, acquire)
        digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        keys = [f"{self.key_prefix}{digest}:r", f"{self.key_prefix}{digest}:t"]
        # Whole microseconds: Redis's clock is in µs, and integers keep its arithmetic exact.
        args = [int(req_iv * 1e6), int(tok_iv * 1e6), cost, 1 if acquire else 0]
        try:
            async with asyncio.timeout(self.redis_timeout):
                allowed, wait_us, charged = await self._script(keys=keys, args=args)
        except Exception as exc:  # any Redis trouble: never the request's
            self._redis_failed(exc)
            return self._apply_local(key, req_iv, tok_iv, cost, acquire)
        if self._redis_down_until is not None:
            self._redis_down_until = None
            log.warning(
                "rate limiter: Redis at %s is back; limits are shared across replicas again",
                self._safe_url(),
            )
        return (0.0, int(charged)) if int(allowed) else (int(wait_us) / 1e6, 0)

    def _apply_local(
        self, key: str, req_iv: float, tok_iv: float, cost: int, acquire: bool
    ) -> tuple[float, int]:
        wait = self.local.apply(key, req_iv, tok_iv, cost, acquire)
        tok_ns = int(tok_iv * 1e9)
        return wait, (min(cost, _WINDOW_NS // tok_ns) if tok_ns and not wait else 0)

    def _redis_usable(self) -> bool:
        down = self._redis_down_until
        return down is None or time.monotonic() >= down

    def _redis_failed(self, exc: BaseException) -> None:
        first = self._redis_down_until is None
        self._redis_down_until = time.monotonic() + self.redis_retry_interval
        if first:
            self.fallbacks += 1
            log.warning(
                "rate limiter: Redis at %s failed (%s); falling back to per-replica limits "
                "until it answers again",
                self._safe_url(),
                type(exc).__name__ or "timeout",
            )

    def _safe_url(self) -> str:
        """The Redis URL without its password, for logs."""
        url = self.redis_url or ""
        scheme, sep, rest = url.partition("://")
        if sep and "@" in rest:
            return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return url
