"""The life of one proxied request: validation, admission, the upstream call, cleanup.

``ProxyCall`` is one object per request in layers: ``Record`` (record.py, what the observers
read), ``Relay`` (relay.py, relaying a stream or a body), ``Continuing`` (continuation.py, going on
on another member) and this module's, the request's life from its task's start to its end.

``ProxyCall.run`` is the only owner of everything the request opens. Whatever path the request
takes (success, backend error, timeout, client gone, drain), its ``finally`` releases the
admission place exactly once, closes the upstream response (which aborts the work behind it if it
had not ended), gives back the buffered bytes it counted, and tells the observers. The place is
held in one slot (``_place``) from the call's making to that release; a wait that is not the
admission's own steps it aside first (``Place.step_aside``: what it held is given back then, and
the place left in the slot takes its turn again when waited on).

Two cancellation sources reach the call from outside: the client leaving (``client_gone``) and
the drain deadline (``shutdown``). Both cancel the call's task after recording why; ``run``
absorbs that cancellation (``Task.uncancel``) and finishes the response the right way. Any other
cancellation propagates untouched.

Before the first byte, every error is a JSON response with its status. After it, the response
has started and cannot change: an error becomes a final SSE ``error`` event and the stream ends
without ``[DONE]``. A stream that asked for queue updates (``X-Queue-Updates: 1``) and has to
queue gets its head at once and a comment line per interval while it waits (``_await_turn``);
from that head on, every error is such a final event.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import orjson

from vllm_gateway.backends.base import UpstreamRequest
from vllm_gateway.errors import (
    BackendUnavailable,
    BadBackendResponse,
    DeadlineExceeded,
    FirstTokenTimeout,
    GatewayError,
    ModelNotFound,
    NotFound,
    RateLimited,
    RequestTimeout,
    ShuttingDown,
)
from vllm_gateway.identity import ANONYMOUS
from vllm_gateway.ids import fresh_id
from vllm_gateway.proxy.admission import RETRY_AFTER_MAX, RETRY_AFTER_MIN, Admission, Place
from vllm_gateway.proxy.continuation import Continuing
from vllm_gateway.proxy.failover import Resumable, not_continuable
from vllm_gateway.proxy.failover_messages import MessagesResumable, messages_not_continuable
from vllm_gateway.proxy.failover_responses import ResponsesResumable, responses_not_continuable
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.idle import IdleTimeout
from vllm_gateway.proxy.relay import SSE_HEADERS, overhead_header
from vllm_gateway.proxy.responder import ClientGone, Responder
from vllm_gateway.proxy.routes import (
    CHAT,
    COMPLETIONS,
    MESSAGES,
    RESPONSES_PATH,
    Body,
    Reach,
    Route,
    target,
)
from vllm_gateway.proxy.usage import UsageTaker, ask_for_usage, asks_for_usage, parse_usage
from vllm_gateway.proxy.validation import ValidRequest, set_response_id, validate

__all__ = ["ProxyCall"]

log = logging.getLogger("vllm_gateway.proxy.call")

# The kinds of route whose body names a model the catalog can check (not the store or admin).
_CHECKS_MODEL = frozenset({"generate", "pooling", "utility"})
# The routes whose body vLLM reads a request ``priority`` from (Anthropic's Messages has none).
_TAKES_PRIORITY = frozenset({CHAT, COMPLETIONS, RESPONSES_PATH})


class ProxyCall(Continuing):
    """One request through the gateway; also the record that metrics and logs read at its end."""

    __slots__ = (
        "_early_head",
        "_param",
        "_place",
        "_token_charge",
        "cancel_reason",
        "finished",
        "priority",
        "rate_key",
        "requested_tokens",
        "tenant",
    )

    def __init__(
        self, gw: Gateway, exchange: Responder, route: Route, param: str | None = None
    ) -> None:
        # The id vLLM sees: the gateway's own, never a client's (which could collide with
        # another's); the request's own when the gateway made that one.
        request_id = exchange.request_id
        upstream_id = request_id if exchange.header(b"x-request-id") is None else fresh_id()
        # From when the request was whole: the wait for its task is the gateway's time too.
        Continuing.__init__(
            self, gw, exchange, route, upstream_id, exchange.arrived_at or time.perf_counter()
        )
        self._param = param  # the path's parameter (a stored response's id), checked by routes
        self._token_charge: int | None = None  # tokens charged at admission (None: no token limit)
        self._early_head = False  # the stream's head went out while it queued (queue updates)
        self.request_headers = exchange.headers
        self.cancel_reason: str | None = None
        self.finished = False
        self.requested_tokens = 0
        ctx = exchange.context
        # The admission place the front door took when the request was whole (None: a route
        # that takes none). The call holds it in this one slot from here to its end, and
        # releases it once, in ``run``'s cleanup.
        self._place: Place | None = ctx.place
        ctx.place = None
        identity = ctx.identity or ANONYMOUS
        self.tenant: str = identity.tenant
        self.priority: int = identity.priority
        # Rate limits count per tenant; without keys, per client address (a proxy's word for it
        # only when that proxy is trusted).
        address = ctx.client_address
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
        ex.on_gone = self._client_gone
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
            if self._place is not None:
                self._place.release()  # the one release: queued, granted, or taken back
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
        if not self.response_started and not self._early_head:
            self.status = err.status
            self.response_started = True
            overhead = self.overhead
            if overhead is None:
                # Answered before any upstream send: the whole time is the gateway's, less a
                # wait for a slot.
                overhead = time.perf_counter() - self.started_at - self.queue_wait
                self.overhead = overhead = max(0.0, overhead)
            ex.respond(
                err.status,
                [
                    (b"content-type", b"application/json"),
                    (b"x-request-id", self.request_id.encode()),
                    overhead_header(overhead),
                    *err.headers(),
                ],
                self._protocol.error_body(err, self.request_id),
            )
        else:
            # The final event of a stream already started, in its protocol's error shape, and no
            # end marker. If the client does not take it, the server's send timeout closes the
            # connection: nothing here waits for it.
            ex.end(self._protocol.error_event(err, self.request_id, self.events))

    async def _proxy(self) -> None:
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
            # unknown models must not let a client hold permits), nor the parsed body; admission
            # is asked again after.
            self._step_aside(valid)
            if await gw.models.check(valid.model) is False:
                served = gw.models.served(settings.model_aliases)
                raise ModelNotFound(
                    f"The model '{valid.model[:200]}' does not exist. {served}".rstrip(),
                    param="model",
                )
        if gw.ratelimiter is not None and route.kind != "admin":
            self.requested_tokens = valid.requested_tokens
            if gw.ratelimiter.mode == "redis":
                self._step_aside(valid)  # a round trip to Redis: the same
            try:
                self._token_charge = await gw.ratelimiter.acquire(
                    self.rate_key, valid.requested_tokens
                )
            except RateLimited as err:
                self._retry_after_queue(err)
                raise

        place = self._place
        if place is not None:
            if not place.granted:
                # A place in the queue waits without the parsed body (up to ~30x the body's
                # bytes) and parses it again when its slot comes; one granted at once keeps it.
                waiting_since = time.perf_counter()
                try:
                    await self._await_turn(place, valid)
                except GatewayError:
                    # Refused while queued: that wait was not the gateway's own time either.
                    self.queue_wait = time.perf_counter() - waiting_since
                    raise
            self.admitted = True
            self.queue_wait = place.queue_wait
        if valid.dropped:
            valid.parse_again()
        if (
            settings.priority_scheduling
            and route.name in _TAKES_PRIORITY
            and valid.json is not None
        ):
            # vLLM serves a lower ``priority`` first; the gateway's higher class first. The
            # tenant's class replaces whatever the client put there.
            valid.json["priority"] = -self.priority
            valid.body = orjson.dumps(valid.json)
        deadline = loop.time() + settings.request_timeout
        if valid.stream and valid.json is not None and gw.backend.may_fail_over():
            if route.name in (CHAT, COMPLETIONS):
                why = not_continuable(valid.json, chat=route.name == CHAT)
                if why is None:
                    self._resumable = Resumable(valid.json, chat=route.name == CHAT)
                self._not_resumable = why
            elif route.name == MESSAGES:
                why = messages_not_continuable(valid.json)
                if why is None:
                    self._resumable = MessagesResumable(valid.json)
                self._not_resumable = why
            elif route.name == RESPONSES_PATH:
                why = responses_not_continuable(valid.json)
                if why is None:
                    self._resumable = ResponsesResumable(valid.json)
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
        if ex.context.deadline is not None:
            # The client waits for its first token until its deadline, and no longer (vLLM 0.32
            # takes no per-request timeout to pass it on to).
            first_deadline = min(first_deadline, ex.context.deadline)
        body = b""
        try:
            # One timer for the request's wait on the backend: the first token's deadline until
            # the answer's head, the request's own for a body read whole.
            async with IdleTimeout(first_deadline, self._task) as timer:
                sent = self.upstream_sent_at = time.perf_counter()
                # The gateway's own time so far (X-Gateway-Overhead-Ms): since the request was
                # whole, less its wait for a slot.
                self.overhead = max(0.0, sent - self.started_at - self.queue_wait)
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

        if self.stream and upstream.status == 200:
            await self._relay_stream(upstream, first_deadline, deadline)
        elif upstream.status != 200:
            if self._early_head:
                raise _refusal(upstream.status, body)  # the head went out: an error event
            # A stream request the backend refused (vLLM checks its sampling parameters before
            # it streams): its status and body, as for any request.
            self._relay_error_status(upstream, body, time.perf_counter())
        else:
            read_at = self.first_byte_at = time.perf_counter()
            self._relay_body(upstream, body, read_at)
            if ex.paused:
                await ex.drain()

    # --- the wait for a slot ----------------------------------------------------------------

    async def _await_turn(self, place: Place, valid: ValidRequest) -> None:
        """Wait for the place's slot, without the parsed body, until the request's deadline
        (``DeadlineExceeded`` then) and the queue's own timeout; with queue updates asked for on
        a stream, the head goes out now and a comment per interval while it waits."""
        ctx = self._ex.context
        deadline = ctx.deadline
        if not (ctx.queue_updates and valid.stream and self._route.kind == "generate"):
            if deadline is None:
                await place.wait(valid.drop_parsed)
                return
            try:
                async with asyncio.timeout_at(deadline):
                    await place.wait(valid.drop_parsed)
            except TimeoutError:
                raise self._deadline_passed() from None
            return
        ex = self._ex
        self._early_head = True
        self.status = 200
        ex.start(200, [*SSE_HEADERS, (b"x-request-id", self.request_id.encode())])
        loop = asyncio.get_running_loop()
        interval = self._gw.settings.queue_update_interval
        end = math.inf if deadline is None else deadline
        # The wait runs as a task of its own so that each comment interrupts nothing: this
        # call owns it, and cancels and awaits it on every path out.
        waiter = asyncio.ensure_future(place.wait(valid.drop_parsed))
        try:
            while True:
                self._queue_comment(place)
                left = end - loop.time()
                if left <= 0:
                    raise self._deadline_passed()
                await asyncio.wait((waiter,), timeout=min(interval, left))
                if waiter.done():
                    waiter.result()  # the slot, or the wait's refusal
                    return
        finally:
            if not waiter.done():
                waiter.cancel()
                await asyncio.wait((waiter,))
            elif not waiter.cancelled():
                waiter.exception()  # retrieved: raised above, or superseded by ours

    def _queue_comment(self, place: Place) -> None:
        """``: queue position=N eta_ms=M``: a comment SSE clients skip, a UI may show."""
        standing = getattr(place, "standing", None)
        if standing is not None:
            position, eta = standing()
        else:  # a worker of several: the supervisor's last word on the queue
            adm = self._gw.admission
            position, eta = adm.queued, adm.estimate_wait()
        self._ex.write(b": queue position=%d eta_ms=%d\n\n" % (position, round(eta * 1000)))

    def _admission_retry_after(self) -> float:
        adm = self._gw.admission
        if isinstance(adm, Admission):
            return adm.retry_after(self.tenant, self.priority)
        return adm.estimate_wait()

    def _deadline_passed(self) -> DeadlineExceeded:
        return DeadlineExceeded(retry_after=self._admission_retry_after())

    def _retry_after_queue(self, err: RateLimited) -> None:
        """A rate limit's Retry-After is when the limit lets the request through; when the
        queue is not empty, no sooner than its tenant and class would get a slot either."""
        if self._gw.admission.queued:
            wait = max(err.retry_after or 0.0, self._admission_retry_after())
            err.retry_after = max(RETRY_AFTER_MIN, min(wait, RETRY_AFTER_MAX))

    def _start_stream(self) -> None:
        if not self._early_head:
            super()._start_stream()
            return
        # The head went out while the request queued: its first event is the first byte.
        self.first_byte_at = time.perf_counter()
        self.response_started = True

    def _step_aside(self, valid: ValidRequest) -> None:
        """Before a wait that is not the admission's own: give up the place (taken again, at the
        end of the queue, when ``_proxy`` waits on it) and the parsed body (parsed again then)."""
        valid.drop_parsed()
        if self._place is not None:
            self._place = self._place.step_aside()

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
        if isinstance(self._resumable, Resumable):
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
            tenant=self.tenant,
        )

    def _own_responses(self, valid: ValidRequest) -> None:
        """Stored Responses are their creator's: a response id another tenant minted, or one
        never minted, is the same 404 and nothing goes upstream (an admin key reads any). A
        create gets the id vLLM will give it: the requester's."""
        ids = self._gw.response_ids
        tenant = self.tenant
        if self._route.kind == "store":
            named, param = self._param, "response_id"
            if self._ex.context.admin:
                return
        else:
            named, param = valid.previous_response_id, "previous_response_id"
        if named is not None and not ids.owns(tenant, named):
            raise NotFound(f"Response with id '{named[:200]}' not found.", param=param)
        if self._route.kind != "store":
            set_response_id(valid, ids.mint(tenant))


def _refusal(status: int, body: bytes) -> GatewayError:
    """The backend's 4xx for a stream whose head already went out: the same words, as the
    stream's final error event."""
    message = None
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if isinstance(answer, dict):
        inner = answer.get("error")
        found = inner.get("message") if isinstance(inner, dict) else answer.get("message")
        if isinstance(found, str):
            message = found[:1000]
    err = GatewayError(message or f"The backend refused the request (status {status}).")
    err.status = status
    err.type = "backend_rejected"
    return err
