"""Mid-stream failover for the Anthropic Messages API, text output: what a Messages stream has
produced, the ``/v1/completions`` continuation, and its chunks framed back into Messages events.

vLLM runs a Messages request as a chat completion of its conversation and takes no token ids
there, so the ids come from vLLM itself when a stream must go on (``continuation.py`` asks a
member that is up): the prompt's from ``/tokenize`` with ``messages`` (the conversation as chat
messages, the system prompt first: vLLM renders them with the model's chat template, as its
Messages route does), the answer's so far from ``/tokenize`` of its text without special tokens.
The continuation is then the chat one's: the prompt's ids and the answer's, ``max_tokens``
reduced by as many, the request's sampling and stop parameters (``stop_sequences`` as ``stop``).

Unlike chat's ids, the answer's ids are its text tokenized again: where a tokenizer reads its own
output back differently (a ``"\\n","\\n"`` pair as one ``"\\n\\n"`` token), the continuation is a
valid one but not the token-for-token one. The text the client already has is never changed.

Each continuation chunk with text becomes a ``content_block_delta``; its end the stream's own:
``content_block_stop`` (unless sent), ``message_delta`` with vLLM's stop reason mapping and the
usage of the whole answer (the original input tokens, every output token of every part), and
``message_stop``.

Not continued (counted like chat's reasons): ``tools`` (tool definitions, tool_use or
tool_result blocks), ``reasoning`` (``thinking``), ``structured`` (``output_config.format``),
``content`` (a block other than text in the conversation, an inline system message, which vLLM
merges into the first or not as the chat template requires, a second content block in the answer),
``tool_call``/``reasoning`` (such a block in the stream).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["MessagesResumable", "messages_not_continuable", "parse_typed"]

_CARRIED = ("temperature", "top_p", "top_k")


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


class MessagesResumable:
    """What one streamed Messages request has produced so far, and how to go on."""

    __slots__ = (
        "_block_closed",
        "_block_opened",
        "_budget",
        "_finish",
        "_input_tokens",
        "_stop_reason",
        "_text",
        "blocked",
        "body",
        "generated",
        "ident",
        "model",
        "parts",
        "prompt_ids",
        "stopped",
    )

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        budget = body.get("max_tokens")
        self._budget = budget if isinstance(budget, int) else None
        self.ident: str | None = None
        self.model: str | None = None
        self._input_tokens = 0
        self._text: list[str] = []  # the answer's text, as relayed
        self._block_opened = False  # content_block_start relayed
        self._block_closed = False
        self._finish: str | None = None
        self._stop_reason: Any = None
        self.stopped = False  # message_delta relayed: the generation is over
        self.blocked: str | None = None
        # Filled from /tokenize when the stream must go on (None before).
        self.prompt_ids: list[int] | None = None
        self.generated: list[int] = []
        self.parts = 1

    # --- what the stream shows ----------------------------------------------------------------

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
            self._block_closed = True
        elif kind == "message_delta":
            self.stopped = True
        return event

    # --- going on elsewhere -------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """The generation is over: its stop was relayed; or, its ids known, its text block was
        closed (vLLM closes it when the generation's last chunk came) or its budget is spent."""
        return self.stopped or (self.prompt_ids is not None and self._finish is not None)

    def why_not(self) -> str | None:
        if self.blocked is not None:
            return self.blocked
        if self.ident is None:
            return "no_token_ids"
        return None

    def tokenize_requests(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The ``/tokenize`` bodies for the prompt's ids and the answer's (None: no answer yet)."""
        # As vLLM's Messages route converts the conversation (its _convert_system_message and
        # _convert_messages): the system text joined, without billing headers; one text block
        # as a string, several as text parts.
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
        model = self.body.get("model") or self.model
        prompt = {"model": model, "messages": messages, "add_generation_prompt": True}
        text = "".join(self._text)
        answer = {"model": model, "prompt": text, "add_special_tokens": False} if text else None
        return prompt, answer

    def take_ids(self, prompt_ids: list[int], answer_ids: list[int]) -> None:
        self.prompt_ids = prompt_ids
        self.generated = list(answer_ids)
        if self._budget is not None and len(answer_ids) >= self._budget:
            self._finish = "length"
        elif self._block_closed:
            self._finish = "stop"  # a stop string's text is lost with the stream: end_turn

    def continuation(self) -> tuple[bytes, dict[str, Any]]:
        """The ``/v1/completions`` body that goes on from the text relayed so far."""
        assert self.prompt_ids is not None
        body: dict[str, Any] = {
            "model": self.body.get("model") or self.model,
            "prompt": [*self.prompt_ids, *self.generated],
            "stream": True,
            "return_token_ids": True,
        }
        for field in _CARRIED:
            if field in self.body:
                body[field] = self.body[field]
        if self.body.get("stop_sequences"):
            body["stop"] = self.body["stop_sequences"]
        if self._budget is not None:
            body["max_tokens"] = max(1, self._budget - len(self.generated))
        self.parts += 1
        return orjson.dumps(body), body

    def rewrite(self, event: bytes) -> bytes | None:
        """A continuation's event as a Messages event (None: nothing to send for it)."""
        payload = event[5:].strip() if event.startswith(b"data:") else b""
        if payload == b"[DONE]":
            return None
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        choices = obj.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.generated.extend(ids)
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]
            self._stop_reason = choice.get("stop_reason")
        text = choice.get("text") or ""
        if not text:
            return None
        self._text.append(text)
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
        """The end of the stream after a continuation (or a member that died before it)."""
        out = b""
        if not self._block_closed:
            self._block_closed = True
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


def parse_typed(event: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(event name, JSON object) of one typed SSE event; None where absent or not an object."""
    kind = None
    data = None
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            kind = line[6:].strip().decode("latin-1")
        elif line.startswith(b"data:"):
            data = line[5:].strip()
    if data is None:
        return kind, None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return kind, None
    return kind, obj if isinstance(obj, dict) else None
