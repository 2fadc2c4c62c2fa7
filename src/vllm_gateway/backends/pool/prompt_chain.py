"""A request's prompt as a chain of prefix keys, without a tokenizer (cache-aware routing).

The prompt's canonical text (the model, the tool definitions, then each message's role and text in
order; or a completion's prompt) is cut into ``CHUNK``-byte pieces; key ``i`` is the hash of key
``i - 1`` and piece ``i``, so two requests whose texts share a prefix share the keys of its whole
pieces, and a key stands for the whole text before it (a radix tree at piece granularity). A
partial last piece has no key, as vLLM never caches a partial block.

Keys are Python's own hash: they live in this process's memory only. At most ``MAX_TEXT`` bytes
of a prompt are keyed (a prompt longer than that routes on its first ``MAX_TEXT`` bytes), so the
cost per request is bounded: about 0.3 µs per piece.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["CHUNK", "MAX_TEXT", "PromptChain", "prompt_chain"]

CHUNK = 128
MAX_TEXT = 256 * 1024
_ROOT = 0x5EED


@dataclass(frozen=True, slots=True)
class PromptChain:
    keys: tuple[int, ...]  # one per whole CHUNK-byte piece of the canonical text
    size: int  # the canonical text's length in bytes (all of it, also past MAX_TEXT)


def prompt_chain(body: Mapping[str, Any] | None) -> PromptChain | None:
    """The chain of a chat or completions body, or None when it has no text prompt to key."""
    if not body:
        return None
    text = _canonical(body)
    if text is None:
        return None
    keys: list[int] = []
    key = _ROOT
    end = min(len(text), MAX_TEXT) - CHUNK
    for start in range(0, end + 1, CHUNK):
        key = hash((key, text[start : start + CHUNK]))
        keys.append(key)
    return PromptChain(tuple(keys), len(text))


def _canonical(body: Mapping[str, Any]) -> bytes | None:
    model = body.get("model")
    head = (model if isinstance(model, str) else "").encode() + b"\x00"
    tools = body.get("tools")
    if tools:
        with contextlib.suppress(TypeError):
            head += orjson.dumps(tools) + b"\x00"
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = [head]
        for msg in messages:
            if not isinstance(msg, Mapping):
                continue
            role = msg.get("role")
            parts.append((role if isinstance(role, str) else "").encode() + b"\x01")
            parts.append(_text(msg.get("content")).encode("utf-8", "surrogatepass") + b"\x02")
        return b"".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return head + prompt.encode("utf-8", "surrogatepass")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return head + b"\x03" + orjson.dumps(prompt)  # token ids: keyed as their JSON text
    return None  # several prompts, or none: nothing to route on


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text ones, in order
        return "\x04".join(
            p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
    return ""
