"""Which member gets a request, among those that may take it: the pure routing choices.

``choose`` picks among members that are up, serve the model and have room: least outstanding
requests per unit of weight, ties to the heavier member, then round-robin. With an
``affinity_key`` (``session``, ``prefix``) it maps the key onto the same member by weighted
rendezvous hashing (consistent: when a member leaves, only its keys move) and yields to
least-outstanding when that member is a hot spot. Round robin and cache-aware routing are the
pool's (``backend.py``, ``cache_aware.py``).

Invariants: ``choose`` returns a member of its candidates and changes no member.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.member import Member

__all__ = ["affinity_key", "choose"]


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
