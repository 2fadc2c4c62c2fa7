"""The supervisor's side of the one admission shared by every worker (``proxy.shared_admission``).

``AdmissionCoordinator`` holds the ``Admission`` (the single-process class: FIFO, tenants,
priorities, queue timeout, 503s) and one channel per worker. An ask takes its place in the
``Admission`` in the channel's callback, so the order of asks is the order of the queue; one that a
free slot answers is granted there, with no task; one that must wait becomes a task awaiting its
``Ticket``, cancelled when the worker says its waiter left, and the worker is told that it waits
("W": its request drops what it need not hold while it does).

Every slot granted to a worker is one of the ``Admission``'s permits, kept in that worker's list
until it gives the slot back ("R") or its channel drops (it died): then all of them are released at
once, the same release. While nobody is queued, a worker keeps up to ``lease`` of its slots idle
and admits into them without asking; the moment an ask queues, the lease becomes 0 and every worker
is told ("L") before that asker hears "W", and it stays 0 until the queue is empty again (and for
good after ``close``). An ask that would be refused while a recall is unanswered is deferred, with
every ask after it, until each worker has answered (1 s at most). See shared_admission.py for why
that keeps the limit, the order and the 503s exact.

It also answers a scrape: a worker asks for the others' metrics snapshots, the coordinator asks each
of them and forwards what comes back within the bound.

And it shares the admin API's member changes (``edge/admin.py``): a worker forwards one ("B"),
the coordinator numbers it, notes it in ``MemberChanges`` and sends it ("O") to every live
worker, the asker too, in one order; the asker hears back ("b") once every one of them answered
or ``MEMBER_WAIT`` passed, whichever is first (a worker that dies meanwhile is not waited for). A
worker that starts later (a restart) is sent the changes noted so far before anything else, so
it does not bring back a member that was drained or removed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from vllm_gateway.errors import GatewayError
from vllm_gateway.proxy.admission import Admission, Permit, Ticket
from vllm_gateway.proxy.shared_admission import MEMBER_WAIT, Channel

__all__ = ["MEMBER_WAIT", "AdmissionCoordinator", "MemberChanges"]

log = logging.getLogger("vllm_gateway.admission")

# How long a scrape waits for the other workers' snapshots.
_SCRAPE_TIMEOUT = 1.0
# How often the shared state is pushed to the workers when it changed without a grant.
_STATE_INTERVAL = 0.25
# The most idle slots one worker keeps while nobody is queued. All workers together keep at most
# half the limit idle, so an ask from any of them usually finds a free slot without a recall.
_LEASE = 32
# How long a deferred ask waits for the workers' answers to a recall (a worker whose loop is stuck
# cannot hold the others' asks): then it is taken as the admission stands.
_RECALL_WAIT = 1.0


class MemberChanges:
    """The admin-made state of the pool's members, as a new worker must replay it: per URL the
    last word (added, added then drained, drained, removed), in the order they were said. An
    undrain of a member the sources gave, or a removal of one the admin API added, leaves
    nothing to replay. At most ``cap`` URLs (twice the member cap): the oldest is forgotten."""

    def __init__(self, cap: int) -> None:
        self.cap = max(1, cap)
        self._state: dict[str, str] = {}  # url -> "add", "add+drain", "drain" or "remove"

    def note(self, op: str, url: str) -> None:
        was = self._state.pop(url, None)
        added = was in ("add", "add+drain")
        now: str | None
        if op == "add":
            now = "add"
        elif op == "drain":
            now = "add+drain" if added else "drain"
        elif op == "undrain":
            now = "add" if added else None
        elif op == "remove":
            now = None if added else "remove"
        else:
            now = was
        if now is not None:
            self._state[url] = now
            while len(self._state) > self.cap:
                del self._state[next(iter(self._state))]

    def replay(self) -> list[tuple[str, str]]:
        """The (op, url) a new worker applies to its fresh pool, in order."""
        ops: list[tuple[str, str]] = []
        for url, state in self._state.items():
            if state.startswith("add"):
                ops.append(("add", url))
            if state.endswith("drain"):
                ops.append(("drain", url))
            if state == "remove":
                ops.append(("remove", url))
        return ops


class _Broadcast:
    __slots__ = ("applied", "asker", "error", "of", "seq", "waiting")

    def __init__(self, asker: _Worker, seq: int, waiting: set[_Worker]) -> None:
        self.asker = asker
        self.seq = seq
        self.waiting = waiting  # the live workers that have not answered yet
        self.of = len(waiting)
        self.applied = 0
        self.error: str | None = None  # what it did to the asker's pool


class _Worker:
    __slots__ = ("acked", "channel", "idle", "name", "reported_at", "slots", "waiting")

    def __init__(self, name: str, acked: int) -> None:
        self.name = name
        self.channel: Channel | None = None
        self.slots: list[Permit | Ticket] = []  # granted to it, not given back: busy or idle
        self.idle = 0  # how many of them it last said no request holds
        self.acked = acked  # the last lease change it answered
        self.reported_at = time.monotonic()  # when its last "I" came
        self.waiting: dict[int, asyncio.Task[None]] = {}


class AdmissionCoordinator:
    def __init__(self, admission: Admission, lease: int = _LEASE, member_cap: int = 64) -> None:
        self.admission = admission
        self.members = MemberChanges(2 * member_cap)
        self._broadcasts: dict[int, _Broadcast] = {}
        self.workers: list[_Worker] = []
        self._lease_max = lease
        self._lease = 0  # the lease every worker was last told
        self._lease_seq = 0  # lease changes told, counted
        self._recall_seq = 0  # the last one that shrank it: idle slots may be on their way back
        # Asks that arrived while leased slots were on their way back and would have been refused
        # (or would have evicted a waiter) without them: taken in order once every worker answered.
        self._deferred: dict[tuple[int, int], tuple[_Worker, int, str, int]] = {}
        self._deferred_timer: asyncio.TimerHandle | None = None
        self._seq = itertools.count(1)
        self._scrapes: dict[int, tuple[_Worker, int, list[Any], int]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._last_state: list[Any] | None = None

    async def attach(self, sock: Any, name: str) -> _Worker:
        """Serve one worker on ``sock`` (the supervisor's end of its socket pair)."""
        worker = _Worker(name, self._lease_seq)
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_connection(
            lambda: Channel(
                lambda message: self._on_message(worker, message), lambda: self._lost(worker)
            ),
            sock=sock,
        )
        worker.channel = channel
        self.workers.append(worker)
        channel.send(["S", self.state()])
        channel.send(["L", self._lease, self._lease_seq])
        for op, url in self.members.replay():
            channel.send(["O", 0, op, url])
        channel.send(["Y"])
        self._set_lease()
        if self._ticker is None:
            self._ticker = loop.create_task(self._push_state(), name="admission-state")
        return worker

    def state(self) -> list[Any]:
        adm = self.admission
        # Requests in flight: the permits, less the idle slots the workers hold as leases.
        idle = sum(min(w.idle, len(w.slots)) for w in self.workers)
        return [adm.in_flight - idle, adm.queued, adm.limit, adm.estimate_wait()]

    def close(self) -> None:
        """Drain: waiters and later arrivals get 503 shutting_down, and the leases end."""
        self.admission.close()
        self._take_deferred()
        self._set_lease()

    async def aclose(self) -> None:
        """Hang up on every worker; the state ticker and the acquires still waiting end here
        (cancelled and awaited), not with the loop."""
        tasks = [task for worker in self.workers for task in worker.waiting.values()]
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None
        if self._ticker is not None:
            tasks.append(self._ticker)
            self._ticker = None
        for worker in list(self.workers):
            if worker.channel is not None:
                worker.channel.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- leases ---------------------------------------------------------------------------------

    def _set_lease(self) -> None:
        """The lease follows the queue: 0 while anyone waits (or once draining), else a small
        share of the limit. Called after everything that can start or end a queue."""
        adm = self.admission
        if adm.queued or self._deferred or adm.closed or not self.workers:
            size = 0
        else:
            size = min(self._lease_max, adm.limit // (2 * len(self.workers)))
        if size != self._lease:
            self._lease_seq += 1
            if size < self._lease:
                self._recall_seq = self._lease_seq
            self._lease = size
            for worker in self.workers:
                self._send(worker, ["L", size, self._lease_seq])

    def _recalling(self) -> bool:
        """Some worker has not yet answered the last shrinking of the lease."""
        return any(w.acked < self._recall_seq for w in self.workers if w.channel is not None)

    def _take_deferred(self, overdue: bool = False) -> None:
        """Every leased slot that was coming back has (or the gateway is closing, or the wait
        is over): the deferred asks take their places, in the order they came."""
        while self._deferred and (overdue or self.admission.closed or not self._recalling()):
            worker, ident, tenant, priority = self._deferred.pop(next(iter(self._deferred)))
            self._admit(worker, ident, tenant, priority)
        if not self._deferred and self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None

    def _recall_overdue(self) -> None:
        self._deferred_timer = None
        self._take_deferred(overdue=True)
        self._set_lease()

    def _give_back(self, worker: _Worker, n: int) -> None:
        """Release ``n`` of the worker's slots: the one release, whether it gave them back or
        died holding them. A freed permit passes straight to the queue's next waiter."""
        slots = worker.slots
        for _ in range(min(n, len(slots))):
            slots.pop().release()

    # --- messages -------------------------------------------------------------------------------

    def _on_message(self, worker: _Worker, message: list[Any]) -> None:
        kind = message[0]
        if kind == "A":
            _, ident, tenant, priority = message
            self._acquire(worker, ident, tenant, priority)
        elif kind == "R":
            _, n, worker.idle = message
            self._give_back(worker, n)
            self._set_lease()
        elif kind == "L":  # the answer to a lease change, with the idle slots it gave back
            _, n, worker.idle, worker.acked = message
            self._give_back(worker, n)
            self._take_deferred()
            self._set_lease()
        elif kind == "I":
            _, worker.idle, released = message
            now = time.monotonic()
            self.admission.note_releases(released, now - worker.reported_at)
            worker.reported_at = now
        elif kind == "C":
            task = worker.waiting.pop(message[1], None)
            if task is not None:
                task.cancel()  # its ticket leaves the queue when the task ends
            elif self._deferred.pop((id(worker), message[1]), None) is not None:
                self._take_deferred()
                self._set_lease()
        elif kind == "Q":
            self._scrape(worker, message[1])
        elif kind == "M":
            self._snapshot(message[1], message[2])
        elif kind == "B":
            self._share(worker, message[1], message[2], message[3])
        elif kind == "o":
            self._applied(worker, message[1], message[2])

    def _acquire(self, worker: _Worker, ident: int, tenant: str, priority: int) -> None:
        adm = self.admission
        if self._deferred or (
            not adm.closed
            and adm.in_flight >= adm.limit
            and adm.queued >= adm.max_queued
            and (self._lease or self._recalling())
        ):
            # A refusal now might be one a single process would not give: leased slots may be
            # idle or on their way back. Recall them, and take this ask (and any after it) once
            # every worker has answered.
            self._deferred[(id(worker), ident)] = (worker, ident, tenant, priority)
            if self._deferred_timer is None:
                self._deferred_timer = asyncio.get_running_loop().call_later(
                    _RECALL_WAIT, self._recall_overdue
                )
            self._set_lease()
            return
        self._admit(worker, ident, tenant, priority)

    def _admit(self, worker: _Worker, ident: int, tenant: str, priority: int) -> None:
        try:
            place = self.admission.arrive(tenant, priority)
        except GatewayError as err:
            self._send(worker, ["X", ident, err.type, err.message, err.retry_after, self.state()])
            return
        if isinstance(place, Permit):  # a free slot and nobody queued: answered here
            worker.slots.append(place)
            self._send(worker, ["G", ident, 0.0, self.state()])
            return
        task = asyncio.get_running_loop().create_task(self._wait(worker, ident, place))
        worker.waiting[ident] = task
        self._set_lease()  # a queue formed: every lease ends, before the asker hears "W"
        self._send(worker, ["W", ident])  # it waits: the worker sheds what it need not hold

    async def _wait(self, worker: _Worker, ident: int, ticket: Ticket) -> None:
        try:
            await ticket.wait()
        except GatewayError as err:
            ticket.release()
            worker.waiting.pop(ident, None)
            self._send(worker, ["X", ident, err.type, err.message, err.retry_after, self.state()])
            self._set_lease()
            return
        except asyncio.CancelledError:
            ticket.release()  # the worker's waiter left: out of the queue (or the slot passes on)
            self._set_lease()
            return
        worker.waiting.pop(ident, None)
        if worker.channel is None:  # the worker died as the slot reached it
            ticket.release()
            return
        worker.slots.append(ticket)
        self._send(worker, ["G", ident, ticket.queue_wait, self.state()])

    def _send(self, worker: _Worker, message: list[Any]) -> None:
        if worker.channel is not None:
            worker.channel.send(message)

    def _lost(self, worker: _Worker) -> None:
        worker.channel = None
        for task in worker.waiting.values():
            task.cancel()
        worker.waiting.clear()
        for key in [key for key in self._deferred if key[0] == id(worker)]:
            del self._deferred[key]
        held = len(worker.slots)
        self._give_back(worker, held)
        if held:
            log.warning("worker %s left holding %d slot(s): released", worker.name, held)
        if worker in self.workers:
            self.workers.remove(worker)
        for sid, cast in list(self._broadcasts.items()):
            cast.waiting.discard(worker)
            if not cast.waiting:
                self._finish_broadcast(sid)
        self._take_deferred()
        self._set_lease()

    async def _push_state(self) -> None:
        while True:
            await asyncio.sleep(_STATE_INTERVAL)
            state = self.state()
            if state != self._last_state:
                self._last_state = state
                for worker in self.workers:
                    self._send(worker, ["S", state])

    # --- metrics across workers -----------------------------------------------------------------

    def _scrape(self, asker: _Worker, seq: int) -> None:
        others = [w for w in self.workers if w is not asker and w.channel is not None]
        if not others:
            self._send(asker, ["P", seq, []])
            return
        mine = next(self._seq)
        self._scrapes[mine] = (asker, seq, [], len(others))
        for worker in others:
            self._send(worker, ["Q", mine])
        asyncio.get_running_loop().call_later(_SCRAPE_TIMEOUT, self._finish_scrape, mine)

    def _snapshot(self, mine: int, snapshot: Any) -> None:
        entry = self._scrapes.get(mine)
        if entry is None:
            return  # too late: the scrape went without it
        entry[2].append(snapshot)
        if len(entry[2]) == entry[3]:
            self._finish_scrape(mine)

    def _finish_scrape(self, mine: int) -> None:
        entry = self._scrapes.pop(mine, None)
        if entry is not None:
            asker, seq, snapshots, _ = entry
            self._send(asker, ["P", seq, snapshots])

    # --- member changes across workers ----------------------------------------------------------

    def _share(self, asker: _Worker, seq: int, op: str, url: str) -> None:
        self.members.note(op, url)
        sid = next(self._seq)
        live = {w for w in self.workers if w.channel is not None}
        self._broadcasts[sid] = _Broadcast(asker, seq, live)
        for worker in self.workers:
            self._send(worker, ["O", sid, op, url])
        asyncio.get_running_loop().call_later(MEMBER_WAIT, self._finish_broadcast, sid)

    def _applied(self, worker: _Worker, sid: int, error: str | None) -> None:
        cast = self._broadcasts.get(sid)
        if cast is None or worker not in cast.waiting:
            return  # too late: the asker has its answer
        cast.waiting.discard(worker)
        cast.applied += 1
        if worker is cast.asker:
            cast.error = error
        if not cast.waiting:
            self._finish_broadcast(sid)

    def _finish_broadcast(self, sid: int) -> None:
        cast = self._broadcasts.pop(sid, None)
        if cast is not None:
            self._send(cast.asker, ["b", cast.seq, cast.applied, cast.of, cast.error])
