"""Mid-stream failover for the Responses API, text output: what a Responses stream has produced,
the ``/v1/completions`` continuation, and its chunks framed back into Responses events.

As for Messages (``failover_messages``), vLLM takes no token ids on ``/v1/responses``: when a
stream must go on, a member that is up gives them through ``/tokenize``: the prompt's with
``messages`` (the instructions as the system message, then the input, as vLLM's
``construct_input_messages`` builds them), the answer's from its text without special tokens.

Each continuation chunk with text becomes a ``response.output_text.delta`` numbered on from the
stream's last ``sequence_number`` (with ``response.in_progress``, ``response.output_item.added``
and ``response.content_part.added`` first if the member died before them); its end is the stream's
own: ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done`` (the whole text) and ``response.completed``, whose response is the
stream's ``response.created`` one with the output, the status (``incomplete`` at
``max_output_tokens``) and the usage of the whole answer. A stream cut after its text was done is
ended by the gateway. The usage's ``cached_tokens`` is 0: what the members cached is not known
to the gateway.

Not continued (counted): ``tools``, ``reasoning``, ``structured`` (``text.format`` other than
text), ``previous_response`` (the conversation lives on a member), ``background``, ``content``
(input items other than messages with text content).
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from vllm_gateway.proxy.failover_messages import parse_typed

__all__ = ["ResponsesResumable", "responses_not_continuable"]

_CARRIED = ("temperature", "top_p", "top_k")


def _text_message(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("type", "message") == "message"
        and isinstance(item.get("role"), str)
        and isinstance(item.get("content"), str)
    )


def responses_not_continuable(body: dict[str, Any]) -> str | None:
    """Why a Responses request cannot be continued on another member, or None when it can."""
    if body.get("tools"):
        return "tools"
    if body.get("reasoning"):
        return "reasoning"
    text = body.get("text")
    form = text.get("format") if isinstance(text, dict) else None
    if isinstance(form, dict) and form.get("type", "text") != "text":
        return "structured"
    if body.get("previous_response_id"):
        return "previous_response"
    if body.get("background"):
        return "background"
    given = body.get("input")
    if not isinstance(given, str) and not (
        isinstance(given, list) and all(_text_message(i) for i in given)
    ):
        return "content"
    return None


def _event(kind: str, fields: dict[str, Any]) -> bytes:
    return b"event: %b\ndata: %b\n\n" % (kind.encode(), orjson.dumps(fields))


class ResponsesResumable:
    """What one streamed Responses request has produced so far, and how to go on."""

    __slots__ = (
        "_added",
        "_budget",
        "_done",
        "_finish",
        "_in_progress",
        "_item_done",
        "_item_id",
        "_part_added",
        "_part_done",
        "_response",
        "_seq",
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
        budget = body.get("max_output_tokens")
        self._budget = budget if isinstance(budget, int) else None
        self.ident: str | None = None
        self.model: str | None = None
        self._response: dict[str, Any] | None = None  # response.created's response
        self._item_id: str | None = None
        self._in_progress = False  # response.in_progress relayed
        self._added = False  # response.output_item.added relayed
        self._part_added = False  # response.content_part.added relayed
        self._done = False  # response.output_text.done relayed: the text is whole
        self._seq = -1  # the last sequence_number relayed
        self._text: list[str] = []
        self._finish: str | None = None
        self._part_done = False  # response.content_part.done relayed
        self._item_done = False  # response.output_item.done relayed
        self.stopped = False  # response.completed (or another end) relayed
        self.blocked: str | None = None
        self.prompt_ids: list[int] | None = None
        self.generated: list[int] = []
        self.parts = 1

    # --- what the stream shows ----------------------------------------------------------------

    def observe(self, event: bytes) -> bytes:
        kind, obj = parse_typed(event)
        if obj is None:
            return event
        seq = obj.get("sequence_number")
        if isinstance(seq, int):
            self._seq = max(self._seq, seq)
        if kind == "response.created":
            self._response = obj.get("response")
            if isinstance(self._response, dict):
                self.ident = self._response.get("id")
                self.model = self._response.get("model")
        elif kind == "response.in_progress":
            self._in_progress = True
        elif kind == "response.output_item.added":
            item = obj.get("item") or {}
            if item.get("type") != "message" or obj.get("output_index", 0) != 0:
                self.blocked = self.blocked or (
                    "reasoning" if item.get("type") == "reasoning" else "tool_call"
                )
            self._added = True
            self._item_id = item.get("id")
        elif kind == "response.content_part.added":
            self._part_added = True
        elif kind == "response.output_text.delta":
            self._text.append(obj.get("delta") or "")
        elif kind == "response.output_text.done":
            self._done = True
        elif kind == "response.content_part.done":
            self._part_done = True
        elif kind == "response.output_item.done":
            self._item_done = True
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.stopped = True
        elif kind is not None and kind.startswith(("response.reasoning", "response.function")):
            self.blocked = self.blocked or "reasoning"
        return event

    # --- going on elsewhere -------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.stopped or (self.prompt_ids is not None and self._finish is not None)

    def why_not(self) -> str | None:
        if self.blocked is not None:
            return self.blocked
        if self._response is None:
            return "no_token_ids"
        return None

    def tokenize_requests(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        messages: list[dict[str, Any]] = []
        if self.body.get("instructions"):
            messages.append({"role": "system", "content": self.body["instructions"]})
        given = self.body.get("input")
        if isinstance(given, str):
            messages.append({"role": "user", "content": given})
        else:
            messages += [{"role": i["role"], "content": i["content"]} for i in given or ()]
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
        elif self._done:
            self._finish = "stop"

    def continuation(self) -> tuple[bytes, dict[str, Any]]:
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
        if self._budget is not None:
            body["max_tokens"] = max(1, self._budget - len(self.generated))
        self.parts += 1
        return orjson.dumps(body), body

    def _next(self, kind: str, fields: dict[str, Any]) -> bytes:
        self._seq += 1
        return _event(kind, {**fields, "sequence_number": self._seq, "type": kind})

    def _item(self, text: str | None) -> dict[str, Any]:
        content = [self._part(text, None)] if text else []
        return {"id": self._item_id, "content": content, "role": "assistant",
                "status": "in_progress" if text is None else "completed", "type": "message",
                "phase": None}  # fmt: skip

    @staticmethod
    def _part(text: str, logprobs: list[Any] | None) -> dict[str, Any]:
        return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}

    def _open(self) -> bytes:
        """The opening events the first member did not send."""
        out = b""
        if not self._in_progress:
            self._in_progress = True
            out += self._next("response.in_progress", {"response": self._response})
        if not self._added:
            self._added = True
            if self._item_id is None:
                self._item_id = f"msg_{secrets.token_hex(16)}"
            out += self._next(
                "response.output_item.added", {"item": self._item(None), "output_index": 0}
            )
        if not self._part_added:
            self._part_added = True
            out += self._next(
                "response.content_part.added",
                {"content_index": 0, "item_id": self._item_id, "output_index": 0,
                 "part": self._part("", [])},
            )  # fmt: skip
        return out

    def rewrite(self, event: bytes) -> bytes | None:
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
        text = choice.get("text") or ""
        if not text:
            return None
        self._text.append(text)
        out = self._open()
        seq = self._seq + 1
        self._seq = seq
        delta: dict[str, Any] = {"content_index": 0, "delta": text, "item_id": self._item_id, "logprobs": [],
                 "output_index": 0, "sequence_number": seq,
                 "type": "response.output_text.delta"}  # fmt: skip
        return out + _event("response.output_text.delta", delta)

    def counts(self) -> tuple[int, int]:
        return len(self.prompt_ids or ()), len(self.generated)

    def _final(self, text: str) -> dict[str, Any]:
        assert self._response is not None
        final = dict(self._response)
        incomplete = self._finish == "length"
        final["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
        final["output"] = [self._item(text)]
        final["status"] = "incomplete" if incomplete else "completed"
        prompt, completion = self.counts()
        final["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0,
                                     "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                      "output_tokens_per_turn": [],
                                      "tool_output_tokens_per_turn": []},
            "total_tokens": prompt + completion,
        }  # fmt: skip
        return final

    def closing(self) -> bytes:
        """The end of the stream after a continuation (or a member that died before it)."""
        if self.stopped:
            return b""
        self.stopped = True
        text = "".join(self._text)
        out = self._open()
        if not self._done:
            self._done = True
            out += self._next(
                "response.output_text.done",
                {"content_index": 0, "item_id": self._item_id, "logprobs": [],
                 "output_index": 0, "sequence_number": 0, "text": text},
            )  # fmt: skip
        if not self._part_done:
            out += self._next(
                "response.content_part.done",
                {"content_index": 0, "item_id": self._item_id, "output_index": 0,
                 "part": self._part(text, None)},
            )  # fmt: skip
        if not self._item_done:
            out += self._next(
                "response.output_item.done", {"item": self._item(text), "output_index": 0}
            )
        return out + self._next("response.completed", {"response": self._final(text)})
