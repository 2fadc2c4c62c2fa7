"""The streamed protocols the gateway relays, each as a small description the one relay loop reads:
what a complete stream is, what the backend's own failure looks like, and how the gateway ends a
failed stream in that protocol's error shape, so that a client library of that protocol raises
instead of taking a cut stream for a whole one.

- ``OPENAI`` (chat, completions, audio): ``data: {json}`` events; complete at ``data: [DONE]``. A
  failure is ``data: {"error": {...}}`` and no ``[DONE]`` (the openai SDK raises on a data line
  whose JSON has a top-level ``error``).
- ``RESPONSES`` (the Responses API): ``event: <type>`` + ``data: {json}``; complete at
  ``response.completed`` (or the protocol's other terminal events, ``response.incomplete`` and
  ``response.failed``, which are the model's verdict, relayed as they are). A failure the gateway
  reports is ``event: error`` whose data has a top-level ``error`` object (the openai SDK raises
  ``APIError`` on exactly that; an ``error`` event without it is yielded, not raised).
- ``ANTHROPIC`` (the Messages API): ``event: <type>`` + ``data: {json}``; complete at
  ``message_stop``. A failure is ``event: error`` with ``{"type": "error", "error": {"type",
  "message"}}`` and no ``message_stop`` (the anthropic SDK raises ``APIStatusError`` on it). Its
  errors before a stream (and for non-streamed requests) take the same envelope.

Every classification reads one event (the relay forwards whole events only); comments and other
events that carry no content (``ping``, keep-alive comments) are ``NOTE``: relayed, not counted.
"""

from __future__ import annotations

import orjson

from vllm_gateway import errors
from vllm_gateway.errors import GatewayError

__all__ = ["ANTHROPIC", "DONE", "ERROR", "NOTE", "OK", "OPENAI", "RESPONSES", "StreamProtocol"]

OK = 0  # a content event: relayed and counted
DONE = 1  # the protocol's end of a complete stream: relayed, then the stream ends
ERROR = 2  # the backend reports a failure, or sent something that is not the protocol
NOTE = 3  # a comment or an event without content: relayed, not counted

_DONE_DATA = b"[DONE]"


class StreamProtocol:
    """The OpenAI framing; the typed-event protocols below override what differs."""

    name = "openai"
    # What the relay names in its error when a stream ends without the protocol's end.
    end_marker = "[DONE]"

    def classify(self, event: bytes) -> int:
        if event.startswith(b"data:"):
            payload = event[5:].strip()
            if payload == _DONE_DATA:
                return DONE
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return ERROR
            if not isinstance(obj, dict) or "error" in obj or obj.get("object") == "error":
                return ERROR
            return OK
        # Comments (": keep-alive") and other fields are legal SSE that carry no data.
        for line in event.split(b"\n"):
            if line and not line.startswith((b":", b"event:", b"id:", b"retry:")):
                return ERROR
        return NOTE

    def error_body(self, err: GatewayError, request_id: str | None) -> bytes:
        """The body of an error answered before a stream (or to a non-streamed request)."""
        return errors.json_body(err, request_id)

    def error_event(self, err: GatewayError, request_id: str | None, sequence: int) -> bytes:
        """The last event of a stream that failed after it started (no end marker follows).
        ``sequence`` is the number of events already relayed."""
        return errors.sse_event(err, request_id)


def _typed(event: bytes) -> tuple[bytes | None, bytes | None]:
    """(event name, data) of one SSE event; None where absent."""
    name = data = None
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip()
        elif line.startswith(b"data:"):
            piece = line[5:].strip()
            data = piece if data is None else data + b"\n" + piece
        elif line and not line.startswith((b":", b"id:", b"retry:")):
            return b"", None  # not SSE
    return name, data


def _json_object(data: bytes | None) -> dict[str, object] | None:
    if data is None:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


class _Responses(StreamProtocol):
    name = "responses"
    end_marker = "response.completed"
    _TERMINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})

    def classify(self, event: bytes) -> int:
        name, data = _typed(event)
        if name == b"":
            return ERROR
        if data is None:
            return NOTE
        obj = _json_object(data)
        if obj is None or name == b"error" or ("error" in obj and name is None):
            return ERROR
        if name in self._TERMINAL:
            return DONE
        return OK

    def error_event(self, err: GatewayError, request_id: str | None, sequence: int) -> bytes:
        payload = {
            "type": "error",
            "sequence_number": sequence,
            "code": err.type,
            "message": err.message,
            "param": err.param,
            "error": errors.error_object(err, request_id),
        }
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


# The gateway's error types, as the Anthropic API names its own.
def _anthropic_type(err: GatewayError) -> str:
    status = err.status
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 413:
        return "request_too_large"
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "overloaded_error"
    if status == 504:
        return "timeout_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "api_error"


def _anthropic_error(err: GatewayError, request_id: str | None) -> bytes:
    inner: dict[str, object] = {"type": _anthropic_type(err), "message": err.message}
    body: dict[str, object] = {"type": "error", "error": inner}
    if request_id:
        body["request_id"] = request_id
        inner["request_id"] = request_id
    inner["gateway_type"] = err.type  # the gateway's own stable name, as in every other error
    return orjson.dumps(body)


class _Anthropic(StreamProtocol):
    name = "anthropic"
    end_marker = "message_stop"

    def classify(self, event: bytes) -> int:
        name, data = _typed(event)
        if name == b"":
            return ERROR
        if data is None or name == b"ping":
            return NOTE
        obj = _json_object(data)
        if obj is None or name == b"error" or obj.get("type") == "error":
            return ERROR
        if name == b"message_stop":
            return DONE
        return OK

    def error_body(self, err: GatewayError, request_id: str | None) -> bytes:
        return _anthropic_error(err, request_id)

    def error_event(self, err: GatewayError, request_id: str | None, sequence: int) -> bytes:
        return b"event: error\ndata: " + _anthropic_error(err, request_id) + b"\n\n"


OPENAI = StreamProtocol()
RESPONSES = _Responses()
ANTHROPIC = _Anthropic()
