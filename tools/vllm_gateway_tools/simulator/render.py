"""Bytes the simulator sends, rendered exactly as vLLM 0.32's OpenAI server renders them. No I/O.

The shapes are copied from vLLM's serving code: a stream chunk is
``ChatCompletionStreamResponse.model_dump_json(exclude_unset=True)`` with the fields the serving code
sets explicitly (hence ``"logprobs":null`` and ``"token_ids":null`` but no ``usage``), the final usage
chunk is dumped with ``exclude_none=True``, and a whole response is ``model_dump()`` (every field,
``null`` included). Key order follows the pydantic models, so a byte-for-byte diff against real vLLM
differs only in ids, timestamps and text.

Per stream, ``StreamTemplate`` renders the invariant parts of a chunk once (id, model, created); a
content chunk is then two byte concatenations. ``frame`` wraps an SSE event as one HTTP/1.1 chunk
(``Transfer-Encoding: chunked``), as uvicorn sends vLLM's ``StreamingResponse``.
"""

from __future__ import annotations

import http
import time
from email.utils import formatdate
from typing import Any

import orjson

__all__ = [
    "DONE",
    "LAST_CHUNK",
    "StreamTemplate",
    "chat_response",
    "completion_response",
    "error_body",
    "error_type",
    "frame",
    "models_body",
    "response_head",
    "stream_head",
    "token_text",
    "traceback_body",
]

DONE = b"data: [DONE]\n\n"
# The terminating chunk of a ``Transfer-Encoding: chunked`` body.
LAST_CHUNK = b"0\r\n\r\n"

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


_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            405: b"Method Not Allowed", 411: b"Length Required", 413: b"Payload Too Large",
            500: b"Internal Server Error", 503: b"Service Unavailable"}  # fmt: skip
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


def frame(event: bytes) -> bytes:
    """``event`` as one chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%b\r\n" % (len(event), event)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


class StreamTemplate:
    """The SSE events of one streamed response (chat or completions), with its fixed parts pre-rendered."""

    __slots__ = ("_head", "chat", "created", "model", "request_id")

    def __init__(self, *, chat: bool, request_id: str, model: str, created: int) -> None:
        self.chat = chat
        self.request_id = request_id
        self.model = model
        self.created = created
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self._head = b'data: {"id":%b,"object":"%b","created":%d,"model":%b,"choices":[' % (
            _dumps(request_id),
            obj,
            created,
            _dumps(model),
        )

    def first(self) -> bytes | None:
        """The role chunk that opens a chat stream; completions streams have none."""
        if not self.chat:
            return None
        return self._head + (
            b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
            b'"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n'
        )

    def token(self, text: str, finish_reason: str | None = None) -> bytes:
        """A content chunk; the last one of a stream carries ``finish_reason``."""
        body = _dumps(text)
        if self.chat:
            if finish_reason is None:
                tail = b'},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
            else:
                tail = (
                    b'},"logprobs":null,"finish_reason":"%b","stop_reason":null,"token_ids":null}]}\n\n'
                    % (finish_reason.encode())
                )
            return self._head + b'{"index":0,"delta":{"content":' + body + tail
        reason = b"null" if finish_reason is None else b'"%b"' % finish_reason.encode()
        return (
            self._head
            + b'{"index":0,"text":'
            + body
            + b',"logprobs":null,"finish_reason":'
            + reason
            + b',"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}\n\n'
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The final usage chunk that ``stream_options.include_usage`` asks for."""
        return (
            self._head
            + b'],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
            % (
                prompt_tokens,
                prompt_tokens + completion_tokens,
                completion_tokens,
            )
        )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def chat_response(
    *,
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    """A non-streamed ``/v1/chat/completions`` body (``ChatCompletionResponse.model_dump()``)."""
    return _dumps(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": _usage(prompt_tokens, completion_tokens),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    )


def completion_response(
    *,
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    """A non-streamed ``/v1/completions`` body (``CompletionResponse.model_dump()``)."""
    return _dumps(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": _usage(prompt_tokens, completion_tokens),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    )


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
    return _dumps(
        {
            "error": {
                "message": message,
                "type": err_type or error_type(status),
                "param": param,
                "code": status,
            }
        }
    )


def traceback_body(request_id: str) -> bytes:
    """A 500 body that leaks a (fake) traceback and internal paths, as a careless server would."""
    trace = (
        "Traceback (most recent call last):\n"
        '  File "/opt/vllm/lib/python3.11/site-packages/vllm/entrypoints/openai/serving_chat.py",'
        " line 312, in create_chat_completion\n"
        "    generator = await self.engine_client.generate(prompt, sampling_params, request_id)\n"
        '  File "/opt/vllm/lib/python3.11/site-packages/vllm/v1/engine/async_llm.py", line 421,'
        " in generate\n"
        "    raise EngineDeadError(f'engine core at 10.0.3.7:29500 died')\n"
        "vllm.v1.engine.exceptions.EngineDeadError: engine core at 10.0.3.7:29500 died\n"
    )
    return error_body(f"{trace}(request {request_id})", 500, err_type="InternalServerError")


def models_body(models: tuple[str, ...], *, max_model_len: int, created: int) -> bytes:
    """``GET /v1/models`` as vLLM renders its ``ModelList``."""
    data = []
    for index, name in enumerate(models):
        data.append(
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": name,
                "parent": None,
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
    return _dumps({"object": "list", "data": data})
