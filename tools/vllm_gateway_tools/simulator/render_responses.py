"""The bytes of vLLM 0.32's Responses API (``/v1/responses``). No I/O.

Shapes copied from captures of a real vLLM (docs: /work/notes/samples/responses_*.txt): the
``response`` object is ``ResponsesResponse.model_dump(mode="json")`` with every field in vLLM's order;
a stream is ``event: <type>\\ndata: <json>\\n\\n`` events in the order response.created,
response.in_progress, response.output_item.added, response.content_part.added, one
response.output_text.delta per token, response.output_text.done, response.content_part.done,
response.output_item.done, response.completed, with ``sequence_number`` counting from 0 and no
``[DONE]``. A stop at ``max_output_tokens`` still ends with response.completed, its response
``"status":"incomplete"``; vLLM never sends response.incomplete, response.failed or error.

Per stream the delta event is two byte concatenations on a pre-rendered head and tail.
"""

from __future__ import annotations

from typing import Any

import orjson

from vllm_gateway_tools.simulator.render import Script, error_body, output_text, token_text

__all__ = ["ResponsesScript", "not_found_body"]


def _event(kind: bytes, payload: bytes) -> bytes:
    return b"event: %b\ndata: %b\n\n" % (kind, payload)


def _float(value: Any, default: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default


def not_found_body(response_id: str) -> bytes:
    """A response id the store does not know (retrieve, cancel, ``previous_response_id``)."""
    return error_body(f"Response with id '{response_id}' not found.", 404,
                      param="response_id", err_type="invalid_request_error")  # fmt: skip


class ResponsesScript(Script):
    """One ``/v1/responses`` request: its events, its whole body and its stored states.

    ``request_id`` is the response id (``resp_...``); ``max_output_tokens`` is the limit vLLM
    reports (the request's, or what the context leaves); ``body`` the request, for the fields the
    response echoes.
    """

    def __init__(self, *, body: dict[str, Any], max_output_tokens: int, item_id: str,
                 stream: bool, **kw: Any) -> None:  # fmt: skip
        super().__init__(**kw)
        self.stream = stream
        self.item_id = item_id
        self.seq = 0
        background = body.get("background") is True
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        tool_choice = body.get("tool_choice", "auto")
        if not tools and tool_choice in ("auto", "none"):
            tool_choice = "none"
        self._fields_a = {
            "instructions": body.get("instructions"),
            "metadata": body.get("metadata"),
            "model": self.model,
            "object": "response",
        }
        self._fields_b = {
            "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
            "temperature": _float(body.get("temperature"), 1.0),
            "tool_choice": tool_choice,
            "tools": tools,
            "top_p": _float(body.get("top_p"), 1.0),
            "background": background,
            "max_output_tokens": max_output_tokens,
            "max_tool_calls": body.get("max_tool_calls"),
            "previous_response_id": body.get("previous_response_id"),
            "prompt": None,
            "reasoning": body.get("reasoning"),
            "service_tier": body.get("service_tier") or "auto",
        }
        self._fields_c = {
            "text": body.get("text"),
            "top_logprobs": body.get("top_logprobs") if body.get("top_logprobs") else None,
            "truncation": body.get("truncation") or "disabled",
        }
        self._fields_d = {
            "user": body.get("user"),
            "presence_penalty": _float(body.get("presence_penalty"), 0.0),
            "frequency_penalty": _float(body.get("frequency_penalty"), 0.0),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "input_messages": None,
            "output_messages": None,
        }
        item = orjson.dumps(item_id)
        self._delta_head = b'{"content_index":0,"delta":'
        self._delta_tail = b',"item_id":%b,"logprobs":[],"output_index":0,"sequence_number":' % item

    # --- objects ------------------------------------------------------------------------------
    def status(self) -> str:
        """The final status: ``incomplete`` at the token limit, else ``completed`` (also after an
        abort: vLLM's plain text path has no other status for it)."""
        return "incomplete" if self.finish == "length" else "completed"

    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0,
                                     "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
            "output_tokens": self.n,
            "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                      "output_tokens_per_turn": [],
                                      "tool_output_tokens_per_turn": []},
            "total_tokens": self.prompt_tokens + self.n,
        }  # fmt: skip

    def obj(self, status: str, final: bool) -> dict[str, Any]:
        """The response object in ``status``; ``final``: with the output and usage."""
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        out: dict[str, Any] = {"id": self.request_id, "created_at": self.created,
                               "incomplete_details": incomplete}  # fmt: skip
        out.update(self._fields_a)
        out["output"] = [self._item(output_text(self.n))] if final else []
        out.update(self._fields_b)
        out["status"] = status
        out.update(self._fields_c)
        out["usage"] = self.usage() if final else None
        out.update(self._fields_d)
        return out

    def final_object(self) -> dict[str, Any]:
        return self.obj(self.status(), True)

    def _part(self, text: str, logprobs: list[Any] | None) -> dict[str, Any]:
        return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}

    def _item(self, text: str | None) -> dict[str, Any]:
        """The output message: in progress (``text`` None), or done with ``text``."""
        content = [self._part(text, None)] if text else []
        return {"id": self.item_id, "content": content, "role": "assistant",
                "status": "in_progress" if text is None else "completed", "type": "message",
                "phase": None}  # fmt: skip

    # --- events -------------------------------------------------------------------------------
    def _next(self, kind: str, fields: dict[str, Any]) -> bytes:
        fields["sequence_number"] = self.seq
        fields["type"] = kind
        self.seq += 1
        return _event(kind.encode(), orjson.dumps(fields))

    def opening(self) -> list[bytes]:
        initial = self.obj("in_progress", False)
        return [
            self._next("response.created", {"response": initial}),
            self._next("response.in_progress", {"response": initial}),
        ]

    def first(self) -> list[bytes]:
        return [
            self._next("response.output_item.added", {"item": self._item(None),
                                                       "output_index": 0}),
            self._next("response.content_part.added",
                       {"content_index": 0, "item_id": self.item_id, "output_index": 0,
                        "part": self._part("", [])}),
        ]  # fmt: skip

    def token(self, i: int, last: bool) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        return _event(
            b"response.output_text.delta",
            self._delta_head
            + orjson.dumps(token_text(i))
            + self._delta_tail
            + b'%d,"type":"response.output_text.delta"}' % seq,
        )

    def closing(self) -> list[bytes]:
        text = output_text(self.n)
        return [
            self._next("response.output_text.done",
                       {"content_index": 0, "item_id": self.item_id, "logprobs": [],
                        "output_index": 0, "sequence_number": 0, "text": text}),
            self._next("response.content_part.done",
                       {"content_index": 0, "item_id": self.item_id, "output_index": 0,
                        "part": self._part(text, None)}),
            self._next("response.output_item.done", {"item": self._item(text),
                                                      "output_index": 0}),
            self._next("response.completed", {"response": self.final_object()}),
        ]  # fmt: skip

    def whole(self) -> bytes:
        return orjson.dumps(self.final_object())
