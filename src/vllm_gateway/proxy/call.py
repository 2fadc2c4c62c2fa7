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
import logging
import time
from typing import Any

import orjson

from vllm_gateway import errors
from vllm_gateway.backends.base import UpstreamRequest, UpstreamResponse
from vllm_gateway.errors import (
    BackendRejected,
    BackendUnavailable,
    BadBackendResponse,
    FirstTokenTimeout,
    GatewayError,
    ModelNotFound,
    NotFound,
    RequestTimeout,
    ShuttingDown,
    StreamIdleTimeout,
    Unavailable,
    UpstreamError,
)
from vllm_gateway.identity import ANONYMOUS
from vllm_gateway.ids import fresh_id
from vllm_gateway.proxy.admission import Permit, Ticket
from vllm_gateway.proxy.failover import Resumable, not_continuable
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.idle import IdleTimeout
from vllm_gateway.proxy.protocols import DONE, ERROR, OK
from vllm_gateway.proxy.responder import ClientGone, Responder
from vllm_gateway.proxy.routes import CHAT, COMPLETIONS, RESPONSES_PATH, Body, Reach, Route, target
from vllm_gateway.proxy.shared_admission import RemotePermit
from vllm_gateway.proxy.sse import EventScanner, FramingError, split_events
from vllm_gateway.proxy.usage import UsageTaker, ask_for_usage, asks_for_usage, parse_usage
from vllm_gateway.proxy.validation import ValidRequest, set_response_id, validate

__all__ = ["ProxyCall"]

log = logging.getLogger("vllm_gateway.proxy.call")

# The kinds of route whose body names a model the catalog can check (not the store or admin).
_CHECKS_MODEL = frozenset({"generate", "pooling", "utility"})
# Content types a non-JSON answer (an audio transcript as text, srt or vtt) may carry.
_TEXT_ANSWERS = ("text/plain", "text/vtt", "application/x-subrip", "text/srt")

# Cap on one SSE event: bounds what a broken backend can make a stream hold.
MAX_EVENT_BYTES = 1 << 20
# How long to wait for a backend's end of body after [DONE], to keep the connection pooled.
_EOF_GRACE = 0.5


def _failover_reason(exc: GatewayError) -> str:
    """Why a member's stream failed, as the failover metrics name it."""
    if isinstance(exc, StreamIdleTimeout):
        return "stream_idle_timeout"
    if isinstance(exc, BackendUnavailable):
        return "ejected" if "taken out" in exc.message else "connection_lost"
    return "backend_error"


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body's JSON object, or None. A 200 is relayed only if it is whole: a truncated or
    garbled body must not look complete."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) else None


def _give_back(place: Permit | Ticket | None) -> None:
    """Give up an admission place before a wait that is not the admission's own."""
    if place is not None:
        place.release()


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ProxyCall:
    """One request through the gateway; also the record that metrics and logs read at its end."""

    __slots__ = (
        "_charged",
        "_ex",
        "_gw",
        "_not_resumable",
        "_param",
        "_protocol",
        "_resumable",
        "_route",
        "_taker",
        "_task",
        "_token_charge",
        "cancel_reason",
        "chunks",
        "ended_at",
        "events",
        "failovers",
        "finished",
        "first_byte_at",
        "members",
        "model",
        "outcome",
        "path",
        "permit",
        "priority",
        "queue_wait",
        "rate_key",
        "request_headers",
        "request_id",
        "requested_tokens",
        "response_started",
        "started_at",
        "status",
        "stream",
        "tenant",
        "upstream",
        "upstream_answered_at",
        "upstream_id",
        "upstream_sent_at",
        "usage",
    )

    def __init__(
        self, gw: Gateway, exchange: Responder, route: Route, param: str | None = None
    ) -> None:
        self._gw = gw
        self._ex = exchange
        self._route = route
        self._param = param  # the path's parameter (a stored response's id), checked by routes
        self._protocol = route.protocol
        self._resumable: Resumable | None = None  # a stream that may go on on another member
        self._not_resumable: str | None = None  # why it may not (for the metrics)
        self._taker: UsageTaker | None = None  # takes out a usage chunk the client did not ask for
        self._token_charge: int | None = None  # tokens charged at admission (None: no token limit)
        self.failovers: list[tuple[str, str]] = []  # (reason, outcome) of each failover
        self.members: list[str] = []  # every member this request used, in order
        self.request_id = exchange.request_id
        # The id vLLM sees: the gateway's own, never a client's (which could collide with
        # another's); the request's own when the gateway made that one.
        self.upstream_id = (
            self.request_id if exchange.header(b"x-request-id") is None else fresh_id()
        )
        self.path: str = route.name
        self.request_headers = exchange.headers
        self._task: asyncio.Task[Any] | None = None
        self._charged = 0  # bytes of a buffered backend body counted in the buffer budget
        self.cancel_reason: str | None = None
        self.permit: Permit | RemotePermit | None = None
        self.upstream: UpstreamResponse | None = None
        self.response_started = False
        self.finished = False
        # From when the request was whole: the wait for its task is the gateway's time too.
        self.started_at = exchange.arrived_at or time.perf_counter()
        self.first_byte_at: float | None = None
        self.queue_wait = 0.0
        self.status = 0
        self.outcome = "unknown"
        self.model: str | None = None
        self.stream = False
        self.chunks = 0  # content events relayed
        self.events = 0  # every event relayed (a Responses error event numbers itself after)
        self.requested_tokens = 0
        self.usage: bytes | dict[str, Any] | None = None  # the usage event(s), or object
        self.upstream_sent_at: float | None = None
        self.upstream_answered_at: float | None = None
        self.ended_at: float | None = None
        identity = exchange.state.get("identity", ANONYMOUS)
        self.tenant: str = identity.tenant
        self.priority: int = identity.priority
        # Rate limits count per tenant; without keys, per client address (a proxy's word for it
        # only when that proxy is trusted).
        address = exchange.state.get("client_address")
        self.rate_key = (
            (f"ip:{address}" if address else "anonymous")
            if identity is ANONYMOUS
            else identity.tenant
        )

    # --- cancellation from outside ---------------------------------------------------------

    def cancel(self, reason: str) -> None:
        if self.finished or self.cancel_reason is not None or self._task is None:
            return
        self.cancel_reason = reason
        self._task.cancel()

    def _client_gone(self) -> None:
        self.cancel("client_gone")

    # --- the request's life ----------------------------------------------------------------

    async def run(self) -> None:
        task = self._task = asyncio.current_task()
        assert task is not None  # always run as a task by the server
        gw = self._gw
        gw.active.add(self)
        ex = self._ex
        # The admission place the front door took when the request was whole (one process).
        place: Permit | Ticket | None = ex.state.pop("place", None)
        ex.on_gone = self._client_gone
        try:
            try:
                await self._proxy(place)
            except asyncio.CancelledError:
                if self.cancel_reason is None:
                    # Not ours (the server is cancelling the task): let it propagate.
                    self.outcome = "cancelled"
                    raise
                if task.uncancel() > 0:
                    raise
                if self.cancel_reason == "shutdown":
                    self._fail(ShuttingDown("The gateway shut down before the request finished."))
                else:
                    self._client_left()
            except ClientGone:
                self._client_left()
            except GatewayError as err:
                self._fail(err)
            except Exception:
                log.exception("request %s failed", self.request_id)
                self._fail(GatewayError())
        finally:
            self.finished = True
            self._ex.on_gone = None
            if self.upstream is not None:
                try:
                    await self.upstream.aclose()
                except Exception:
                    log.exception("closing the upstream response of %s failed", self.request_id)
            if self._charged:
                self._ex.budget.give(self._charged)
                self._charged = 0
            if place is not None:
                place.release()  # a place never turned into the permit (refused, or client gone)
            if self.permit is not None:
                self.permit.release()
            gw.active.discard(self)
            gw.request_ended(self)
            if self._token_charge is not None:
                await self._settle_tokens(self._token_charge)

    async def _settle_tokens(self, charged: int) -> None:
        """Charge the request's real token count against its key's token limit: ``acquire``
        charged the budget (``charged``) up front; this settles the difference."""
        limiter = self._gw.ratelimiter
        used = self._tokens_used(charged)
        if limiter is None or used is None:
            return
        try:
            await limiter.record_tokens(self.rate_key, used - charged)
        except Exception:  # a limiter problem must never fail a finished request
            log.exception("charging tokens for request %s failed", self.request_id)

    def _tokens_used(self, charged: int) -> int | None:
        """What the request used, as far as the gateway can tell (None: the charge stands).

        The usage the backend reported, when it came (a stream's own final usage, asked for when
        the client did not); else the token ids a continuable stream tracked (exact); nothing for
        a request that never reached the backend or that it refused (4xx: nothing ran); else, for
        a stream cut before its usage (client gone, error, timeout), the budget charged up front
        or one token per content event relayed if that is more: the gateway cannot count the
        prompt's tokens, and a stream cut early must not cost less than asking for it."""
        prompt, completion = parse_usage(self.usage)
        if prompt is not None or completion is not None:
            return (prompt or 0) + (completion or 0)
        resumable = self._resumable
        if resumable is not None and resumable.prompt_ids is not None:
            prompt, completion = resumable.counts()
            return prompt + completion
        upstream = self.upstream
        if self.upstream_sent_at is None or (upstream is not None and 400 <= upstream.status < 500):
            return 0
        if self.stream:
            return max(charged, self.chunks)
        return None

    @property
    def admitted(self) -> bool:
        return self.permit is not None

    @property
    def served_by(self) -> str | None:
        upstream = self.upstream
        return upstream.served_by if upstream is not None else None

    def _client_left(self) -> None:
        # A client that stopped reading was dropped by the server's send timeout: say which.
        self.outcome = "client_too_slow" if self._ex.too_slow else "client_disconnected"
        self.status = 499

    def _fail(self, err: GatewayError) -> None:
        self.outcome = err.type
        if isinstance(err, (BadBackendResponse, BackendUnavailable)) or err.status >= 500:
            log.warning(
                "request %s: %s: %s (caused by %r)",
                self.request_id,
                err.type,
                err.message,
                err.__cause__,
            )
        ex = self._ex
        if ex.gone or ex.complete:
            return  # the client is gone too; nothing left to tell it
        if not self.response_started:
            self.status = err.status
            self.response_started = True
            ex.respond(
                err.status,
                [
                    (b"content-type", b"application/json"),
                    (b"x-request-id", self.request_id.encode()),
                    *err.headers(),
                ],
                self._protocol.error_body(err, self.request_id),
            )
        else:
            # The final event of a stream already started, in its protocol's error shape, and no
            # end marker. If the client does not take it, the server's send timeout closes the
            # connection: nothing here waits for it.
            ex.end(self._protocol.error_event(err, self.request_id, self.events))

    async def _proxy(self, place: Permit | Ticket | None) -> None:
        gw = self._gw
        settings = gw.settings
        ex = self._ex
        route = self._route
        if ex.gone:
            raise ClientGone()  # left before its task ran (any place it held is given back)
        valid = validate(route, ex.body, settings.model_aliases)
        self.model = valid.model
        if route.kind == "store" or route.name == RESPONSES_PATH:
            self._own_responses(valid)  # before any wait: a foreign id holds no place
        loop = asyncio.get_running_loop()
        if (
            valid.model is not None
            and route.kind in _CHECKS_MODEL
            and not gw.models.known(valid.model)
        ):
            # The check may wait for the backend's model list: hold no place meanwhile (naming
            # unknown models must not let a client hold permits); admission is asked again after.
            _give_back(place)
            place = None
            if await gw.models.check(valid.model) is False:
                raise ModelNotFound(f"The model '{valid.model}' does not exist.", param="model")
        if gw.ratelimiter is not None and route.kind != "admin":
            self.requested_tokens = valid.requested_tokens
            if gw.ratelimiter.mode == "redis":
                _give_back(place)  # a round trip to Redis: the same
                place = None
            self._token_charge = await gw.ratelimiter.acquire(self.rate_key, valid.requested_tokens)

        if route.admitted:
            permit: Permit | RemotePermit
            if place is None:
                permit = await gw.admission.acquire(tenant=self.tenant, priority=self.priority)
            elif isinstance(place, Ticket):
                permit = await place.wait()
            else:
                permit = place
            self.permit = permit
            self.queue_wait = permit.queue_wait
        deadline = loop.time() + settings.request_timeout
        if valid.stream and route.name in (CHAT, COMPLETIONS) and gw.backend.may_fail_over():
            assert valid.json is not None
            why = not_continuable(valid.json, chat=route.name == CHAT)
            if why is None:
                self._resumable = Resumable(valid.json, chat=route.name == CHAT)
            self._not_resumable = why
        if (
            self._token_charge is not None
            and valid.stream
            and route.name in (CHAT, COMPLETIONS)
            and valid.json is not None
            and not asks_for_usage(valid.json)
        ):
            # The token limit needs the stream's own count: vLLM's usage chunk, asked for here and
            # taken out of what the client sees (usage.py).
            valid.body, valid.json = ask_for_usage(valid.body, valid.json)
            self._taker = UsageTaker()
        request = self._upstream_request(valid)
        # A stored response is replayed as a stream when asked (GET ...?stream=true).
        self.stream = valid.stream or (route.kind == "store" and b"stream=true" in ex.query)
        first_deadline = min(deadline, loop.time() + settings.first_token_timeout)
        body = b""
        try:
            # One timer for the request's wait on the backend: the first token's deadline until
            # the answer's head, the request's own for a body read whole.
            async with IdleTimeout(first_deadline, self._task) as timer:
                self.upstream_sent_at = time.perf_counter()
                upstream = self.upstream = await gw.backend.send(request)
                self.upstream_answered_at = time.perf_counter()
                if upstream.status == 200 and (
                    self.stream
                    # An upload says whether it wants a stream in a form field the gateway does
                    # not parse: its answer tells.
                    or (
                        route.body is Body.MULTIPART
                        and upstream.content_type.startswith("text/event-stream")
                    )
                ):
                    self.stream = True
                else:
                    timer.push(deadline)
                    limit = settings.max_backend_body_bytes if upstream.status == 200 else 1 << 20
                    body = await upstream.read(limit, self._charge)
        except TimeoutError:
            raise (RequestTimeout() if loop.time() >= deadline else FirstTokenTimeout()) from None

        if self.stream:
            await self._relay_stream(upstream, first_deadline, deadline)
        elif upstream.status != 200:
            self._relay_error_status(upstream, body)
        else:
            self.first_byte_at = time.perf_counter()
            self._relay_body(upstream, body)
            if ex.paused:
                await ex.drain()

    def _upstream_request(self, valid: ValidRequest) -> UpstreamRequest:
        ex = self._ex
        route = self._route
        session = ex.header(b"x-session-id")
        path = target(route, self._param)
        content_type = "application/json"
        if route.body is not Body.JSON:
            given = ex.header(b"content-type")
            content_type = given.decode("latin-1") if given else "application/octet-stream"
        locate = valid.previous_response_id
        if route.reach is Reach.HOLDER:
            locate = self._param
        body = valid.body
        if self._resumable is not None:
            body = self._resumable.upstream_body(body)
        return UpstreamRequest(
            ex.method,
            path,
            body,
            valid.json,
            valid.stream,
            self.upstream_id,
            valid.model,
            {"x-session-id": session.decode("latin-1")} if session else {},
            query=ex.query.decode("latin-1") if route.kind in ("store", "admin") else "",
            content_type=content_type,
            locate=locate,
            broadcast=route.reach is Reach.ALL,
        )

    def _own_responses(self, valid: ValidRequest) -> None:
        """Stored Responses are their creator's: a response id another tenant minted, or one
        never minted, is the same 404 and nothing goes upstream (an admin key reads any). A
        create gets the id vLLM will give it: the requester's."""
        ids = self._gw.response_ids
        tenant = self.tenant
        if self._route.kind == "store":
            named, param = self._param, "response_id"
            if self._ex.state.get("admin"):
                return
        else:
            named, param = valid.previous_response_id, "previous_response_id"
        if named is not None and not ids.owns(tenant, named):
            raise NotFound(f"Response with id '{named[:200]}' not found.", param=param)
        if self._route.kind != "store":
            set_response_id(valid, ids.mint(tenant))

    def _charge(self, n: int) -> None:
        """Count ``n`` more bytes of a buffered backend body in the process's buffer budget, or
        refuse (503) when the budget cannot take them."""
        if not self._ex.budget.take(n):
            raise errors.Overloaded(
                "The gateway holds as many buffered answers as its memory budget allows; "
                "retry later.",
                retry_after=1.0,
            )
        self._charged += n

    def _relay_error_status(self, upstream: UpstreamResponse, body: bytes) -> None:
        if 400 <= upstream.status < 500:
            if _json_object(body) is None:
                log.warning(
                    "request %s: backend answered %d without a JSON body: %.300r",
                    self.request_id,
                    upstream.status,
                    body,
                )
                raise BackendRejected(upstream.status)
            # The backend judged the request: its status and body are the client's answer.
            self.outcome = "client_error"
            self._respond(upstream.status, body, "application/json")
            return
        log.warning(
            "request %s: backend answered %d: %.300r", self.request_id, upstream.status, body
        )
        raise BadBackendResponse(f"The backend failed with status {upstream.status}.")

    def _relay_body(self, upstream: UpstreamResponse, body: bytes) -> None:
        content_type = "application/json"
        if not self._route.json_answer and upstream.content_type.startswith(_TEXT_ANSWERS):
            content_type = upstream.content_type  # a transcript as text, srt or vtt
            self.usage = body
        else:
            answer = _json_object(body) if "json" in upstream.content_type else None
            if answer is None:
                raise BadBackendResponse("The backend's answer is not JSON.")
            usage = answer.get("usage")
            self.usage = usage if isinstance(usage, dict) else None
        self.outcome = "completed"
        self._respond(200, body, content_type)

    def _respond(self, status: int, body: bytes, content_type: str) -> None:
        self.status = status
        self.response_started = True
        self._ex.respond(
            status,
            [
                (b"content-type", content_type.encode("latin-1")),
                (b"x-request-id", self.request_id.encode()),
            ],
            body,
        )
        self.ended_at = time.perf_counter()

    async def _relay_stream(
        self, upstream: UpstreamResponse, first_deadline: float, deadline: float
    ) -> None:
        if not upstream.content_type.startswith("text/event-stream"):
            raise BadBackendResponse(
                "The backend answered a stream request without an event stream."
            )
        resumable = self._resumable
        first = True
        chunks: Any = None
        while True:
            try:
                chunks = await self._relay_part(upstream, first_deadline, deadline, first)
                break
            except (BackendUnavailable, BadBackendResponse, StreamIdleTimeout) as exc:
                if not self.response_started:
                    raise
                if resumable is None:
                    if self._not_resumable is not None:
                        self.failovers.append(
                            (_failover_reason(exc), f"not_continued:{self._not_resumable}")
                        )
                    raise
                following = await self._fail_over(resumable, exc, deadline)
                if following is None:
                    break  # the generation had ended; its stream was ended here
                upstream = following
                first = False
        self.ended_at = time.perf_counter()
        self.outcome = "completed"
        if chunks is not None:
            await self._finish_upstream(chunks)

    async def _relay_part(
        self, upstream: UpstreamResponse, first_deadline: float, deadline: float, first: bool
    ) -> Any:
        """Relay one part of a stream (the first, or a continuation) to its end marker; the
        part's remaining chunks (to read its end of body). Raises on a failure of the part."""
        loop = asyncio.get_running_loop()
        idle = self._gw.settings.stream_idle_timeout
        ex = self._ex
        classify = self._protocol.classify
        resumable = self._resumable
        # The usage chunk the gateway asked for, to take out again (None: nothing to take).
        taker = self._taker
        shaped = resumable is not None or taker is not None  # blocks are rebuilt from events
        scanner = EventScanner(MAX_EVENT_BYTES)
        chunks = upstream.chunks()
        done = False
        previous = b""
        start = first_deadline if first else min(deadline, loop.time() + idle)
        try:
            async with IdleTimeout(start, self._task) as timer:
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
                    events = split_events(block)
                    if resumable is not None:
                        # Note what the stream produced; a continuation's events become the
                        # original stream's.
                        events = self._follow(resumable, events, first)
                    for i, event in enumerate(events):
                        kind = classify(event)
                        if kind == OK:
                            self.chunks += 1
                            continue
                        if kind == DONE:
                            done = True
                            del events[i + 1 :]  # nothing of a stream follows its end
                            break
                        if kind == ERROR:
                            log.warning(
                                "request %s: bad backend event: %.300r", self.request_id, event
                            )
                            if i:  # the whole events before it still reach the client
                                self._send_part(events[:i], taker)
                            raise BadBackendResponse("The backend reported an error mid-stream.")
                    if shaped or done:
                        if taker is not None and taker.concerns(block, events, done):
                            events = self._take_usage(taker, events, done)
                            block = b"".join(e + b"\n\n" for e in events)
                        elif resumable is not None or done:
                            block = b"".join(e + b"\n\n" for e in events)
                    if not block:
                        timer.push(min(deadline, loop.time() + idle))
                        continue
                    self.events += len(events)
                    if not self.response_started:
                        self._start_stream()
                    if done:
                        ex.end(block)
                        if taker is None:
                            # The usage chunk, when asked for, is the last event before [DONE].
                            self.usage = previous + block
                    else:
                        ex.write(block)
                        if ex.paused:
                            # The client is behind: wait for it (bounded by the server's send
                            # timeout) rather than read more from the backend. That wait is
                            # the client's, not the backend's idle time.
                            timer.reschedule(deadline)
                            await ex.drain()
                    previous = block
                    timer.push(min(deadline, loop.time() + idle))
        except TimeoutError:
            if taker is not None:
                self._send_part([], taker)
            if loop.time() >= deadline:
                raise RequestTimeout() from None
            raise (StreamIdleTimeout() if self.response_started else FirstTokenTimeout()) from None
        except BaseException:
            if taker is not None:
                self._send_part([], taker)  # what it held reaches the client before the error
            raise
        if not done:
            if taker is not None:
                self._send_part([], taker)
            raise BadBackendResponse(
                f"The backend ended the stream without {self._protocol.end_marker}."
            )
        return chunks

    def _take_usage(self, taker: UsageTaker, events: list[bytes], done: bool) -> list[bytes]:
        """The events the client gets of those read, the usage chunk taken out (``usage.py``)."""
        had = taker.usage
        events = taker.take(events, done)
        if had is None and taker.usage is not None:
            self.usage = taker.usage
            self.chunks -= 1  # counted as a content event, never relayed
        return events

    def _send_part(self, events: list[bytes], taker: UsageTaker | None) -> None:
        """Whole events, before a failure: the client gets every one (and, taking a usage chunk
        out, every event held until it came)."""
        if taker is not None:
            events = self._take_usage(taker, events, False) + taker.release()
        if events and not self._ex.gone:
            self._send_events(b"".join(e + b"\n\n" for e in events))
            self.events += len(events)

    def _follow(self, resumable: Resumable, events: list[bytes], first: bool) -> list[bytes]:
        """The events as the client sees them: the first part's noted (and its ids taken out
        unless asked for); a continuation's rewritten into the original stream, its end replaced
        by the stream's own (the usage of every part, then [DONE])."""
        out = []
        for event in events:
            if first:
                if not event.startswith(b"data: {"):
                    out.append(event)
                    continue
                known = resumable.prompt_ids is not None
                out.append(resumable.observe(event))
                if not known and resumable.prompt_ids is not None:
                    self._gw.backend.note_prompt_ids(self.upstream_id, resumable.prompt_ids)
                continue
            if event.startswith(b"data: [DONE]"):
                out.append(resumable.closing().rstrip(b"\n"))  # split_events form
                continue
            rewritten = resumable.rewrite(event)
            if rewritten is not None:
                out.append(rewritten.rstrip(b"\n"))
        # ``closing`` may hold two events (usage, [DONE]): split them again.
        return [e for joined in out for e in joined.split(b"\n\n") if e]

    async def _fail_over(
        self, resumable: Resumable, exc: GatewayError, deadline: float
    ) -> UpstreamResponse | None:
        """Go on with the generation on another member (its response), end the stream here when
        the generation had already ended (None), or re-raise ``exc`` saying why not."""
        gw = self._gw
        loop = asyncio.get_running_loop()
        reason = _failover_reason(exc)
        failed = self.served_by
        if failed is not None and failed not in self.members:
            self.members.append(failed)
        why = resumable.why_not()
        if why is None and resumable.finish_reason is None:
            if loop.time() >= deadline:
                why = "deadline"
            else:
                why = gw.backend.can_fail_over(
                    self.model, frozenset(self.members), len(self.failovers)
                )
        if why is not None:
            self.failovers.append((reason, f"not_continued:{why}"))
            raise exc
        if self.upstream is not None:
            await self.upstream.aclose()
            self.upstream = None
        if resumable.finish_reason is not None:
            # The last token came and the backend died before its end of stream: end it here.
            self.failovers.append((reason, "completed_here"))
            self._ex.end(resumable.closing())
            self.events += 1
            return None
        raw, body = resumable.continuation()
        request = UpstreamRequest(
            "POST",
            COMPLETIONS,
            raw,
            body,
            True,
            self.upstream_id,
            self.model,
            avoid=frozenset(self.members),
        )
        log.warning(
            "request %s: %s on %s; continuing on another member (part %d)",
            self.request_id,
            reason,
            failed,
            resumable.parts,
        )
        try:
            async with asyncio.timeout_at(
                min(deadline, loop.time() + gw.settings.first_token_timeout)
            ):
                upstream = await gw.backend.send(request)
        except (TimeoutError, UpstreamError, Unavailable) as err:
            self.failovers.append((reason, "failed"))
            raise exc from err
        self.upstream = upstream
        if upstream.status != 200 or not upstream.content_type.startswith("text/event-stream"):
            self.failovers.append((reason, "failed"))
            raise exc
        self.failovers.append((reason, "resumed"))
        if upstream.served_by is not None and upstream.served_by not in self.members:
            self.members.append(upstream.served_by)
        return upstream

    def _start_stream(self) -> None:
        self.first_byte_at = time.perf_counter()
        self.response_started = True
        self.status = 200
        self._ex.start(200, [*_SSE_HEADERS, (b"x-request-id", self.request_id.encode())])

    def _send_events(self, data: bytes) -> None:
        """Whole events, before a failure in the same read: the client gets every one."""
        if not self.response_started:
            self._start_stream()
        self._ex.write(data)

    async def _finish_upstream(self, chunks: Any) -> None:
        """After [DONE], read the backend's end of body so its connection can be reused."""
        try:
            async with asyncio.timeout(_EOF_GRACE):
                async for _ in chunks:
                    pass
        except (TimeoutError, GatewayError):
            pass  # aclose() drops the connection instead
