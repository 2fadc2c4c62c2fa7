"""Every error the gateway answers with, and the one place they are rendered.

The tree::

    GatewayError                       (500 internal_error)
    ├── ClientError                    4xx: the request itself is at fault
    │   ├── InvalidJSON                400 invalid_json
    │   ├── InvalidRequest             400 invalid_request (names the field in ``param``)
    │   ├── MalformedRequest           400 malformed_request (not HTTP/1.1 the server can parse)
    │   ├── Unauthorized               401 authentication_error
    │   ├── Forbidden                  403 forbidden (an admin route without the admin key)
    │   ├── NotFound                   404 not_found
    │   ├── ModelNotFound              404 model_not_found
    │   ├── MethodNotAllowed           405 method_not_allowed
    │   ├── ClientTimeout              408 client_timeout (headers or body too slow to arrive)
    │   ├── BodyTooLarge               413 body_too_large
    │   ├── UriTooLong                 414 uri_too_long
    │   ├── UnsupportedMediaType       415 unsupported_media_type
    │   ├── ExpectationFailed          417 expectation_failed (an Expect other than 100-continue)
    │   ├── IdempotencyKeyReused       422 idempotency_key_reused (the key came with another body)
    │   ├── RateLimited                429 rate_limited (Retry-After)
    │   ├── HeadersTooLarge            431 headers_too_large (head or trailers past their bounds)
    │   ├── UnsupportedTransferCoding  501 unsupported_transfer_coding (a coding besides chunked)
    │   ├── VersionNotSupported        505 version_not_supported (neither HTTP/1.1 nor HTTP/1.0)
    │   └── BackendRejected            4xx backend_rejected (the backend's 4xx had no JSON body)
    ├── Unavailable                    503: the gateway will not take the request now (Retry-After)
    │   ├── Overloaded                 503 overloaded (queue full, or the body memory budget)
    │   ├── TooManyConnections         503 too_many_connections
    │   ├── QueueTimeout               503 queue_timeout
    │   ├── DeadlineUnmeetable         503 deadline_unmeetable (its predicted wait passes its deadline)
    │   ├── DeadlineExceeded           503 deadline_exceeded (its deadline passed while it waited)
    │   ├── Shed                       503 shed (a higher class took its place in a full queue)
    │   ├── ShuttingDown               503 shutting_down
    │   └── NoHealthyBackend           503 no_healthy_backend
    ├── ResultLost                     410 result_lost (a kept generation can no longer be read)
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
    "BackendRejected",
    "BackendUnavailable",
    "BadBackendResponse",
    "BodyTooLarge",
    "ClientError",
    "ClientTimeout",
    "DeadlineExceeded",
    "DeadlineUnmeetable",
    "ExpectationFailed",
    "FirstTokenTimeout",
    "Forbidden",
    "GatewayError",
    "HeadersTooLarge",
    "IdempotencyKeyReused",
    "InvalidJSON",
    "InvalidRequest",
    "MalformedRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoHealthyBackend",
    "NotFound",
    "Overloaded",
    "QueueTimeout",
    "RateLimited",
    "RequestTimeout",
    "ResultLost",
    "Shed",
    "ShuttingDown",
    "StreamIdleTimeout",
    "TooManyConnections",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "UnsupportedTransferCoding",
    "UpstreamError",
    "UriTooLong",
    "VersionNotSupported",
    "error_object",
    "json_body",
    "sse_event",
]


class GatewayError(Exception):
    status: int = 500
    type: str = "internal_error"
    default_message: str = "The gateway failed to handle the request."
    default_retry_after: float | None = None

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.param = param
        self.retry_after = retry_after if retry_after is not None else self.default_retry_after
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


class MalformedRequest(ClientError):
    type = "malformed_request"
    default_message = "The request is not valid HTTP/1.1."


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    default_message = "A valid API key is required (Authorization: Bearer <key>)."

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"www-authenticate", b"Bearer")]


class NotFound(ClientError):
    status = 404
    type = "not_found"
    default_message = "No such route."


class Forbidden(ClientError):
    status = 403
    type = "forbidden"
    default_message = "This route needs the gateway's admin key."


class ModelNotFound(ClientError):
    status = 404
    type = "model_not_found"
    default_message = "The model does not exist."


class MethodNotAllowed(ClientError):
    status = 405
    type = "method_not_allowed"
    default_message = "Method not allowed on this route."

    def __init__(self, message: str | None = None, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> list[tuple[bytes, bytes]]:
        extra = [(b"allow", self.allow.encode("latin-1"))] if self.allow else []
        return [*super().headers(), *extra]


class ClientTimeout(ClientError):
    status = 408
    type = "client_timeout"
    default_message = "The request did not arrive in time."


class BodyTooLarge(ClientError):
    status = 413
    type = "body_too_large"
    default_message = "The request body is too large."


class UriTooLong(ClientError):
    status = 414
    type = "uri_too_long"
    default_message = "The request target is too long."


class ExpectationFailed(ClientError):
    status = 417
    type = "expectation_failed"
    default_message = "The only expectation the gateway meets is '100-continue'."


class UnsupportedTransferCoding(ClientError):
    # 501 by RFC 9112 6.1: a transfer coding the server does not understand.
    status = 501
    type = "unsupported_transfer_coding"
    default_message = "The only transfer coding the gateway accepts is 'chunked'."


class VersionNotSupported(ClientError):
    status = 505
    type = "version_not_supported"
    default_message = "The gateway speaks HTTP/1.1 and HTTP/1.0."


class UnsupportedMediaType(ClientError):
    status = 415
    type = "unsupported_media_type"
    default_message = "The request body must be application/json."


class IdempotencyKeyReused(ClientError):
    status = 422
    type = "idempotency_key_reused"
    default_message = "The Idempotency-Key was used with another request."


class RateLimited(ClientError):
    status = 429
    type = "rate_limited"
    default_message = "Too many requests for this API key; retry later."


class HeadersTooLarge(ClientError):
    status = 431
    type = "headers_too_large"
    default_message = "The request line and headers are too large."


class BackendRejected(ClientError):
    """The backend refused the request with a 4xx whose body is not the JSON error it should be
    (an HTML page, a traceback): its status reaches the client, its text only the log."""

    type = "backend_rejected"
    default_message = "The backend refused the request."

    def __init__(self, status: int) -> None:
        super().__init__(f"The backend refused the request (status {status}).")
        self.status = status


class Unavailable(GatewayError):
    status = 503
    type = "unavailable"
    default_message = "The gateway cannot take the request now; retry later."


class Overloaded(Unavailable):
    type = "overloaded"
    default_message = "The gateway is at capacity and its queue is full; retry later."


class TooManyConnections(Unavailable):
    type = "too_many_connections"
    default_message = "The gateway has as many client connections open as it allows; retry later."
    default_retry_after = 1.0


class QueueTimeout(Unavailable):
    type = "queue_timeout"
    default_message = "No slot became free within the queue wait timeout; retry later."


class DeadlineUnmeetable(Unavailable):
    type = "deadline_unmeetable"
    default_message = (
        "The request's predicted wait for a slot is longer than its deadline "
        "(X-Request-Deadline-Ms); retry later."
    )


class DeadlineExceeded(Unavailable):
    type = "deadline_exceeded"
    default_message = (
        "The request's deadline (X-Request-Deadline-Ms) passed while it waited for a slot; "
        "retry later."
    )


class Shed(Unavailable):
    type = "shed"
    default_message = (
        "The queue is full and a request of a higher priority class took this one's place; "
        "retry later."
    )


class ShuttingDown(Unavailable):
    type = "shutting_down"
    default_message = "The gateway is shutting down; retry on another instance or later."


class NoHealthyBackend(Unavailable):
    type = "no_healthy_backend"
    default_message = "No healthy backend can serve the request; retry later."


class ResultLost(GatewayError):
    status = 410
    type = "result_lost"
    default_message = "The generation under this Idempotency-Key can no longer be read."


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


def error_object(err: GatewayError, request_id: str | None = None) -> dict[str, object]:
    """The ``error`` object of the OpenAI-shaped body."""
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
    return orjson.dumps({"error": error_object(err, request_id)})


def sse_event(err: GatewayError, request_id: str | None = None) -> bytes:
    """The same error as the final event of a stream that has already started (no [DONE])."""
    return b"data: " + orjson.dumps({"error": error_object(err, request_id)}) + b"\n\n"
