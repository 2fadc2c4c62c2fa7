"""Every error the gateway answers with, and the one place they are rendered.

The tree::

    GatewayError                       (500 internal_error)
    ├── ClientError                    4xx: the request itself is at fault
    │   ├── InvalidJSON                400 invalid_json
    │   ├── InvalidRequest             400 invalid_request (names the field in ``param``)
    │   ├── Unauthorized               401 authentication_error
    │   ├── NotFound                   404 not_found
    │   ├── ModelNotFound              404 model_not_found
    │   ├── MethodNotAllowed           405 method_not_allowed
    │   ├── BodyTooLarge               413 body_too_large
    │   ├── UnsupportedMediaType       415 unsupported_media_type
    │   └── RateLimited                429 rate_limited (Retry-After)
    ├── Unavailable                    503: the gateway will not take the request now (Retry-After)
    │   ├── Overloaded                 503 overloaded (queue full)
    │   ├── QueueTimeout               503 queue_timeout
    │   ├── ShuttingDown               503 shutting_down
    │   └── NoHealthyBackend           503 no_healthy_backend
    └── UpstreamError                  502/504: the backend failed us
        ├── BackendUnavailable         502 backend_unavailable (connect refused, reset, died)
        ├── BadBackendResponse         502 bad_backend_response (malformed output, 5xx)
        ├── FirstTokenTimeout          504 first_token_timeout
        ├── StreamIdleTimeout          504 stream_idle_timeout
        └── RequestTimeout             504 request_timeout

``type`` is stable snake_case, used in the JSON body and as the metric label. A message never
carries a backend address, a traceback or backend text: those go to the log only.
"""

from __future__ import annotations

import math

import orjson

__all__ = [
    "BackendUnavailable",
    "BadBackendResponse",
    "BodyTooLarge",
    "ClientError",
    "FirstTokenTimeout",
    "GatewayError",
    "InvalidJSON",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoHealthyBackend",
    "NotFound",
    "Overloaded",
    "QueueTimeout",
    "RateLimited",
    "RequestTimeout",
    "ShuttingDown",
    "StreamIdleTimeout",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "UpstreamError",
    "json_body",
    "sse_event",
]


class GatewayError(Exception):
    status: int = 500
    type: str = "internal_error"
    default_message: str = "The gateway failed to handle the request."

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.param = param
        self.retry_after = retry_after
        super().__init__(self.message)

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        # Never below one second: a client told to come back at once comes back at once.
        seconds = max(1, math.ceil(self.retry_after))
        return [(b"retry-after", str(seconds).encode())]


class ClientError(GatewayError):
    status = 400
    type = "invalid_request"
    default_message = "The request is invalid."


class InvalidJSON(ClientError):
    type = "invalid_json"
    default_message = "The request body is not valid JSON."


class InvalidRequest(ClientError):
    pass


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    default_message = "A valid API key is required (Authorization: Bearer <key>)."


class NotFound(ClientError):
    status = 404
    type = "not_found"
    default_message = "No such route."


class ModelNotFound(ClientError):
    status = 404
    type = "model_not_found"
    default_message = "The model does not exist."


class MethodNotAllowed(ClientError):
    status = 405
    type = "method_not_allowed"
    default_message = "Method not allowed on this route."


class BodyTooLarge(ClientError):
    status = 413
    type = "body_too_large"
    default_message = "The request body is too large."


class UnsupportedMediaType(ClientError):
    status = 415
    type = "unsupported_media_type"
    default_message = "The request body must be application/json."


class RateLimited(ClientError):
    status = 429
    type = "rate_limited"
    default_message = "Too many requests for this API key; retry later."


class Unavailable(GatewayError):
    status = 503
    type = "unavailable"
    default_message = "The gateway cannot take the request now; retry later."


class Overloaded(Unavailable):
    type = "overloaded"
    default_message = "The gateway is at capacity and its queue is full; retry later."


class QueueTimeout(Unavailable):
    type = "queue_timeout"
    default_message = "No slot became free within the queue wait timeout; retry later."


class ShuttingDown(Unavailable):
    type = "shutting_down"
    default_message = "The gateway is shutting down; retry on another instance or later."


class NoHealthyBackend(Unavailable):
    type = "no_healthy_backend"
    default_message = "No healthy backend can serve the request; retry later."


class UpstreamError(GatewayError):
    status = 502
    type = "backend_error"
    default_message = "The backend failed to answer."


class BackendUnavailable(UpstreamError):
    type = "backend_unavailable"
    default_message = "The backend cannot be reached."


class BadBackendResponse(UpstreamError):
    type = "bad_backend_response"
    default_message = "The backend returned an invalid response."


class FirstTokenTimeout(UpstreamError):
    status = 504
    type = "first_token_timeout"
    default_message = "The backend did not start answering within the first-token timeout."


class StreamIdleTimeout(UpstreamError):
    status = 504
    type = "stream_idle_timeout"
    default_message = "The backend stopped sending within the stream idle timeout."


class RequestTimeout(UpstreamError):
    status = 504
    type = "request_timeout"
    default_message = "The request did not finish within the request timeout."


def _error_object(err: GatewayError, request_id: str | None) -> dict[str, object]:
    obj: dict[str, object] = {
        "message": err.message,
        "type": err.type,
        "param": err.param,
        "code": err.status,
    }
    if request_id:
        obj["request_id"] = request_id
    return obj


def json_body(err: GatewayError, request_id: str | None = None) -> bytes:
    """The OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": _error_object(err, request_id)})


def sse_event(err: GatewayError, request_id: str | None = None) -> bytes:
    """The same error as the final event of a stream that has already started (no [DONE])."""
    return b"data: " + orjson.dumps({"error": _error_object(err, request_id)}) + b"\n\n"
