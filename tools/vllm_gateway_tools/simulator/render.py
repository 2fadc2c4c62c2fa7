"""Bytes the simulator sends, rendered exactly as vLLM 0.32's server renders them. No I/O.

This module holds what every route shares: the HTTP heads (as uvicorn sends them), ``frame`` (an
SSE event as one HTTP/1.1 chunk of a ``Transfer-Encoding: chunked`` body), vLLM's error envelopes
(handler errors, validation errors, ``HTTPException``, the Anthropic one), ``/v1/models``, and
``Script``: what the pacing engine (``simulator.engine``) asks for the bytes of one engine
request, the events around and between the tokens of a stream or the whole body. The scripts of
each protocol live in ``render_openai`` (chat, completions, batch), ``render_responses``,
``render_messages``, ``render_audio`` and ``render_pooling``. A script's last closing event is
the protocol's terminal one (``[DONE]``, ``response.completed``, ``message_stop``): the
``no_done`` fault leaves it out.

Key order follows vLLM's pydantic models, so a byte-for-byte diff against real vLLM differs only
in ids, timestamps and text.
"""

from __future__ import annotations

import http
import time
import uuid
from email.utils import formatdate
from typing import Any

import orjson

__all__ = [
    "BAD_JSON_EVENT",
    "DONE",
    "LAST_CHUNK",
    "NOT_FOUND",
    "BodyScript",
    "Script",
    "anthropic_error_body",
    "dumps",
    "error_body",
    "error_type",
    "error_type_phrase",
    "frame",
    "http_error_body",
    "missing",
    "models_body",
    "not_json",
    "output_text",
    "random_id",
    "response_head",
    "stream_head",
    "token_text",
    "traceback_body",
    "traceback_text",
    "validation_body",
]

DONE = b"data: [DONE]\n\n"
# The terminating chunk of a ``Transfer-Encoding: chunked`` body.
LAST_CHUNK = b"0\r\n\r\n"
# What FastAPI answers for a path no route serves (a route of the other runner, a dev route).
NOT_FOUND = b'{"detail":"Not Found"}'
BAD_JSON_EVENT = b"data: {not json\n\n"

# vLLM's error ``type`` for the statuses its handlers produce; others use the status phrase,
# as vLLM does for ``GracefulHTTPError``.
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_date_second = -1
_date_value = b""


def _date() -> bytes:
    """The ``date`` header value, formatted at most once a second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_value = now, formatdate(now, usegmt=True).encode()
    return _date_value


def response_head(status: int, content_type: bytes | None, length: int, *, close: bool) -> bytes:
    """The status line and headers of a response with a ``content-length`` body."""
    head = b"HTTP/1.1 %d %b\r\ndate: %b\r\nserver: vllm-gateway-simulator\r\ncontent-length: %d\r\n" % (
        status, _REASONS.get(status, b"Status"), _date(), length)  # fmt: skip
    if content_type is not None:
        head += b"content-type: %b\r\n" % content_type
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n"


def stream_head() -> bytes:
    """The head of an SSE response, as uvicorn sends vLLM's ``StreamingResponse``."""
    return (
        b"HTTP/1.1 200 OK\r\ndate: %b\r\nserver: vllm-gateway-simulator\r\n"
        b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
        % _date()
    )


def token_text(index: int) -> str:
    """The deterministic text of output token ``index``: `` tok0``, `` tok1``, ..."""
    return f" tok{index}"


def output_text(n: int) -> str:
    """The whole text of ``n`` output tokens."""
    return "".join([token_text(i) for i in range(n)])


def random_id() -> str:
    """16 hex digits, like vLLM's ``random_uuid()``."""
    return f"{uuid.uuid4().int & 0xFFFFFFFFFFFFFFFF:016x}"


def frame(event: bytes) -> bytes:
    """``event`` as one chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%b\r\n" % (len(event), event)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def error_type(status: int) -> str:
    """vLLM's ``error.type`` for an HTTP status."""
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "InternalServerError"


def error_body(
    message: str, status: int, *, param: str | None = None, err_type: str | None = None
) -> bytes:
    """vLLM's ``ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}``."""
    return dumps(
        {
            "error": {
                "message": message,
                "type": err_type or error_type(status),
                "param": param,
                "code": status,
            }
        }
    )


def traceback_text(request_id: str) -> str:
    """A (fake) Python traceback with internal paths and an internal address."""
    return (
        "Traceback (most recent call last):\n"
        '  File "/opt/vllm/lib/python3.11/site-packages/vllm/entrypoints/openai/serving_chat.py",'
        " line 312, in create_chat_completion\n"
        "    generator = await self.engine_client.generate(prompt, sampling_params, request_id)\n"
        '  File "/opt/vllm/lib/python3.11/site-packages/vllm/v1/engine/async_llm.py", line 421,'
        " in generate\n"
        "    raise EngineDeadError(f'engine core at 10.0.3.7:29500 died')\n"
        "vllm.v1.engine.exceptions.EngineDeadError: engine core at 10.0.3.7:29500 died\n"
        f"(request {request_id})"
    )


def traceback_body(request_id: str) -> bytes:
    """A 500 body that leaks a (fake) traceback and internal paths, as a careless server would."""
    return error_body(traceback_text(request_id), 500, err_type="InternalServerError")


def http_error_body(detail: str, status: int) -> bytes:
    """An ``HTTPException`` raised in a vLLM handler: the error envelope with the status phrase
    as ``type`` (vLLM's ``http_exception_handler``)."""
    return error_body(detail, status, err_type=error_type_phrase(status))


def error_type_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Internal Server Error"


def anthropic_error_body(message: str, err_type: str) -> bytes:
    """The envelope of ``/v1/messages`` handler errors: Anthropic's shape with vLLM's type names."""
    return dumps({"type": "error", "error": {"type": err_type, "message": message}})


def _summarize_input(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "...[truncated]"
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "...[truncated]"


def validation_body(errors: list[dict[str, Any]], *, param: str | None = None) -> bytes:
    """A request that failed pydantic validation, as vLLM's ``validation_exception_handler``
    renders it: every error as a Python dict repr, ``type`` the phrase ``"Bad Request"``,
    ``param`` the first error's location. Each error: ``type``, ``loc`` (``"body.x"``), ``msg``,
    ``input`` (the raw value; summarised here as vLLM does) and optionally ``ctx``. ``param``
    stands in for the location when a validator named the parameter itself."""
    shown = []
    for err in errors[:10]:
        shown.append({**err, "input": _summarize_input(err.get("input"))})
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {e}\n" for e in shown)
    if len(errors) > len(shown):
        message += f"  ...and {len(errors) - len(shown)} more {label}\n"
    if param is None and errors:
        param = errors[0]["loc"]
    return error_body(message.rstrip(), 400, param=param, err_type="Bad Request")


def missing(loc: str, body: Any) -> dict[str, Any]:
    """The validation error of a required field that is absent."""
    return {"type": "missing", "loc": loc, "msg": "Field required", "input": body}


def not_json() -> bytes:
    """A body that is not JSON, as vLLM answers it."""
    return validation_body(
        [
            {
                "type": "json_invalid",
                "loc": "body.0",
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": "Expecting value"},
            }
        ]
    )


def models_body(
    models: tuple[str, ...],
    *,
    max_model_len: int,
    created: int,
    loras: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """``GET /v1/models`` as vLLM renders its ``ModelList``: the served models, then each loaded
    LoRA adapter (``loras``: name, path) with its path as ``root`` and the base model as parent."""
    cards: list[tuple[str, str, str | None]] = [(name, name, None) for name in models]
    cards += [(name, path, models[0]) for name, path in loras]
    data = []
    for index, (name, root, parent) in enumerate(cards):
        data.append(
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-sim{index:013x}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
        )
    return dumps({"object": "list", "data": data})


class Script:
    """The bytes of one engine request, asked for by the pacing engine as it goes.

    ``n`` output tokens, then ``finish`` (``"stop"``, ``"length"`` or ``"abort"``); both may be
    changed before the closing events are asked for (a request cut short by ``/pause``). A
    stream is ``opening`` (sent with the head), ``first`` (just before token 0), one ``token``
    event per token, ``closing``; ``cut_short`` carries the finish when the stream ends early.
    """

    stream = True
    bad_event = BAD_JSON_EVENT

    def __init__(self, *, request_id: str, model: str, n: int, finish: str, prompt_tokens: int,
                 created: int) -> None:  # fmt: skip
        self.request_id = request_id
        self.model = model
        self.n = n
        self.finish = finish
        self.prompt_tokens = prompt_tokens
        self.created = created

    def opening(self) -> list[bytes]:
        return []

    def first(self) -> list[bytes]:
        return []

    def token(self, i: int, last: bool) -> bytes:
        raise NotImplementedError

    def tokens(self, i: int, last: bool) -> list[bytes]:
        """The events of step ``i``: one token (a script of several choices: one per choice)."""
        return [self.token(i, last)]

    def cut_short(self) -> list[bytes]:
        return []

    def closing(self) -> list[bytes]:
        return []

    def whole(self) -> bytes:
        raise NotImplementedError

    def error(self, status: int, message: str, err_type: str | None = None) -> bytes:
        """The route's error body for a failed request."""
        return error_body(message, status, err_type=err_type)


class BodyScript(Script):
    """A request whose whole body is known on arrival (the pooling routes)."""

    stream = False

    def __init__(self, *, body: bytes, **kw: Any) -> None:
        super().__init__(**kw)
        self.body = body

    def whole(self) -> bytes:
        return self.body
