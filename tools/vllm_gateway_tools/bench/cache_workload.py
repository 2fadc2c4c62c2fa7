"""The ``cache`` scenario's workload: multi-turn conversations over shared system prompts.

``groups`` system prompts of ``system_tokens`` tokens each; ``conversations`` conversations, each
using one group's system prompt (seeded), each ``turns`` turns long. Turn ``t`` sends the system
prompt, every earlier user message and answer, and a new user message of ``user_tokens`` tokens,
so each turn's prompt starts with the previous turn's prompt: a server that saw the previous turn
(or another conversation of the same group) can serve that prefix from its cache.

Everything is a function of the seed, so every policy and every round sends the same text (the
answers too, as long as the server's answers repeat: the simulator's do). Sizes are in tokens of
the simulator's toy tokenizer (four characters each), close to a real tokenizer's on English text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import orjson

from vllm_gateway.proxy.sse import EventScanner, split_events

__all__ = ["Workload", "answer_text"]

_WORDS = [
    "cache",
    "block",
    "prefix",
    "route",
    "member",
    "token",
    "stream",
    "engine",
    "batch",
    "queue",
    "model",
    "prompt",
    "answer",
    "reply",
    "turn",
    "group",
    "system",
    "user",
    "shared",
    "warm",
    "cold",
    "hit",
    "miss",
    "evict",
    "store",
    "chain",
    "hash",
    "page",
]


def _text(rng: random.Random, tokens: int, head: str = "") -> str:
    """Words up to exactly ``4 * tokens`` characters (the toy tokenizer's ``tokens`` tokens)."""
    size = 4 * max(tokens, 1)
    parts = [head] if head else []
    length = len(head)
    while length < size:
        word = rng.choice(_WORDS)
        parts.append(word)
        length += len(word) + (1 if len(parts) > 1 else 0)
    return " ".join(parts)[:size]


@dataclass(frozen=True, slots=True)
class Workload:
    """The seeded conversations; ``concurrency`` of them run at a time (closed loop)."""

    model: str = "default"
    groups: int = 4
    conversations: int = 48
    turns: int = 8
    concurrency: int = 8
    system_tokens: int = 256
    user_tokens: int = 64
    max_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("groups", "conversations", "turns", "concurrency", "system_tokens",
                     "user_tokens", "max_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"cache workload: {name} must be at least 1")

    @property
    def requests(self) -> int:
        return self.conversations * self.turns

    def system_prompt(self, group: int) -> str:
        # The group number leads, so that any prefix of the prompt tells groups apart.
        rng = random.Random(f"{self.seed}:system:{group}")
        return _text(rng, self.system_tokens, head=f"[group {group}] You are assistant {group}.")

    def group_of(self, conversation: int) -> int:
        return random.Random(f"{self.seed}:group:{conversation}").randrange(self.groups)

    def user_message(self, conversation: int, turn: int) -> str:
        rng = random.Random(f"{self.seed}:user:{conversation}:{turn}")
        return _text(rng, self.user_tokens, head=f"({conversation}.{turn})")

    def opening(self, conversation: int) -> list[dict[str, str]]:
        """The messages of turn 0."""
        return [
            {"role": "system", "content": self.system_prompt(self.group_of(conversation))},
            {"role": "user", "content": self.user_message(conversation, 0)},
        ]

    def body(self, messages: list[dict[str, str]], conversation: int, turn: int) -> bytes:
        """A streamed chat request for ``messages``."""
        doc: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "seed": self.seed * 1_000_003 + conversation * 1000 + turn,
        }
        return orjson.dumps(doc)

    def as_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "conversations": self.conversations,
            "turns": self.turns,
            "concurrency": self.concurrency,
            "system_tokens": self.system_tokens,
            "user_tokens": self.user_tokens,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "model": self.model,
        }


def answer_text(body: bytes) -> str:
    """The assistant's text in a streamed chat body: every ``delta.content``, in order."""
    parts: list[str] = []
    scanner = EventScanner(max_event_bytes=len(body) + 1)
    events = split_events(scanner.feed(body))
    for event in [*events, scanner.pending]:  # a cut stream's last event counts too
        block = event.strip()
        if not block.startswith(b"data:") or block.endswith(b"[DONE]"):
            continue
        try:
            doc = orjson.loads(block[5:])
            content = doc["choices"][0]["delta"].get("content")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            continue
        if isinstance(content, str):
            parts.append(content)
    return "".join(parts)
