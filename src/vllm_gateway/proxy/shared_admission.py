"""One admission for every worker process: the worker's side (``RemoteAdmission``) and the wire both
sides speak.

With ``--workers N`` a static split of the limit lets one worker be full while another has room, so
"N in flight, the rest wait in order" would hold per worker only. Instead the supervisor keeps the
one ``Admission`` (the same class a single process uses: the same FIFO, tenants, priorities, queue
timeout and 503s) and each worker asks it for a slot over a Unix socket. A worker's request holds a
``RemotePlace`` from its arrival (``arrive``, which sends nothing); ``wait`` sends one small message
and waits for the grant or the refusal; ``release`` sends one (the slot's release, or the ask's
cancellation) and does not wait. The place is the ``Place`` of admission.py: one owner releases it
once, on every path.

The wire: each message is a 4-byte big-endian length and an orjson array whose first item says
what it is:

    worker -> supervisor   ["A", id, tenant, priority]   acquire
                           ["R", id]                      release (the permit of acquire ``id``)
                           ["C", id]                      cancel (the waiter left; a grant that
                                                          crossed it is released)
                           ["M", seq, snapshot]           metrics, asked for with "Q"
                           ["Q", seq]                     a scrape: send me every other worker's
    supervisor -> worker   ["W", id]                      queued: no slot at once (the worker
                                                          sheds what its request need not hold)
                           ["G", id, queue_wait, state]   granted
                           ["X", id, type, message, retry_after, state]   refused
                           ["S", state]                   the shared state, when it changes
                           ["Q", seq]                     send your metrics snapshot
                           ["P", seq, [snapshots]]        the other workers' snapshots

``state`` is ``[in_flight, queued, limit, estimate]``: what a worker's gauges and Retry-After read.

Bounds: a worker's wait for a grant is the supervisor's queue timeout plus a margin (a wedged
supervisor cannot hold a request for ever); a worker whose connection drops has its permits
released and its waiters removed by the supervisor at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Callable
from typing import Any

import orjson

from vllm_gateway import errors
from vllm_gateway.errors import GatewayError, QueueTimeout, ShuttingDown

__all__ = ["Channel", "RemoteAdmission", "RemotePlace", "decode_error"]

log = logging.getLogger("vllm_gateway.admission")

_HEADER = struct.Struct(">I")
_MAX_MESSAGE = 64 << 20  # a metrics snapshot of a big gateway is well under this
# Beyond the queue timeout, how long a worker waits for the supervisor's answer.
_MARGIN = 2.0

# The refusals that travel: the admission's own errors, by their stable type.
_REFUSALS: dict[str, type[GatewayError]] = {
    cls.type: cls
    for cls in (errors.Overloaded, errors.QueueTimeout, errors.ShuttingDown, errors.Shed)
}


def decode_error(kind: str, message: str, retry_after: float | None) -> GatewayError:
    cls = _REFUSALS.get(kind, errors.Unavailable)
    return cls(message, retry_after=retry_after)


class Channel(asyncio.Protocol):
    """Length-prefixed orjson messages over a stream socket, each handed to ``on_message``."""

    def __init__(
        self, on_message: Callable[[list[Any]], None], on_lost: Callable[[], None]
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 4:
            (size,) = _HEADER.unpack_from(buf)
            if size > _MAX_MESSAGE:
                log.error("admission channel: a message of %d bytes; closing", size)
                self.close()
                return
            if len(buf) < 4 + size:
                return
            message = orjson.loads(bytes(buf[4 : 4 + size]))
            del buf[: 4 + size]
            try:
                self._on_message(message)
            except Exception:
                log.exception("admission channel: handling %r failed", message[:1])

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_lost()

    def send(self, message: list[Any]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = orjson.dumps(message)
        self.transport.write(_HEADER.pack(len(data)) + data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RemotePlace:
    """A request's place in the supervisor's admission: asked for when waited on, released once
    by its owner (the slot's release, or the ask's cancellation). ``release()`` may be called any
    number of times; the first sends what is due."""

    __slots__ = (
        "_admission",
        "_fut",
        "_id",
        "_shed",
        "acquired_at",
        "granted",
        "priority",
        "queue_wait",
        "released",
        "tenant",
    )

    def __init__(self, admission: RemoteAdmission, tenant: str, priority: int) -> None:
        self._admission = admission
        self.tenant = tenant
        self.priority = priority
        self._id = 0  # the ask's id, once asked
        self._fut: asyncio.Future[float] | None = None
        self._shed: Callable[[], None] | None = None
        self.granted = False
        self.queue_wait = 0.0
        self.acquired_at = 0.0
        self.released = False

    async def wait(self, shed: Callable[[], None] | None = None) -> RemotePlace:
        """The place, once the supervisor granted it a slot; ``QueueTimeout`` when no answer
        comes within the queue timeout and a margin, the supervisor's refusal otherwise (the
        place is still the owner's to release). ``shed`` is called when the supervisor says the
        ask is queued."""
        if self.granted:
            return self
        adm = self._admission
        channel = adm.channel
        if self.released or adm._closed or channel is None:
            raise ShuttingDown(retry_after=adm._estimate)
        ident = self._id = next(adm._ids)
        fut = self._fut = asyncio.get_running_loop().create_future()
        self._shed = shed
        adm._waiting[ident] = self
        channel.send(["A", ident, self.tenant, self.priority])
        try:
            async with asyncio.timeout(adm.queue_timeout + _MARGIN):
                queue_wait = await fut
        except TimeoutError:
            raise QueueTimeout(retry_after=adm._estimate) from None
        finally:
            adm._waiting.pop(ident, None)
            self._shed = None
        self.granted = True
        self.queue_wait = queue_wait
        adm._held += 1
        adm.admitted_total += 1
        return self

    def step_aside(self) -> RemotePlace:
        if not self._id:
            return self  # never asked: nothing to give up
        self.release()
        return RemotePlace(self._admission, self.tenant, self.priority)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.granted:
            self._admission._release(self._id)
        elif self._id:
            self._admission._abandon(self._id)  # asked, never granted: the ask is cancelled

    def _queued(self) -> None:
        shed, self._shed = self._shed, None
        if shed is not None:
            shed()

    def _answer(self, queue_wait: float | None, err: GatewayError | None) -> None:
        fut = self._fut
        if fut is None or fut.done():
            return  # the waiter left: its "C" crossed this answer (the supervisor releases it)
        if err is None:
            fut.set_result(float(queue_wait or 0.0))
        else:
            fut.set_exception(err)


class RemoteAdmission:
    """The worker's admission: the interface of ``Admission``, answered by the supervisor."""

    def __init__(self, limit: int, max_queued: int, queue_timeout: float) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        # This worker's share of the counts (the status page's; /metrics merges the workers').
        self.admitted_total = 0
        self.rejected_full_total = 0
        self.rejected_timeout_total = 0
        self.channel: Channel | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, RemotePlace] = {}  # asked, not yet answered
        self._held = 0  # permits this worker holds (what its drain waits for)
        self._idle: asyncio.Event | None = None
        self._closed = False
        # The shared state, as the supervisor last said.
        self._in_flight = 0
        self._queued = 0
        self._estimate = 1.0
        # Answers to a scrape's question for the other workers' metrics.
        self._scrapes: dict[int, asyncio.Future[list[Any]]] = {}
        self.snapshot: Callable[[], Any] = dict  # what this worker answers to "Q"

    async def connect(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_connection(
            lambda: Channel(self._on_message, self._on_lost), sock=sock
        )
        self.channel = channel

    # --- the Admission interface -------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def closed(self) -> bool:
        return self._closed

    def estimate_wait(self, position: int | None = None) -> float:
        return self._estimate

    def arrive(self, tenant: str = "", priority: int = 0) -> RemotePlace:
        """A place, asked for when waited on: the ask is a message and its answer comes back on
        the socket, so the request's task waits for it (``RemotePlace.wait``)."""
        return RemotePlace(self, tenant, priority)

    async def acquire(
        self, timeout: float | None = None, tenant: str = "", priority: int = 0
    ) -> RemotePlace:
        """A place holding a slot, asked for and waited for at once; the refusal instead (the
        place given up)."""
        place = RemotePlace(self, tenant, priority)
        try:
            return await place.wait()
        except BaseException:
            place.release()
            raise

    def _abandon(self, ident: int) -> None:
        if self.channel is not None:
            self.channel.send(["C", ident])

    def _release(self, ident: int) -> None:
        self._held -= 1
        if self.channel is not None:
            self.channel.send(["R", ident])
        if self._held == 0 and self._idle is not None:
            self._idle.set()

    def close(self) -> None:
        """Stop admitting here: new arrivals and this worker's waiters get 503 at once."""
        if self._closed:
            return
        self._closed = True
        for ident, place in list(self._waiting.items()):
            place._answer(None, ShuttingDown(retry_after=self._estimate))
            self._abandon(ident)

    async def wait_idle(self, timeout: float) -> bool:
        if self._held == 0:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                while self._held:
                    await self._idle.wait()
                    self._idle.clear()
        except TimeoutError:
            return False
        return True

    # --- metrics across workers -----------------------------------------------------------------

    async def peer_snapshots(self, timeout: float) -> list[Any]:
        """The other workers' metrics snapshots, via the supervisor; [] when it cannot tell."""
        if self.channel is None:
            return []
        seq = next(self._ids)
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._scrapes[seq] = fut
        self.channel.send(["Q", seq])
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return []
        finally:
            self._scrapes.pop(seq, None)

    # --- the supervisor's messages --------------------------------------------------------------

    def _state(self, state: list[Any]) -> None:
        self._in_flight, self._queued, self.limit, self._estimate = state

    def _on_message(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "G":
            _, ident, queue_wait, state = message
            self._state(state)
            place = self._waiting.get(ident)
            if place is not None:
                place._answer(queue_wait, None)
            # Else the waiter left: its "C" crossed this grant, and the supervisor releases it.
        elif kind == "W":
            place = self._waiting.get(message[1])
            if place is not None:
                place._queued()
        elif kind == "X":
            _, ident, err_type, text, retry_after, state = message
            self._state(state)
            place = self._waiting.get(ident)
            if place is not None and place._fut is not None and not place._fut.done():
                if err_type == errors.Overloaded.type:
                    self.rejected_full_total += 1
                elif err_type == errors.QueueTimeout.type:
                    self.rejected_timeout_total += 1
                place._answer(None, decode_error(err_type, text, retry_after))
        elif kind == "S":
            self._state(message[1])
        elif kind == "Q":
            if self.channel is not None:
                self.channel.send(["M", message[1], self.snapshot()])
        elif kind == "P":
            fut2 = self._scrapes.get(message[1])
            if fut2 is not None and not fut2.done():
                fut2.set_result(message[2])

    def _on_lost(self) -> None:
        # The supervisor is gone (it kills its workers when it exits): refuse from now on.
        self.channel = None
        self._closed = True
        for place in list(self._waiting.values()):
            place._answer(None, ShuttingDown(retry_after=self._estimate))
