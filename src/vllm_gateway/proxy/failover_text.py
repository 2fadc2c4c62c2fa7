"""Mid-stream failover for the streams vLLM takes no token ids for (Messages, Responses): what
such a stream has produced, as text, and the ``/v1/completions`` continuation that goes on from
it. The protocol's events (what is noted of them, how the continuation's text is framed back) are
each protocol's subclass's: ``failover_messages``, ``failover_responses``.

The ids come from vLLM itself when a stream must go on (``continuation.py`` asks a member that is
up): the prompt's from ``/tokenize`` with ``messages`` (the request's conversation as chat
messages, as vLLM's route for the protocol builds them, which vLLM renders with the model's chat
template), the answer's so far from ``/tokenize`` of its text without special tokens. The
continuation is then the chat one: the prompt's ids and the answer's, the output budget reduced
by as many, the request's sampling parameters.

Unlike chat's ids, the answer's ids are its text tokenized again: where a tokenizer reads its own
output back differently (a ``"\\n","\\n"`` pair as one ``"\\n\\n"`` token), the continuation is a
valid one but not the token-for-token one. The text the client already has is never changed.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["TextResumable", "completions_body", "data_object", "parse_typed", "part_choices"]

_CARRIED = ("temperature", "top_p", "top_k")


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


def completions_body(
    request: dict[str, Any], model: str | None, prompt: Any, carried: tuple[str, ...]
) -> dict[str, Any]:
    """The streamed ``/v1/completions`` continuation body for ``prompt`` (ids), with the
    request's fields named in ``carried``; the caller sets the budget."""
    body: dict[str, Any] = {
        "model": request.get("model") or model,
        "prompt": prompt,
        "stream": True,
        "return_token_ids": True,
    }
    for field in carried:
        if field in request:
            body[field] = request[field]
    return body


def data_object(event: bytes) -> dict[str, Any] | None:
    """The JSON object of one ``data:`` event; None where it holds none."""
    payload = event[5:].strip() if event.startswith(b"data:") else b""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def part_choices(event: bytes) -> list[Any] | bytes | None:
    """The choices of one event of a continuation (a completions stream): a non-empty list; or
    the event itself where it is not a JSON object (passed on as is); or None where there is
    nothing to send for it (``[DONE]``, which the relay writes itself, or a usage chunk)."""
    if event.startswith(b"data:") and event[5:].strip() == b"[DONE]":
        return None
    obj = data_object(event)
    if obj is None:
        return event
    choices = obj.get("choices")
    return choices if isinstance(choices, list) and choices else None


class TextResumable:
    """What one streamed request of a typed-event protocol has produced so far, and how to go on.
    A subclass notes the protocol's events (``observe``), names its conversation
    (``conversation``) and frames text and the end back into its events (``frame``,
    ``closing``)."""

    __slots__ = (
        "_budget",
        "_finish",
        "_stop_reason",
        "_text",
        "_whole",
        "blocked",
        "body",
        "generated",
        "ident",
        "model",
        "parts",
        "prompt_ids",
        "stopped",
    )

    budget_field = "max_tokens"  # the request's output budget

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        budget = body.get(self.budget_field)
        self._budget = budget if isinstance(budget, int) else None
        self.ident: str | None = None
        self.model: str | None = None
        self._text: list[str] = []  # the answer's text, as relayed
        self._whole = False  # the protocol said the answer's text is whole
        self._finish: str | None = None
        self._stop_reason: Any = None
        self.stopped = False  # the protocol's stop was relayed: the generation is over
        self.blocked: str | None = None
        # Filled from /tokenize when the stream must go on (None before).
        self.prompt_ids: list[int] | None = None
        self.generated: list[int] = []
        self.parts = 1

    # --- what a subclass says -----------------------------------------------------------------

    def observe(self, event: bytes) -> bytes:
        """Note one event of the stream being relayed; the event as the client sees it."""
        raise NotImplementedError

    def conversation(self) -> list[dict[str, Any]]:
        """The request's conversation as chat messages, as vLLM's route builds them."""
        raise NotImplementedError

    def frame(self, text: str) -> bytes:
        """The continuation's ``text`` as the protocol's events."""
        raise NotImplementedError

    def closing(self) -> bytes:
        """The end of the stream after a continuation (or a member that died before it)."""
        raise NotImplementedError

    def carried(self) -> dict[str, Any]:
        """Continuation fields the protocol names otherwise (its stop sequences)."""
        return {}

    # --- going on elsewhere -------------------------------------------------------------------

    @property
    def whole(self) -> bool:
        """The protocol said the answer's text is whole (the generation had ended)."""
        return self._whole

    @property
    def finished(self) -> bool:
        """The generation is over: its stop was relayed; or, its ids known, its text was whole
        (vLLM ends the text when the generation's last chunk came) or its budget is spent."""
        return self.stopped or (self.prompt_ids is not None and self._finish is not None)

    def why_not(self) -> str | None:
        if self.blocked is not None:
            return self.blocked
        if self.ident is None:
            return "no_token_ids"
        return None

    def tokenize_requests(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The ``/tokenize`` bodies for the prompt's ids and the answer's (None: no answer yet)."""
        model = self.body.get("model") or self.model
        prompt = {"model": model, "messages": self.conversation(), "add_generation_prompt": True}
        text = "".join(self._text)
        answer = {"model": model, "prompt": text, "add_special_tokens": False} if text else None
        return prompt, answer

    def take_ids(self, prompt_ids: list[int], answer_ids: list[int]) -> None:
        self.prompt_ids = prompt_ids
        self.generated = list(answer_ids)
        if self._budget is not None and len(answer_ids) >= self._budget:
            self._finish = "length"
        elif self._whole:
            self._finish = "stop"  # a matched stop string is lost with the stream

    def continuation(self) -> tuple[bytes, dict[str, Any]]:
        """The ``/v1/completions`` body that goes on from the text relayed so far."""
        assert self.prompt_ids is not None
        body = completions_body(
            self.body, self.model, [*self.prompt_ids, *self.generated], _CARRIED
        )
        body.update(self.carried())
        if self._budget is not None:
            body["max_tokens"] = max(1, self._budget - len(self.generated))
        self.parts += 1
        return orjson.dumps(body), body

    def rewrite(self, event: bytes) -> bytes | None:
        """A continuation's event as the protocol's events (None: nothing to send for it)."""
        choices = part_choices(event)
        if not isinstance(choices, list):
            return choices
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
        return self.frame(text)

    def counts(self) -> tuple[int, int]:
        """(prompt, completion) tokens of the whole answer so far."""
        return len(self.prompt_ids or ()), len(self.generated)
