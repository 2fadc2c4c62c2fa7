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
without ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vllm_gateway.backends.base import UpstreamRequest
from vllm_gateway.errors import (
    BackendUnavailable,
    BadBackendResponse,
    FirstTokenTimeout,
    GatewayError,
    ModelNotFound,
    NotFound,
    RequestTimeout,
    ShuttingDown,
)
from vllm_gateway.identity import ANONYMOUS
from vllm_gateway.ids import fresh_id
from vllm_gateway.proxy.admission import Place
from vllm_gateway.proxy.continuation import Continuing
from vllm_gateway.proxy.failover import Resumable, not_continuable
from vllm_gateway.proxy.failover_messages import MessagesResumable, messages_not_continuable
from vllm_gateway.proxy.failover_responses import ResponsesResumable, responses_not_continuable
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.idle import IdleTimeout
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


class ProxyCall(Continuing):
    """One request through the gateway; also the record that metrics and logs read at its end."""

    __slots__ = (
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
            self._token_charge = await gw.ratelimiter.acquire(self.rate_key, valid.requested_tokens)

        place = self._place
        if place is not None:
            if not place.granted:
                # A place in the queue waits without the parsed body (up to ~30x the body's
                # bytes) and parses it again when its slot comes; one granted at once keeps it.
                await place.wait(valid.drop_parsed)
            self.admitted = True
            self.queue_wait = place.queue_wait
        if valid.dropped:
            valid.parse_again()
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

        if self.stream and upstream.status == 200:
            await self._relay_stream(upstream, first_deadline, deadline)
        elif upstream.status != 200:
            # A stream request the backend refused (vLLM checks its sampling parameters before
            # it streams): its status and body, as for any request.
            self._relay_error_status(upstream, body)
        else:
            self.first_byte_at = time.perf_counter()
            self._relay_body(upstream, body)
            if ex.paused:
                await ex.drain()

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
