"""A keyed request, from its headers to its answer: claim the key, run the generation when it is
the first, and read the key's log to the client.

The key's scope is the request's tenant (its API key's); a gateway without keys has one tenant,
``anonymous``, and scopes keys per client address only when ``idempotency_per_client_address``
says so (a client that retries after changing networks comes from another address: the case the
feature is for). The body's fingerprint is a digest of the method, path, query and body bytes.

The reader is bounded like any client: it writes without awaiting and waits for ``drain()`` only
while the client is behind (the server's send timeout ends a client that stops reading); each
wait on the log is at most ``_READ_WAIT``, and the whole read at most the request timeout past
the reader's start. A reader that leaves stops nothing but itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from vllm_gateway.errors import (
    GatewayError,
    IdempotencyKeyReused,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    ResultLost,
)
from vllm_gateway.identity import ANONYMOUS
from vllm_gateway.proxy.call import ProxyCall
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.protocols import StreamProtocol
from vllm_gateway.proxy.responder import Responder
from vllm_gateway.proxy.resume.recorder import Recorder
from vllm_gateway.proxy.resume.store import CUT, Reader
from vllm_gateway.proxy.routes import Body, Route

__all__ = ["keyed", "serve_keyed"]

log = logging.getLogger("vllm_gateway.proxy.resume")

_MAX_KEY = 255
_READ_WAIT = 1.0  # longest single wait on the log; the loop then looks again


def keyed(gw: Gateway, ex: Responder, route: Route) -> bytes | None:
    """The request's Idempotency-Key when the gateway keeps results for it (a generating JSON
    route), else None: the request is served as any other."""
    if route.kind != "generate" or route.body is not Body.JSON or gw.resume is None:
        return None
    return ex.header(b"idempotency-key")


def _check_key(raw: bytes) -> str:
    if not 0 < len(raw) <= _MAX_KEY or not all(0x21 <= c <= 0x7E for c in raw):
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {_MAX_KEY} visible ASCII characters.",
            param="Idempotency-Key",
        )
    return raw.decode("ascii")


def _last_event_id(ex: Responder) -> int:
    raw = ex.header(b"last-event-id")
    if raw is None:
        return 0
    value = raw.strip()
    if not value.isdigit() or len(value) > 18:
        raise InvalidRequest(
            "Last-Event-ID must be the id of an event of this stream (a whole number).",
            param="Last-Event-ID",
        )
    return int(value)


def _fingerprint(ex: Responder) -> str:
    digest = hashlib.sha256()
    for part in (ex.method.encode(), ex.path.encode(), ex.query):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(ex.body)
    return digest.hexdigest()


def _scope(gw: Gateway, ex: Responder) -> str:
    identity = ex.context.identity or ANONYMOUS
    if identity is ANONYMOUS and gw.settings.idempotency_per_client_address:
        return f"ip:{ex.context.client_address or ''}"
    return "t:" + identity.tenant


def _answer_error(ex: Responder, protocol: StreamProtocol, err: GatewayError) -> None:
    ex.respond(
        err.status,
        [
            (b"content-type", b"application/json"),
            (b"x-request-id", ex.request_id.encode()),
            *err.headers(),
        ],
        protocol.error_body(err, ex.request_id),
    )


async def serve_keyed(gw: Gateway, ex: Responder, route: Route, param: str | None) -> None:
    """Answer a request that carries an Idempotency-Key (``keyed`` said so)."""
    ctx = ex.context
    try:
        await _serve(gw, ex, route, param)
    finally:
        # The admission place the front door took: the generation's call took it when this
        # request runs one; otherwise nothing here generates, and it goes back.
        place, ctx.place = ctx.place, None
        if place is not None:
            place.release()


async def _serve(gw: Gateway, ex: Responder, route: Route, param: str | None) -> None:
    store = gw.resume
    assert store is not None
    try:
        raw = ex.header(b"idempotency-key")
        assert raw is not None
        key = _check_key(raw)
        after = _last_event_id(ex)
        # A client resuming from an event needs the generation it had: never a new one.
        claim = await store.claim(_scope(gw, ex), key, _fingerprint(ex), create=after == 0)
        if claim.missing:
            raise ResultLost(
                f"No generation is kept under the Idempotency-Key '{key[:100]}' (it ended more "
                "than the grace period ago, or was stopped); send the request again without "
                "Last-Event-ID."
            )
        if claim.reader is None:
            raise IdempotencyKeyReused(
                f"The Idempotency-Key '{key[:100]}' was used with another request; "
                "a new request needs a new key.",
                param="Idempotency-Key",
            )
    except GatewayError as err:
        _answer_error(ex, route.protocol, err)
        return
    if claim.writer is not None:
        recorder = Recorder(ex, claim.writer)
        call = ProxyCall(gw, recorder, route, param)  # takes the admission place

        async def generate() -> None:
            try:
                await call.run()
            finally:
                recorder.close()

        store.spawn(generate(), f"generation-{ex.request_id}")
    else:
        place, ex.context.place = ex.context.place, None
        if place is not None:
            place.release()  # a reader generates nothing: its place goes back before it reads
    await _read(gw, ex, claim.reader, after, route.protocol, replay=claim.writer is None)


async def _read(
    gw: Gateway, ex: Responder, reader: Reader, after: int, protocol: StreamProtocol, replay: bool
) -> None:
    """Relay the log after event ``after`` to the client, until it ends, is lost, or the client
    leaves."""
    task = asyncio.current_task()
    assert task is not None
    left = False

    def gone() -> None:
        nonlocal left
        if not left:
            left = True
            task.cancel()

    ex.on_gone = gone
    try:
        await _relay(gw, ex, reader, after, protocol, replay)
    except asyncio.CancelledError:
        if not left or task.uncancel() > 0:
            raise
    finally:
        ex.on_gone = None
        reader.close()


async def _relay(
    gw: Gateway, ex: Responder, reader: Reader, after: int, protocol: StreamProtocol, replay: bool
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + gw.settings.request_timeout + gw.settings.first_token_timeout
    request_id = ex.request_id.encode()
    extra = [(b"x-request-id", request_id)]
    if replay:
        extra.append((b"idempotent-replayed", b"true"))
    started = False
    position = after
    while True:
        if ex.gone:
            return
        wait = min(_READ_WAIT, deadline - loop.time())
        if wait <= 0:
            err: GatewayError = RequestTimeout()
            break
        batch = await reader.read(position, wait)
        head = batch.head
        if head is not None and head.body is not None:
            ex.respond(head.status, [*head.headers, *extra], head.body)
            return
        if head is not None and (batch.events or batch.ended):
            if not started:
                started = True
                ex.start(head.status, [*head.headers, *extra])
            out = b"".join(b"id: %d\n%b\n\n" % (seq, event) for seq, event in batch.events)
            if batch.events:
                position = batch.events[-1][0]
            if batch.ended:
                ex.end(out)
                return
            ex.write(out)
            if ex.paused:
                await ex.drain()  # the client's wait, bounded by the server's send timeout
            continue
        if batch.lost is not None:
            if batch.lost == CUT:
                err = Overloaded(f"{CUT}; retry later.", retry_after=1.0)
            else:
                err = ResultLost(f"The generation can no longer be read: {batch.lost}.")
            break
    if ex.gone:
        return
    if started:
        ex.end(protocol.error_event(err, ex.request_id, position))
    else:
        _answer_error(ex, protocol, err)
