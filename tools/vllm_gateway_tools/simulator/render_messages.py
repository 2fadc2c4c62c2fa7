"""The bytes of vLLM 0.32's Anthropic Messages API (``/v1/messages``). No I/O.

Shapes copied from captures of a real vLLM (/work/notes/samples/messages_*.txt). A stream is
``event: <type>\\ndata: <json>\\n\\n``: message_start, content_block_start, one content_block_delta
per token, content_block_stop, message_delta (``stop_reason``, ``usage``), message_stop; vLLM sends
nothing before the first token and never a ``ping``. The message ``id`` is ``chatcmpl-...`` (vLLM
runs the request as a chat completion), ``stop_sequence`` is left out of a whole message when null.
Handler errors use Anthropic's envelope with vLLM's type names (``NotFoundError``, ...).
"""

from __future__ import annotations

from typing import Any

import orjson

from vllm_gateway_tools.simulator.render import (
    Script,
    anthropic_error_body,
    error_type,
    output_text,
    token_text,
)

__all__ = ["MessagesScript", "count_tokens_body", "stop_reason"]

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def stop_reason(finish: str) -> str | None:
    """vLLM's mapping of a finish reason; an abort has none."""
    return _STOP_REASONS.get(finish)


def count_tokens_body(input_tokens: int) -> bytes:
    """``/v1/messages/count_tokens``."""
    return orjson.dumps(
        {
            "input_tokens": input_tokens,
            "context_management": {"original_input_tokens": input_tokens},
        }
    )


class MessagesScript(Script):
    """One ``/v1/messages`` request."""

    _DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":'
    _DELTA_TAIL = b'},"index":0}\n\n'

    def __init__(self, *, stream: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.stream = stream

    def _usage(self, output_tokens: int) -> dict[str, int]:
        return {"input_tokens": self.prompt_tokens, "output_tokens": output_tokens}

    @staticmethod
    def _event(kind: str, fields: dict[str, Any]) -> bytes:
        return b"event: %b\ndata: %b\n\n" % (kind.encode(), orjson.dumps({"type": kind, **fields}))

    def first(self) -> list[bytes]:
        message: dict[str, Any] = {"id": self.request_id, "type": "message", "role": "assistant", "content": [],
                   "model": self.model, "stop_reason": None, "stop_sequence": None,
                   "usage": self._usage(0)}  # fmt: skip
        return [
            self._event("message_start", {"message": message}),
            self._event("content_block_start",
                        {"content_block": {"type": "text", "text": ""}, "index": 0}),
        ]  # fmt: skip

    def token(self, i: int, last: bool) -> bytes:
        return self._DELTA_HEAD + orjson.dumps(token_text(i)) + self._DELTA_TAIL

    def closing(self) -> list[bytes]:
        return [
            self._event("content_block_stop", {"index": 0}),
            self._event("message_delta",
                        {"delta": {"stop_reason": stop_reason(self.finish), "stop_sequence": None},
                         "usage": self._usage(self.n)}),
            self._event("message_stop", {}),
        ]  # fmt: skip

    def whole(self) -> bytes:
        body: dict[str, Any] = {
            "id": self.request_id,
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": output_text(self.n)}],
            "model": self.model,
        }
        reason = stop_reason(self.finish)
        if reason is not None:
            body["stop_reason"] = reason
        body["usage"] = self._usage(self.n)
        return orjson.dumps(body)

    def error(self, status: int, message: str, err_type: str | None = None) -> bytes:
        return anthropic_error_body(message, err_type or error_type(status))
