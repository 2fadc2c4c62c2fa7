"""Mid-stream failover for the Responses API, text output: what a Responses stream has produced
and the continuation's text framed back into Responses events (how the ids are had and the
continuation made: ``failover_text``). The conversation goes to ``/tokenize`` as vLLM's
``construct_input_messages`` builds it: the instructions as the system message, then the input.

Each continuation chunk with text becomes a ``response.output_text.delta`` numbered on from the
stream's last ``sequence_number`` (with ``response.in_progress``, ``response.output_item.added``
and ``response.content_part.added`` first if the member died before them); its end is the stream's
own: ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done`` (the whole text) and ``response.completed``, whose response is the
stream's ``response.created`` one with the output, the status (``incomplete`` at
``max_output_tokens``) and the usage of the whole answer. The usage's ``cached_tokens`` is 0:
what the members cached is not known to the gateway.

Not continued (counted): ``tools``, ``reasoning``, ``structured`` (``text.format`` other than
text), ``previous_response`` (the conversation lives on a member), ``background``, ``content``
(input items other than messages with text content).
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from vllm_gateway.proxy.failover_text import TextResumable, parse_typed

__all__ = ["ResponsesResumable", "responses_not_continuable"]


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


class ResponsesResumable(TextResumable):
    """What one streamed Responses request has produced so far, and how to go on."""

    __slots__ = (
        "_added",
        "_in_progress",
        "_item_done",
        "_item_id",
        "_part_added",
        "_part_done",
        "_response",
        "_seq",
    )

    budget_field = "max_output_tokens"

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self._response: dict[str, Any] | None = None  # response.created's response
        self._item_id: str | None = None
        self._in_progress = False  # response.in_progress relayed
        self._added = False  # response.output_item.added relayed
        self._part_added = False  # response.content_part.added relayed
        self._part_done = False  # response.content_part.done relayed
        self._item_done = False  # response.output_item.done relayed
        self._seq = -1  # the last sequence_number relayed

    def observe(self, event: bytes) -> bytes:
        kind, obj = parse_typed(event)
        if obj is None:
            return event
        seq = obj.get("sequence_number")
        if isinstance(seq, int):
            self._seq = max(self._seq, seq)
        if kind == "response.created":
            response = obj.get("response")
            if isinstance(response, dict):
                self._response = response
                self.ident = response.get("id")
                self.model = response.get("model")
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
            self._whole = True
        elif kind == "response.content_part.done":
            self._part_done = True
        elif kind == "response.output_item.done":
            self._item_done = True
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.stopped = True
        elif kind is not None and kind.startswith(("response.reasoning", "response.function")):
            self.blocked = self.blocked or "reasoning"
        return event

    def conversation(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.body.get("instructions"):
            messages.append({"role": "system", "content": self.body["instructions"]})
        given = self.body.get("input")
        if isinstance(given, str):
            messages.append({"role": "user", "content": given})
        else:
            messages += [{"role": i["role"], "content": i["content"]} for i in given or ()]
        return messages

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

    def frame(self, text: str) -> bytes:
        out = self._open()
        seq = self._seq + 1
        self._seq = seq
        delta: dict[str, Any] = {"content_index": 0, "delta": text, "item_id": self._item_id,
                                 "logprobs": [], "output_index": 0, "sequence_number": seq,
                                 "type": "response.output_text.delta"}  # fmt: skip
        return out + _event("response.output_text.delta", delta)

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
        if not self._whole:
            self._whole = True
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
