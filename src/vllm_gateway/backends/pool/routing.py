"""Which member gets a request, among those that may take it: the ``pool_routing`` policy.

``Router`` binds the policy once, at construction, so a request does not test the policy's name:

- ``key(request)`` is what the policy routes on (an affinity key, a prompt chain, or None), taken
  once per request before any wait for a slot; opaque to the caller;
- ``pick(room, key, request_id)`` picks one of ``room`` (members up, serving the model, not yet
  tried and below their limit; never empty).

The policies: ``least_outstanding`` (``choose`` without a key: fewest requests in flight per unit
of weight, ties to the heavier member, then round-robin); ``session`` and ``prefix`` (``choose`` with
an ``affinity_key``: weighted rendezvous hashing, so when a member leaves only its keys move, and a
yield to least-outstanding when the chosen member is a hot spot); ``round_robin`` (the pool's order,
whatever the load); ``cache_aware`` (``cache_aware.py``).

Invariants: ``pick`` returns a member of ``room`` and takes no slot (``acquire.py`` does; cache-aware
routing notes what it sent the member); it is synchronous, so the choice and the slot taken after it
see the same state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vllm_gateway.backends.base import UpstreamRequest
from vllm_gateway.backends.pool.cache_aware import CacheAware
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.member import Member

__all__ = ["Router", "affinity_key", "choose"]


class Router:
    def __init__(self, fleet: Fleet, config: PoolConfig, cache_aware: CacheAware | None) -> None:
        self.fleet = fleet
        self.config = config
        self.affinity_yields = 0  # affinity choices that went to the least loaded member instead
        self._next = 0  # round_robin's next member
        self.key: Callable[[UpstreamRequest], Any]
        self.pick: Callable[[list[Member], Any, str], Member]
        if cache_aware is not None:
            self.key, self.pick = cache_aware.chain, cache_aware.choose
        elif config.routing == "round_robin":
            self.key, self.pick = _no_key, self._round_robin
        elif config.routing in ("session", "prefix"):
            self.key, self.pick = self._affinity_key, self._choose
        else:
            self.key, self.pick = _no_key, self._choose

    def _affinity_key(self, request: UpstreamRequest) -> str | None:
        cfg = self.config
        return affinity_key(cfg.routing, request.headers, request.json, cfg.affinity_prefix_chars)

    def _choose(self, room: list[Member], key: str | None, request_id: str) -> Member:
        member, yielded = choose(room, key, self.config)
        self.affinity_yields += yielded
        return member

    def _round_robin(self, room: list[Member], key: None, request_id: str) -> Member:
        """The next member in the pool's order that has room."""
        members = self.fleet.members
        count = len(members)
        for step in range(count):
            member = members[(self._next + step) % count]
            if member in room:
                self._next = (self._next + step + 1) % count
                return member
        return room[0]


def _no_key(request: UpstreamRequest) -> None:
    return None


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
