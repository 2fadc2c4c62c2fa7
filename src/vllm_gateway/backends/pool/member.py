"""One member of a pool, the pool's retry budget, and the pure routing choices.

A ``Member`` wraps one ``HTTPBackend`` with the state the pool routes on: requests in flight, when
its in-flight requests last produced a byte (the watchdog reads it), whether it is up, its
consecutive failures and its error counters. It is touched only from the event loop, so plain
attributes need no lock.

Invariants: ``in_flight`` goes up in ``begin()`` and down in ``end()`` exactly once per attempt;
``up`` is False from an ejection until a health check (and, after a watchdog ejection, a canary)
passes once ``readmit_at`` has come; counters only grow.

Routing (``choose``): among eligible members that are up and below their limit, least outstanding
requests, normalised by weight, ties broken by weight then round-robin. Session and prefix affinity
map a key onto the same members by weighted rendezvous hashing (consistent: when a member leaves,
only its keys move) and yield to least-outstanding when the chosen member is a hot spot. Round
robin and cache-aware routing are the pool's (``backend.py``, ``cache_aware.py``).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vllm_gateway.backends.base import Backend, BackendStats
from vllm_gateway.backends.pool.config import BackendSpec, PoolConfig
from vllm_gateway.backends.pool.engine_metrics import EngineGauges

if TYPE_CHECKING:
    from vllm_gateway.backends.pool.cache_index import MemberCache

__all__ = ["Member", "RetryBudget", "affinity_key", "choose"]


class Member:
    __slots__ = (
        "backend",
        "cache",
        "consecutive_failures",
        "declared_models",
        "down_reason",
        "ejection_streak",
        "ejections",
        "engine",
        "errors",
        "health_failures",
        "in_flight",
        "kv_events",
        "last_progress",
        "limit",
        "models",
        "name",
        "pending",
        "readmit_at",
        "requests",
        "retries",
        "streams",
        "up",
        "url",
        "weight",
    )

    def __init__(
        self,
        spec: BackendSpec,
        config: PoolConfig,
        backend: Backend,
    ) -> None:
        self.url = spec.url
        self.name = spec.name or spec.url
        self.weight = spec.weight
        self.limit = (
            spec.max_outstanding if spec.max_outstanding is not None else config.max_outstanding
        )
        self.declared_models = spec.models
        self.models: frozenset[str] | None = frozenset(spec.models) if spec.models else None
        self.backend = backend
        self.in_flight = 0
        self.last_progress = time.monotonic()
        self.up = True
        self.down_reason: str | None = None
        self.readmit_at = 0.0
        self.ejection_streak = 0  # ejections since the member last completed a request
        self.consecutive_failures = 0
        self.health_failures = 0
        self.errors: Counter[str] = Counter()
        self.ejections = 0
        self.requests = 0
        self.retries = 0
        # Attempts still waiting for their first byte; an ejection cancels them so they can retry.
        self.pending: set[Any] = set()
        # Responses streaming from it now: an ejection drops them (they may go on elsewhere).
        self.streams: set[Any] = set()
        # cache_aware routing: what it holds (cache_index.py) and what its engine says.
        self.cache: MemberCache | None = None
        self.engine = EngineGauges()
        self.kv_events = spec.kv_events

    # --- accounting ------------------------------------------------------------------------

    def begin(self) -> None:
        if self.in_flight == 0:
            self.last_progress = time.monotonic()  # the stall clock starts with the first request
        self.in_flight += 1
        self.requests += 1

    def end(self) -> None:
        self.in_flight -= 1

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def success(self) -> None:
        self.consecutive_failures = 0
        self.ejection_streak = 0

    def failure(self, kind: str, threshold: int) -> bool:
        """Count a failure; True when it makes ``threshold`` in a row (the caller ejects)."""
        self.errors[kind] += 1
        self.consecutive_failures += 1
        return self.up and self.consecutive_failures >= threshold

    def eject(self, reason: str, config: PoolConfig) -> None:
        if not self.up:
            return
        self.up = False
        self.down_reason = reason
        self.ejections += 1
        self.ejection_streak += 1
        backoff = config.readmit_backoff * (2 ** (self.ejection_streak - 1))
        self.readmit_at = time.monotonic() + min(backoff, config.readmit_backoff_max)
        for task in list(self.pending):
            task.cancel()  # pre-first-byte attempts on this member move elsewhere

    def readmit(self) -> None:
        self.up = True
        self.down_reason = None
        self.consecutive_failures = 0
        self.health_failures = 0
        self.last_progress = time.monotonic()

    # --- routing inputs --------------------------------------------------------------------

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models

    def has_room(self) -> bool:
        return self.limit is None or self.in_flight < self.limit

    def load(self) -> float:
        return self.in_flight / self.weight

    def stats(self) -> BackendStats:
        return {
            "name": self.name,
            "url": self.url,
            "weight": self.weight,
            "in_flight": self.in_flight,
            "max_outstanding": self.limit,
            "healthy": self.up,
            "down_reason": self.down_reason,
            "errors": dict(self.errors),
            "ejections": self.ejections,
            "requests": self.requests,
            "retries": self.retries,
            "models": sorted(self.models) if self.models is not None else None,
        }


class RetryBudget:
    """Retries allowed: at most ``ratio`` of the requests of the last ``window`` seconds (or ``min``).

    A budget keeps retries from multiplying load when every member is failing at once.
    """

    def __init__(self, ratio: float, minimum: int, window: float) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.window = window
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.exhausted = 0

    def _trim(self, now: float) -> None:
        edge = now - self.window
        for q in (self._requests, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def request(self) -> None:
        self._requests.append(time.monotonic())

    def try_retry(self) -> bool:
        now = time.monotonic()
        self._trim(now)
        allowed = max(self.minimum, math.floor(self.ratio * len(self._requests)))
        if len(self._retries) >= allowed:
            self.exhausted += 1
            return False
        self._retries.append(now)
        return True


_rr = 0


def choose(
    candidates: Sequence[Member], key: str | None, config: PoolConfig
) -> tuple[Member, bool]:
    """Pick a member among ``candidates`` (up, eligible, with room). Returns (member, yielded)."""
    global _rr
    if key is not None and len(candidates) > 1:
        target = max(candidates, key=lambda m: _score(key, m))
        floor = min(m.in_flight for m in candidates)
        if target.in_flight <= config.affinity_yield_factor * (floor + 1):
            return target, False
        yielded = True
    else:
        yielded = False
    best = min(m.load() for m in candidates)
    tied = [m for m in candidates if m.load() <= best]
    if len(tied) > 1:
        heaviest = max(m.weight for m in tied)
        tied = [m for m in tied if m.weight >= heaviest]
    _rr += 1
    return tied[_rr % len(tied)], yielded


def _score(key: str, member: Member) -> float:
    """Weighted rendezvous hashing: -w / ln(u), u uniform in (0, 1) from hash(key, member)."""
    digest = hashlib.blake2b(f"{key}\x00{member.name}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
    return -member.weight / math.log(u)


def affinity_key(
    routing: str, headers: Mapping[str, str], body: Mapping[str, Any] | None, prefix_chars: int
) -> str | None:
    """The key affinity routing hashes, or None (no affinity for this request)."""
    if routing == "session":
        for name, value in headers.items():
            if name.lower() == "x-session-id" and value:
                return "s:" + value
        user = body.get("user") if body else None
        return "u:" + user if isinstance(user, str) and user else None
    if routing == "prefix" and body:
        text = _prompt_text(body, prefix_chars)
        return "p:" + text if text else None
    return None


def _prompt_text(body: Mapping[str, Any], limit: int) -> str:
    parts: list[str] = []
    size = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, Mapping):
                continue
            content = msg.get("content")
            if isinstance(content, list):  # content parts: only the text ones count
                content = "".join(
                    p.get("text", "")
                    for p in content
                    if isinstance(p, Mapping) and p.get("type") == "text"
                )
            piece = f"{msg.get('role', '')}:{content if isinstance(content, str) else ''}\n"
            parts.append(piece)
            size += len(piece)
            if size >= limit:
                break
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else None
            if isinstance(prompt, list):  # token ids
                prompt = ",".join(str(t) for t in prompt[: limit // 4])
        if isinstance(prompt, str):
            parts.append(prompt)
    return "".join(parts)[:limit]
