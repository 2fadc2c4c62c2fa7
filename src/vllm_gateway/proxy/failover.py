"""Mid-stream failover: when the member serving a stream dies, stalls or errs after the first byte,
the same generation goes on on another member, and the client sees one unbroken stream.

How it continues, exactly: the gateway asks the backend for token ids (``return_token_ids``; the
ids are taken out of what the client sees unless it asked for them itself, so its bytes are what
they would have been), keeps the prompt's ids and the ids generated so far, and on a failure sends
``/v1/completions`` with ``prompt`` = the prompt's ids + the ids generated up to the last chunk
that carried text, ``max_tokens`` reduced by as many, and the request's sampling and stop
parameters. With greedy decoding that continues token for token (measured on vLLM's CPU build: 100%
of cut points, on another replica too); text-based continuation (``continue_final_message``) does
not (it re-tokenizes the text, and diverged at about 8% of cut points). Ids after the last chunk
with text are left out: they are a character still being assembled, which the continuation writes
again (and a prompt ending inside a UTF-8 character makes vLLM echo the prompt).

The continuation's chunks are rewritten into the original stream: its ``id``, ``created`` and
``model`` on every chunk, chat deltas for a chat request (no second role delta), one
``finish_reason``, one ``[DONE]``, and ``usage`` (when asked) that adds the parts up: the original
prompt's tokens, and every generated token of every part.

What is not continued, and why (each a reason counted in the metrics; the stream ends with its
error event as before):
- ``protocol``: the Responses and Messages APIs (vLLM takes no token ids there);
- ``n``: several choices; ``tools``: tool calls (a half-streamed call cannot be resumed by the
  completions route); ``structured``: structured output (its grammar state is lost);
  ``logprobs``: the continuation cannot reproduce the chat logprobs format; ``usage_stats``:
  continuous usage in every chunk; ``echo``/``suffix``/``best_of`` on completions;
- ``no_token_ids``: the backend did not return ids (not a vLLM, or an old one);
- ``reasoning``, ``tool_call``: such a delta appeared in the stream;
- ``limit``: the request's failovers are spent; ``no_member``: no other healthy member serves the model; ``deadline``: the request's time is up.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

__all__ = ["Resumable", "not_continuable"]

# Request fields the continuation keeps (the rest are chat-only, or routing).
_CARRIED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "length_penalty",
    "logit_bias",
    "bad_words",
    "allowed_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "priority",
)
_STRUCTURED = tuple(
    (field, "structured")
    for field in (
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    )
)
_CHAT_BLOCKERS = (
    ("tools", "tools"),
    ("functions", "tools"),
    *_STRUCTURED,
    ("logprobs", "logprobs"),
    ("top_logprobs", "logprobs"),
)
_COMPLETION_BLOCKERS = (
    ("echo", "echo"),
    ("suffix", "suffix"),
    ("best_of", "best_of"),
    ("logprobs", "logprobs"),
    *_STRUCTURED,
)
# vLLM renders these as null unless asked for: what the client sees when it did not ask.
_IDS = re.compile(rb'"(prompt_token_ids|token_ids)":\[[0-9,\s]*\]')


def not_continuable(body: dict[str, Any], chat: bool) -> str | None:
    """Why a request cannot be continued on another member, or None when it can."""
    n = body.get("n")
    if n not in (None, 1):
        return "n"
    for field, reason in _CHAT_BLOCKERS if chat else _COMPLETION_BLOCKERS:
        value = body.get(field)
        if value not in (None, False, [], {}) and not (field == "logprobs" and value == 0):
            return reason
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("continuous_usage_stats"):
        return "usage_stats"
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            return "n"  # several prompts: several choices
    return None


class Resumable:
    """What one streamed chat or completions request has produced so far, and how to go on."""

    __slots__ = (
        "_cut_ids",
        "_fingerprint",
        "blocked",
        "body",
        "chat",
        "client_ids",
        "created",
        "finish_reason",
        "generated",
        "ident",
        "include_usage",
        "model",
        "parts",
        "prompt_ids",
        "stop_reason",
    )

    def __init__(self, body: dict[str, Any], chat: bool) -> None:
        self.body = body
        self.chat = chat
        self.client_ids = body.get("return_token_ids") is True  # the client wants them itself
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.ident: str | None = None
        self.created: int | None = None
        self.model: str | None = None
        self.prompt_ids: list[int] | None = None
        self.generated: list[int] = []
        self._cut_ids = 0  # ids up to the end of the last chunk that carried text
        self.finish_reason: str | None = None
        self.stop_reason: Any = None
        self.blocked: str | None = None  # a reason that appeared in the stream
        self._fingerprint: str | None = None
        self.parts = 1

    # --- the request the first member gets --------------------------------------------------

    def upstream_body(self, raw: bytes) -> bytes:
        """The client's body with ``return_token_ids`` asked for (it is forwarded byte for byte
        otherwise; the field goes first, so a client's own value, later, wins)."""
        if "return_token_ids" in self.body:
            return raw
        start = raw.index(b"{") + 1
        rest = raw[start:].lstrip()
        sep = b"" if rest.startswith(b"}") else b","
        return raw[:start] + b'"return_token_ids":true' + sep + raw[start:]

    # --- what the stream shows ----------------------------------------------------------------

    def observe(self, event: bytes) -> bytes:
        """Note one content event of the stream being relayed; the event as the client sees it."""
        payload = event[5:].strip() if event.startswith(b"data:") else b""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        if self.ident is None:
            self.ident = obj.get("id")
            self.created = obj.get("created")
            self.model = obj.get("model")
        if "usage" in obj and obj.get("system_fingerprint"):
            self._fingerprint = obj["system_fingerprint"]
        top_prompt = obj.get("prompt_token_ids")
        if isinstance(top_prompt, list) and self.prompt_ids is None:
            self.prompt_ids = top_prompt
        for choice in obj.get("choices") or ():
            self._note(choice)
        if self.client_ids:
            return event
        return _IDS.sub(rb'"\1":null', event)

    def _note(self, choice: dict[str, Any]) -> None:
        ids = choice.get("token_ids")
        prompt = choice.get("prompt_token_ids")
        if isinstance(prompt, list) and self.prompt_ids is None:
            self.prompt_ids = prompt
        if self.chat:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if delta.get("tool_calls"):
                self.blocked = "tool_call"
            if delta.get("reasoning") or delta.get("reasoning_content"):
                self.blocked = "reasoning"
        else:
            text = choice.get("text")
        if isinstance(ids, list):
            self.generated.extend(ids)
            if text:
                self._cut_ids = len(self.generated)
        elif text:
            self.blocked = self.blocked or "no_token_ids"
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
            self.stop_reason = choice.get("stop_reason")

    # --- going on elsewhere -------------------------------------------------------------------

    def why_not(self) -> str | None:
        """Why this stream cannot be continued now, or None."""
        if self.blocked is not None:
            return self.blocked
        if self.prompt_ids is None or self.ident is None:
            return "no_token_ids"
        return None

    def continuation(self) -> tuple[bytes, dict[str, Any]]:
        """The ``/v1/completions`` body that goes on from the last chunk with text."""
        assert self.prompt_ids is not None
        kept = self.generated[: self._cut_ids]
        # What was generated after the cut is written again by the continuation.
        del self.generated[self._cut_ids :]
        body: dict[str, Any] = {
            "model": self.body.get("model") or self.model,
            "prompt": [*self.prompt_ids, *kept],
            "stream": True,
            "return_token_ids": True,
        }
        for field in _CARRIED:
            if field in self.body:
                body[field] = self.body[field]
        budget = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        if isinstance(budget, int):
            body["max_tokens"] = max(1, budget - len(kept))
        min_tokens = self.body.get("min_tokens")
        if isinstance(min_tokens, int):
            body["min_tokens"] = max(0, min_tokens - len(kept))
        self.parts += 1
        return orjson.dumps(body), body

    def rewrite(self, event: bytes) -> bytes | None:
        """A continuation's event as the original stream's (None: nothing to send for it)."""
        payload = event[5:].strip() if event.startswith(b"data:") else b""
        if payload == b"[DONE]":
            return None  # the relay's own end of stream follows
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        choices = obj.get("choices") or []
        if not choices:
            return None  # a usage chunk of the part: the relay writes the whole usage
        choice = choices[0]
        text = choice.get("text") or ""
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.generated.extend(ids)
            if text:
                self._cut_ids = len(self.generated)
        finish = choice.get("finish_reason")
        if finish is not None:
            self.finish_reason = finish
            self.stop_reason = choice.get("stop_reason")
        if not text and finish is None:
            return None
        shown_ids = ids if self.client_ids else None
        if self.chat:
            out_choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            if finish is not None:
                out_choice["stop_reason"] = choice.get("stop_reason")
            out_choice["token_ids"] = shown_ids
            obj_name = "chat.completion.chunk"
        else:
            out_choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": choice.get("stop_reason"),
                "prompt_token_ids": None,
                "token_ids": shown_ids,
            }
            obj_name = "text_completion"
        out = {
            "id": self.ident,
            "object": obj_name,
            "created": self.created,
            "model": self.model,
            "choices": [out_choice],
        }
        return b"data: " + orjson.dumps(out) + b"\n\n"

    def counts(self) -> tuple[int, int]:
        """(prompt, completion) tokens, as the stream's usage reports them: the original prompt's,
        and every token generated so far in every part (what the token limit charges too)."""
        return len(self.prompt_ids or ()), len(self.generated)

    def closing(self) -> bytes:
        """The end of the stream after a continuation: the usage chunk when asked, ``[DONE]``."""
        out = b""
        if self.include_usage:
            prompt, completion = self.counts()
            usage: dict[str, Any] = {
                "id": self.ident,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt,
                    "total_tokens": prompt + completion,
                    "completion_tokens": completion,
                },
            }
            if self._fingerprint:
                usage["system_fingerprint"] = self._fingerprint
            out += b"data: " + orjson.dumps(usage) + b"\n\n"
        return out + b"data: [DONE]\n\n"
