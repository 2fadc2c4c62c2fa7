"""One admission for every worker process: the worker's side (``RemoteAdmission``) and the wire both
sides speak.

With ``--workers N`` a static split of the limit lets one worker be full while another has room, so
"N in flight, the rest wait in order" would hold per worker only. Instead the supervisor keeps the
one ``Admission`` (the same class a single process uses: the same FIFO, tenants, priorities, queue
timeout and 503s) and each worker holds slots granted by it over a Unix socket. A worker's request
holds a ``RemotePlace`` from its arrival (``arrive``, which sends nothing); ``wait`` takes an idle
slot of the worker's lease, or sends one small message and waits for the grant or the refusal;
``release`` frees the slot (kept for the lease, or given back) or cancels the ask, and does not
wait. The place is the ``Place`` of admission.py: one owner releases it once, on every path.

Leases. A slot the supervisor grants belongs to the worker until the worker gives it back ("R");
when a request ends, the worker may keep its slot idle, up to the lease the supervisor last set
("L"), and admit a later arrival into it without a round trip. The invariants:

- every slot a worker's request holds is one of the supervisor's ``Admission`` permits, granted to
  that worker and not given back, so the global limit holds exactly as in one process;
- the lease is 0 whenever anyone is queued anywhere: the supervisor sends "L 0" to every worker
  before it answers the ask that queues, and a worker that hears it gives back its idle slots at
  once and from then on keeps none, so after a worker hears of a queue every admission it makes
  goes through the supervisor's one FIFO (an arrival admitted from a lease before the word came
  is one that reached the idle slot before the queue formed);
- a worker admits from its lease only while none of its own asks is outstanding, so its own
  arrivals keep their order;
- every worker answers a lease change at once ("L" back), and the supervisor holds an ask that
  would be refused (the queue full) until every worker has answered the last recall (1 s at
  most), so idle slots on their way back are not counted against it: the 503s are a single
  process's.

The same channel carries the admin API's member changes to every worker (``runtime/coordinator.py``).

The wire: each message is a 4-byte big-endian length and an orjson array whose first item says
what it is:

    worker -> supervisor   ["A", id, tenant, priority]   acquire one slot
                           ["R", n, idle]                 give back n slots (idle: how many
                                                          slots it still holds that no request
                                                          does, for the in-flight gauge)
                           ["I", idle, released]          the same count, and how many slots
                                                          its requests freed into the lease
                                                          since the last "I" (the release rate
                                                          behind Retry-After), at most every
                                                          0.25 s
                           ["L", n, idle, seq]            the answer to lease change seq, with
                                                          the n idle slots it gave back
                           ["C", id]                      cancel an ask still waiting (a grant
                                                          that crossed it is the worker's slot)
                           ["M", seq, snapshot]           metrics, asked for with "Q"
                           ["Q", seq]                     a scrape: send me every other worker's
                           ["B", seq, op, url]            an admin change of the pool's members
                                                          (add, remove, drain, undrain): apply
                                                          it in every worker
                           ["o", sid]                     member change sid applied here
    supervisor -> worker   ["L", size, seq]               keep up to size idle slots (0: give
                                                          back the idle ones, keep none)
                           ["W", id]                      queued: no slot at once (the worker
                                                          sheds what its request need not hold)
                           ["G", id, queue_wait, state]   granted: one more slot is the worker's
                           ["X", id, type, message, retry_after, state]   refused
                           ["S", state]                   the shared state, when it changes
                           ["Q", seq]                     send your metrics snapshot
                           ["P", seq, [snapshots]]        the other workers' snapshots
                           ["O", sid, op, url]            apply this member change (sid 0: one
                                                          of the replay a new worker starts with)
                           ["Y"]                          the replay is over
                           ["b", seq, applied, of, error] change seq: how many of the live
                                                          workers applied it within the bound,
                                                          and what it did to the asker's pool

``state`` is ``[in_flight, queued, limit, estimate]``: what a worker's gauges and Retry-After read
(``in_flight`` counts requests, not the idle slots of leases).

Bounds: a worker's wait for a grant is the supervisor's queue timeout plus a margin (a wedged
supervisor cannot hold a request for ever); a worker whose connection drops has every slot it
held, leased or busy, released and its waiters removed by the supervisor at once.
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

__all__ = ["MEMBER_WAIT", "Channel", "RemoteAdmission", "RemotePlace", "decode_error"]

log = logging.getLogger("vllm_gateway.admission")

_HEADER = struct.Struct(">I")
_MAX_MESSAGE = 64 << 20  # a metrics snapshot of a big gateway is well under this
# Beyond the queue timeout, how long a worker waits for the supervisor's answer.
_MARGIN = 2.0
# How often, at most, a worker tells the supervisor how many idle slots it holds.
_REPORT_INTERVAL = 0.25
# How long the supervisor waits for every worker to apply a member change before it answers.
MEMBER_WAIT = 1.0

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
    """A request's place in the supervisor's admission: a slot of the worker's lease, or one asked
    for when waited on; released once by its owner (the slot freed, or the ask cancelled).
    ``release()`` may be called any number of times; the first does what is due."""

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
        # True from the moment the slot is this place's (a grant may reach it as its wait ends:
        # the owner's release then frees the slot all the same).
        self.granted = False
        self.queue_wait = 0.0
        self.acquired_at = 0.0
        self.released = False

    async def wait(self, shed: Callable[[], None] | None = None) -> RemotePlace:
        """The place, once it holds a slot: an idle one of the worker's lease at once, else the
        supervisor's grant; ``QueueTimeout`` when no answer comes within the queue timeout and a
        margin, the supervisor's refusal otherwise (the place is still the owner's to release).
        ``shed`` is called when the supervisor says the ask is queued."""
        if self.granted:
            return self
        adm = self._admission
        channel = adm.channel
        if self.released or adm._closed or channel is None:
            raise ShuttingDown(retry_after=adm._estimate)
        if adm._lease and not adm._waiting and adm._slots > adm._busy:
            adm._busy += 1  # an idle slot of the lease: no round trip
            adm._report_soon()
            self.granted = True
            adm.admitted_total += 1
            return self
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
        self.queue_wait = queue_wait
        adm.admitted_total += 1
        return self

    def step_aside(self) -> RemotePlace:
        if not self._id and not self.granted:
            return self  # never asked: nothing to give up
        self.release()
        return RemotePlace(self._admission, self.tenant, self.priority)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.granted:
            self._admission._release()
        elif self._id:
            self._admission._abandon(self._id)  # asked, never granted: the ask is cancelled

    def _queued(self) -> None:
        shed, self._shed = self._shed, None
        if shed is not None:
            shed()

    def _grant(self, queue_wait: float) -> bool:
        """The supervisor's grant reached this place; False if its waiter had left."""
        fut = self._fut
        if fut is None or fut.done():
            return False
        self.granted = True
        fut.set_result(queue_wait)
        return True

    def _refuse(self, err: GatewayError) -> bool:
        fut = self._fut
        if fut is None or fut.done():
            return False
        fut.set_exception(err)
        return True


class RemoteAdmission:
    """The worker's admission: the interface of ``Admission``, answered by the supervisor, with
    the worker's lease of idle slots."""

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
        # The slots the supervisor granted this worker and it has not given back; of those, the
        # ones a request holds (what the drain waits for); how many idle ones it may keep.
        self._slots = 0
        self._busy = 0
        self._lease = 0
        self._reported = 0  # the idle count the supervisor last heard
        self._released = 0  # slots freed into the lease since the last report
        self._report: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        self._closed = False
        # The shared state, as the supervisor last said.
        self._in_flight = 0
        self._queued = 0
        self._estimate = 1.0
        # Answers to a scrape's question for the other workers' metrics.
        self._scrapes: dict[int, asyncio.Future[list[Any]]] = {}
        self.snapshot: Callable[[], Any] = dict  # what this worker answers to "Q"
        # Member changes the supervisor sends ("O", "Y"), handed on in order; the answers to this
        # worker's own ("b").
        self.on_members: Callable[[list[Any]], None] | None = None
        self._member_ops: dict[int, asyncio.Future[list[Any]]] = {}

    async def connect(self, sock: Any) -> None:
        loop = self._loop = asyncio.get_running_loop()
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

    @property
    def idle(self) -> int:
        """Slots this worker holds that no request does: its lease."""
        return self._slots - self._busy

    def estimate_wait(self, position: int | None = None) -> float:
        return self._estimate

    def arrive(self, tenant: str = "", priority: int = 0) -> RemotePlace:
        """A place, taken when waited on: from the lease at once, or asked for with a message
        whose answer comes back on the socket, so the request's task waits for it
        (``RemotePlace.wait``)."""
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

    def _release(self) -> None:
        self._busy -= 1
        self._free()
        if self._busy == 0 and self._idle is not None:
            self._idle.set()

    def _free(self) -> None:
        """A slot no request holds: kept for the lease, or given back."""
        if self._slots - self._busy > self._lease or self._closed:
            self._give_back(1)
        else:
            self._released += 1
            self._report_soon()

    def _give_back(self, n: int, answering: int | None = None) -> None:
        """The one way slots leave a worker that is connected (its death frees the rest): "R",
        or the answer to the lease change numbered ``answering``."""
        self._slots -= n
        idle = self._reported = self._slots - self._busy
        if self.channel is not None:
            self.channel.send(["R", n, idle] if answering is None else ["L", n, idle, answering])

    def _report_soon(self) -> None:
        if self._report is None and self.channel is not None and self._loop is not None:
            self._report = self._loop.call_later(_REPORT_INTERVAL, self._report_idle)

    def _report_idle(self) -> None:
        self._report = None
        idle = self._slots - self._busy
        if (idle != self._reported or self._released) and self.channel is not None:
            self._reported = idle
            self.channel.send(["I", idle, self._released])
            self._released = 0

    def close(self) -> None:
        """Stop admitting here: new arrivals and this worker's waiters get 503 at once, and the
        lease's idle slots go back."""
        if self._closed:
            return
        self._closed = True
        for ident, place in list(self._waiting.items()):
            place._refuse(ShuttingDown(retry_after=self._estimate))
            self._abandon(ident)
        excess = self._excess()
        if excess:
            self._give_back(excess)

    def _excess(self) -> int:
        """Idle slots beyond the lease (all of them once closed)."""
        if self._closed:
            self._lease = 0
        return max(0, self._slots - self._busy - self._lease)

    async def wait_idle(self, timeout: float) -> bool:
        if self._busy == 0:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                while self._busy:
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

    # --- member changes across workers -----------------------------------------------------------

    async def share_member_op(self, op: str, url: str, timeout: float) -> list[Any] | None:
        """Ask the supervisor to have every worker (this one too) apply ``op`` to ``url``;
        ``[applied, of, error]`` once it says so, ``None`` when no answer came within
        ``timeout`` or it is gone."""
        if self.channel is None:
            return None
        seq = next(self._ids)
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._member_ops[seq] = fut
        self.channel.send(["B", seq, op, url])
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return None
        finally:
            self._member_ops.pop(seq, None)

    def member_op_done(self, sid: int, error: str | None) -> None:
        if self.channel is not None:
            self.channel.send(["o", sid, error])

    # --- the supervisor's messages --------------------------------------------------------------

    def _state(self, state: list[Any]) -> None:
        self._in_flight, self._queued, self.limit, self._estimate = state

    def _on_message(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "G":
            _, ident, queue_wait, state = message
            self._state(state)
            self._slots += 1  # the worker's from here, whoever takes it
            place = self._waiting.get(ident)
            if place is not None and place._grant(float(queue_wait or 0.0)):
                self._busy += 1
            else:  # the waiter left: its "C" crossed this grant
                self._free()
        elif kind == "L":  # answered at once, with the idle slots beyond the new lease
            self._lease = message[1]
            self._give_back(self._excess(), message[2])
        elif kind == "W":
            place = self._waiting.get(message[1])
            if place is not None:
                place._queued()
        elif kind == "X":
            _, ident, err_type, text, retry_after, state = message
            self._state(state)
            place = self._waiting.get(ident)
            if place is not None and place._refuse(decode_error(err_type, text, retry_after)):
                if err_type == errors.Overloaded.type:
                    self.rejected_full_total += 1
                elif err_type == errors.QueueTimeout.type:
                    self.rejected_timeout_total += 1
        elif kind == "S":
            self._state(message[1])
        elif kind == "Q":
            if self.channel is not None:
                self.channel.send(["M", message[1], self.snapshot()])
        elif kind == "P":
            fut2 = self._scrapes.get(message[1])
            if fut2 is not None and not fut2.done():
                fut2.set_result(message[2])
        elif kind == "O" or kind == "Y":
            if self.on_members is not None:
                self.on_members(message)
        elif kind == "b":
            fut3 = self._member_ops.get(message[1])
            if fut3 is not None and not fut3.done():
                fut3.set_result(message[2:])

    def _on_lost(self) -> None:
        # The supervisor is gone (it kills its workers when it exits): refuse from now on. The
        # slots went with it: it released them when the socket closed.
        self.channel = None
        self._closed = True
        self._lease = 0
        if self._report is not None:
            self._report.cancel()
            self._report = None
        for place in list(self._waiting.values()):
            place._refuse(ShuttingDown(retry_after=self._estimate))
