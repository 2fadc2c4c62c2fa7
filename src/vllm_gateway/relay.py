"""The life of one proxied request: body, validation, admission, upstream call, relay, cleanup.

``ProxyCall.run`` is the only owner of everything it opens. Whatever path the request takes
(success, backend error, timeout, client gone, drain), its ``finally`` releases the permit
exactly once, closes the upstream response (which aborts the work behind it if it had not
ended) and cancels the disconnect watcher.

Two cancellation sources reach the call from outside: the disconnect watcher (``client_gone``)
and the drain deadline (``shutdown``). Both cancel the call's task after recording why; ``run``
absorbs that cancellation (``Task.uncancel``) and finishes the response the right way. Any other
cancellation propagates untouched.

Before the first byte, every error is a JSON response with its status. After it, the response
has started and cannot change: an error becomes a final SSE ``error`` event and the stream ends
without ``[DONE]``. A response is never started until the backend's first complete event is in
hand, so a first-token timeout is still a 504.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

import orjson

from . import errors
from .auth import ANONYMOUS
from .backend import UpstreamRequest, UpstreamResponse
from .errors import (
    BackendUnavailable,
    BadBackendResponse,
    BodyTooLarge,
    FirstTokenTimeout,
    GatewayError,
    ModelNotFound,
    RequestTimeout,
    ShuttingDown,
    StreamIdleTimeout,
    UnsupportedMediaType,
)
from .sse import DONE, ERROR, EventScanner, FramingError, classify, split_events
from .validation import validate_body

if TYPE_CHECKING:
    from .admission import Permit
    from .gateway import Gateway

__all__ = ["ClientGone", "ProxyCall", "new_request_id", "read_body", "send_error"]

log = logging.getLogger("vllm_gateway.relay")

Send = Any
Receive = Any

# Cap on a non-streamed backend body, and on one SSE event: bounds what a broken backend can make
# the gateway hold.
MAX_BACKEND_BODY = 64 << 20
MAX_EVENT_BYTES = 4 << 20
# How long to wait for a backend's end of body after [DONE], to keep the connection pooled.
_EOF_GRACE = 0.5

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def _is_json_object(body: bytes) -> bool:
    """A 200 is relayed only if it is whole: a truncated or garbled body must not look complete."""
    try:
        return isinstance(orjson.loads(body), dict)
    except orjson.JSONDecodeError:
        return False


class ClientGone(Exception):
    """The client disconnected before its request was read."""


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


# Fresh request ids: 8 random bytes per process, then a counter. Unique across processes and
# replicas (vLLM uses the id forwarded to it as its own request id), 24 hex digits like the ids of
# before, and no system call per request as os.urandom would make.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _reseed_ids() -> None:
    """A forked worker must not repeat its parent's ids."""
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = os.urandom(8).hex()
    _id_counter = itertools.count(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_ids)


def new_request_id(scope: dict[str, Any]) -> str:
    """The client's X-Request-ID if it is sane, else a fresh one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.match(text):
                return text
            break
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def send_error(
    send: Send, err: GatewayError, request_id: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = errors.json_body(err, request_id)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *err.headers(),
        *(extra or ()),
    ]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(scope: dict[str, Any], receive: Receive, limit: int) -> bytes:
    """The whole request body; 415 for a non-JSON type, 413 as soon as it exceeds ``limit``."""
    ctype = header(scope, b"content-type")
    if ctype is not None and b"json" not in ctype.lower():
        raise UnsupportedMediaType(
            "The request body must be JSON: send 'Content-Type: application/json'."
        )
    length = header(scope, b"content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise BodyTooLarge(f"The request body exceeds {limit} bytes.")
        except ValueError:
            raise errors.InvalidRequest("Invalid Content-Length header.") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        data = message.get("body", b"")
        if data:
            size += len(data)
            if size > limit:
                raise BodyTooLarge(f"The request body exceeds {limit} bytes.")
            chunks.append(data)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ProxyCall:
    """One request through the gateway; also the record that metrics and logs read at its end."""

    __slots__ = (
        "_gw",
        "_receive",
        "_send",
        "_task",
        "_watcher",
        "cancel_reason",
        "chunks",
        "ended_at",
        "finished",
        "first_byte_at",
        "model",
        "outcome",
        "path",
        "permit",
        "priority",
        "queue_wait",
        "rate_key",
        "request_id",
        "requested_tokens",
        "response_started",
        "scope",
        "started_at",
        "status",
        "stream",
        "tenant",
        "upstream",
        "upstream_answered_at",
        "upstream_sent_at",
        "usage",
    )

    def __init__(
        self, gw: Gateway, scope: dict[str, Any], receive: Receive, send: Send, request_id: str
    ) -> None:
        self._gw = gw
        self.scope = scope
        self._receive = receive
        self._send = send
        self.request_id = request_id
        self.path: str = scope["path"]
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        self.permit: Permit | None = None
        self.upstream: UpstreamResponse | None = None
        self.response_started = False
        self.finished = False
        self.started_at = time.perf_counter()
        self.first_byte_at: float | None = None
        self.queue_wait = 0.0
        self.status = 0
        self.outcome = "unknown"
        self.model: str | None = None
        self.stream = False
        self.chunks = 0
        self.requested_tokens = 0
        self.usage: bytes | None = None
        self.upstream_sent_at: float | None = None
        self.upstream_answered_at: float | None = None
        self.ended_at: float | None = None
        identity = scope.get("state", {}).get("identity", ANONYMOUS)
        self.tenant: str = identity.tenant
        self.priority: int = identity.priority
        # Rate limits count per tenant; without keys, per client address.
        client = scope.get("client")
        self.rate_key = (
            (f"ip:{client[0]}" if client else "anonymous")
            if identity is ANONYMOUS
            else identity.tenant
        )

    # --- cancellation from outside ---------------------------------------------------------

    def cancel(self, reason: str) -> None:
        if self.finished or self.cancel_reason is not None or self._task is None:
            return
        if reason == "client_gone" and self.ended_at is not None:
            # uvicorn answers receive() with http.disconnect as soon as a response is complete:
            # the client got everything, it did not leave.
            return
        self.cancel_reason = reason
        self._task.cancel()

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.cancel("client_gone")
                return

    # --- the request's life ----------------------------------------------------------------

    async def run(self) -> None:
        task = self._task = asyncio.current_task()
        assert task is not None  # always run as a task by the server
        gw = self._gw
        gw.active.add(self)
        try:
            try:
                await self._proxy()
            except asyncio.CancelledError:
                if self.cancel_reason is None:
                    # Not ours (the server is cancelling the task): let it propagate.
                    self.outcome = "cancelled"
                    raise
                if task.uncancel() > 0:
                    raise
                if self.cancel_reason == "shutdown":
                    await self._fail(
                        ShuttingDown("The gateway shut down before the request finished.")
                    )
                else:
                    self.outcome = "client_disconnected"
                    self.status = 499
            except ClientGone:
                self.outcome = "client_disconnected"
                self.status = 499
            except GatewayError as err:
                await self._fail(err)
            except Exception:
                log.exception("request %s failed", self.request_id)
                await self._fail(GatewayError())
        finally:
            self.finished = True
            if self._watcher is not None:
                self._watcher.cancel()
            if self.upstream is not None:
                try:
                    await self.upstream.aclose()
                except Exception:
                    log.exception("closing the upstream response of %s failed", self.request_id)
            if self.permit is not None:
                self.permit.release()
            gw.active.discard(self)
            gw.request_ended(self)
            if gw.ratelimiter is not None and self.usage is not None:
                await gw.charge_tokens(self)

    async def _fail(self, err: GatewayError) -> None:
        self.outcome = err.type
        if isinstance(err, (BadBackendResponse, BackendUnavailable)) or err.status >= 500:
            log.warning(
                "request %s: %s: %s (caused by %r)",
                self.request_id,
                err.type,
                err.message,
                err.__cause__,
            )
        try:
            if not self.response_started:
                self.status = err.status
                self.response_started = True
                await send_error(self._send, err, self.request_id)
            else:
                await self._send(
                    {
                        "type": "http.response.body",
                        "body": errors.sse_event(err, self.request_id),
                        "more_body": False,
                    }
                )
        except OSError:
            pass  # the client is gone too; nothing left to tell it

    async def _proxy(self) -> None:
        gw = self._gw
        settings = gw.settings
        body = await read_body(self.scope, self._receive, settings.max_body_bytes)
        valid = validate_body(self.path, body, settings.model_aliases)
        self.model = valid.model
        self.stream = valid.stream
        loop = asyncio.get_running_loop()
        self._watcher = loop.create_task(self._watch_disconnect())
        if (
            valid.model is not None
            and not gw.model_known(valid.model)
            and not await gw.model_exists(valid.model)
        ):
            raise ModelNotFound(f"The model '{valid.model}' does not exist.", param="model")
        if gw.ratelimiter is not None:
            self.requested_tokens = valid.requested_tokens
            await gw.ratelimiter.acquire(self.rate_key, valid.requested_tokens)

        self.permit = await gw.admission.acquire(tenant=self.tenant, priority=self.priority)
        self.queue_wait = self.permit.queue_wait
        deadline = loop.time() + settings.request_timeout
        session = header(self.scope, b"x-session-id")
        request = UpstreamRequest(
            "POST",
            self.path,
            valid.body,
            valid.json,
            valid.stream,
            self.request_id,
            valid.model,
            {"x-session-id": session.decode("latin-1")} if session else {},
        )
        first_deadline = min(deadline, loop.time() + settings.first_token_timeout)
        try:
            async with asyncio.timeout_at(first_deadline):
                self.upstream_sent_at = time.perf_counter()
                self.upstream = await gw.backend.send(request)
                self.upstream_answered_at = time.perf_counter()
        except TimeoutError:
            raise (RequestTimeout() if loop.time() >= deadline else FirstTokenTimeout()) from None

        upstream = self.upstream
        if upstream.status != 200:
            await self._relay_error_status(upstream, deadline)
        elif valid.stream:
            await self._relay_stream(upstream, first_deadline, deadline)
        else:
            await self._relay_body(upstream, first_deadline, deadline)

    async def _relay_error_status(self, upstream: UpstreamResponse, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                body = await upstream.read(1 << 20)
        except TimeoutError:
            raise RequestTimeout() from None
        if 400 <= upstream.status < 500:
            # The backend judged the request: its status and body are the client's answer.
            self.outcome = "client_error"
            await self._respond(upstream.status, body, upstream.content_type or "application/json")
            return
        log.warning(
            "request %s: backend answered %d: %.300r", self.request_id, upstream.status, body
        )
        raise BadBackendResponse(f"The backend failed with status {upstream.status}.")

    async def _relay_body(
        self, upstream: UpstreamResponse, first_deadline: float, deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                body = await upstream.read(MAX_BACKEND_BODY)
        except TimeoutError:
            raise (RequestTimeout() if loop.time() >= deadline else FirstTokenTimeout()) from None
        self.first_byte_at = time.perf_counter()
        if "json" not in upstream.content_type or not _is_json_object(body):
            raise BadBackendResponse("The backend's answer is not JSON.")
        self.outcome = "completed"
        self.usage = body
        await self._respond(200, body, "application/json")

    async def _respond(self, status: int, body: bytes, content_type: str) -> None:
        self.status = status
        self.response_started = True
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", self.request_id.encode()),
                ],
            }
        )
        await self._send({"type": "http.response.body", "body": body})
        self.ended_at = time.perf_counter()

    async def _relay_stream(
        self, upstream: UpstreamResponse, first_deadline: float, deadline: float
    ) -> None:
        if not upstream.content_type.startswith("text/event-stream"):
            raise BadBackendResponse(
                "The backend answered a stream request without an event stream."
            )
        loop = asyncio.get_running_loop()
        idle = self._gw.settings.stream_idle_timeout
        send = self._send
        scanner = EventScanner(MAX_EVENT_BYTES)
        chunks = upstream.chunks()
        done = False
        previous = b""
        try:
            async with asyncio.timeout_at(first_deadline) as timer:
                while not done:
                    try:
                        data = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    try:
                        block = scanner.feed(data)
                    except FramingError as exc:
                        raise BadBackendResponse("The backend sent an oversized event.") from exc
                    if not block:
                        continue
                    for event in split_events(block):
                        kind = classify(event)
                        if kind == DONE:
                            done = True
                        elif kind == ERROR:
                            log.warning(
                                "request %s: bad backend event: %.300r", self.request_id, event
                            )
                            raise BadBackendResponse("The backend reported an error mid-stream.")
                        else:
                            self.chunks += 1
                    if not self.response_started:
                        self.first_byte_at = time.perf_counter()
                        self.response_started = True
                        self.status = 200
                        await send(
                            {
                                "type": "http.response.start",
                                "status": 200,
                                "headers": [
                                    *_SSE_HEADERS,
                                    (b"x-request-id", self.request_id.encode()),
                                ],
                            }
                        )
                    await send({"type": "http.response.body", "body": block, "more_body": not done})
                    if done:
                        # The usage chunk, when asked for, is the last event before [DONE].
                        self.usage = previous + block
                    previous = block
                    timer.reschedule(min(deadline, loop.time() + idle))
        except TimeoutError:
            if loop.time() >= deadline:
                raise RequestTimeout() from None
            raise (StreamIdleTimeout() if self.response_started else FirstTokenTimeout()) from None
        self.ended_at = time.perf_counter()
        if not done:
            raise BadBackendResponse("The backend ended the stream without [DONE].")
        self.outcome = "completed"
        await self._finish_upstream(chunks)

    async def _finish_upstream(self, chunks: Any) -> None:
        """After [DONE], read the backend's end of body so its connection can be reused."""
        try:
            async with asyncio.timeout(_EOF_GRACE):
                async for _ in chunks:
                    pass
        except (TimeoutError, GatewayError):
            pass  # aclose() drops the connection instead
