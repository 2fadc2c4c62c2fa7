"""Mid-stream failover for the Anthropic Messages API, text output: what a Messages stream has
produced and the continuation's text framed back into Messages events (how the ids are had and the
continuation made: ``failover_text``).

The conversation goes to ``/tokenize`` as vLLM's Messages route converts it (its
``_convert_system_message`` and ``_convert_messages``): the system text joined, without billing
headers, first; one text block as a string, several as text parts. ``stop_sequences`` go on as
``stop``.

Each continuation chunk with text becomes a ``content_block_delta`` (a ``content_block_start``
first if the member died before it); its end is the stream's own: ``content_block_stop`` (unless
sent), ``message_delta`` with vLLM's stop reason mapping and the usage of the whole answer (the
original input tokens, every output token of every part), and ``message_stop``.

Not continued (counted like chat's reasons): ``tools`` (tool definitions, tool_use or
tool_result blocks), ``reasoning`` (``thinking``), ``structured`` (``output_config.format``),
``content`` (a block other than text in the conversation, an inline system message, which vLLM
merges into the first or not as the chat template requires, a second content block in the answer),
``tool_call``/``reasoning`` (such a block in the stream).
"""

from __future__ import annotations

from typing import Any

import orjson

from vllm_gateway.proxy.failover_text import TextResumable, parse_typed

__all__ = ["MessagesResumable", "messages_not_continuable"]


def _text_blocks(content: Any) -> bool:
    """Whether a message's content is text only (a string, or text blocks)."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(b, dict) and b.get("type") == "text" for b in content
    )


def messages_not_continuable(body: dict[str, Any]) -> str | None:
    """Why a Messages request cannot be continued on another member, or None when it can."""
    if body.get("tools"):
        return "tools"
    if body.get("thinking"):
        return "reasoning"
    config = body.get("output_config")
    if isinstance(config, dict) and config.get("format"):
        return "structured"
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") != "system" and _text_blocks(m.get("content"))
        for m in messages
    ):
        # Inline system messages are merged or not as the model's chat template requires.
        return "content"
    system = body.get("system")
    if system is not None and not _text_blocks(system):
        return "content"
    return None


def _anthropic_stop(finish: str | None, stop_reason: Any) -> tuple[str | None, str | None]:
    """vLLM's mapping of a finish reason to Anthropic's (stop_reason, stop_sequence)."""
    if finish == "length":
        return "max_tokens", None
    if finish not in ("stop", "tool_calls"):
        return None, None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _event(kind: str, fields: dict[str, Any]) -> bytes:
    return b"event: %b\ndata: %b\n\n" % (kind.encode(), orjson.dumps({"type": kind, **fields}))


class MessagesResumable(TextResumable):
    """What one streamed Messages request has produced so far, and how to go on."""

    __slots__ = ("_block_opened", "_input_tokens")

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self._input_tokens = 0
        self._block_opened = False  # content_block_start relayed

    def observe(self, event: bytes) -> bytes:
        """Note one event of the stream being relayed; the event as the client sees it (as is)."""
        kind, obj = parse_typed(event)
        if obj is None:
            return event
        if kind == "message_start":
            message = obj.get("message") or {}
            self.ident = message.get("id")
            self.model = message.get("model")
            usage = message.get("usage") or {}
            self._input_tokens = int(usage.get("input_tokens") or 0)
        elif kind == "content_block_start":
            self._block_opened = True
            block = obj.get("content_block") or {}
            if block.get("type") == "tool_use":
                self.blocked = "tool_call"
            elif block.get("type") in ("thinking", "redacted_thinking"):
                self.blocked = "reasoning"
            elif obj.get("index", 0) != 0:
                self.blocked = self.blocked or "content"
        elif kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":
                self._text.append(delta.get("text") or "")
            elif delta.get("type") == "input_json_delta":
                self.blocked = "tool_call"
            else:
                self.blocked = self.blocked or "reasoning"
        elif kind == "content_block_stop":
            self._whole = True
        elif kind == "message_delta":
            self.stopped = True
        return event

    def conversation(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        system = self.body.get("system")
        if isinstance(system, list):
            system = "".join(
                b["text"]
                for b in system
                if b.get("text") and not b["text"].startswith("x-anthropic-billing-header")
            )
        if system:
            messages.append({"role": "system", "content": system})
        for m in self.body.get("messages") or ():
            content = m.get("content")
            if isinstance(content, list):
                parts = [{"type": "text", "text": b.get("text")} for b in content]
                content = parts[0]["text"] if len(parts) == 1 else parts
            messages.append({"role": m.get("role"), "content": content})
        return messages

    def carried(self) -> dict[str, Any]:
        stops = self.body.get("stop_sequences")
        return {"stop": stops} if stops else {}

    def frame(self, text: str) -> bytes:
        out = b""
        if not self._block_opened:
            self._block_opened = True  # vLLM opens the text block with its first text
            block = {"content_block": {"type": "text", "text": ""}, "index": 0}
            out = _event("content_block_start", block)
        delta = {"delta": {"type": "text_delta", "text": text}, "index": 0}
        return out + _event("content_block_delta", delta)

    def counts(self) -> tuple[int, int]:
        return self._input_tokens, len(self.generated)

    def closing(self) -> bytes:
        out = b""
        if not self._whole:
            self._whole = True
            out += _event("content_block_stop", {"index": 0})
        if not self.stopped:
            self.stopped = True
            reason, sequence = _anthropic_stop(self._finish or "stop", self._stop_reason)
            out += _event(
                "message_delta",
                {
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": {
                        "input_tokens": self._input_tokens,
                        "output_tokens": len(self.generated),
                    },
                },
            )
        return out + _event("message_stop", {})
