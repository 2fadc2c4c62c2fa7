"""The supervisor's side of the one admission shared by every worker (``proxy.shared_admission``).

``AdmissionCoordinator`` holds the ``Admission`` (the single-process class: FIFO, tenants,
priorities, queue timeout, 503s) and one channel per worker. An acquire that a free slot answers is
granted in the channel's callback, with no task; one that must wait becomes a task awaiting
``Admission.acquire``, cancelled when the worker says its waiter left, and the worker is told that
it waits ("W": its request drops what it need not hold while it does). The coordinator keeps, per
worker, the permits it holds and the acquires it waits on: a worker whose channel drops (it died)
has its waiters removed and its permits released at once.

It also answers a scrape: a worker asks for the others' metrics snapshots, the coordinator asks each
of them and forwards what comes back within the bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from vllm_gateway.errors import GatewayError
from vllm_gateway.proxy.admission import Admission, Place
from vllm_gateway.proxy.shared_admission import Channel

__all__ = ["AdmissionCoordinator"]

log = logging.getLogger("vllm_gateway.admission")

# How long a scrape waits for the other workers' snapshots.
_SCRAPE_TIMEOUT = 1.0
# How often the shared state is pushed to the workers when it changed without a grant.
_STATE_INTERVAL = 0.25


class _Worker:
    __slots__ = ("channel", "held", "name", "waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        self.channel: Channel | None = None
        self.held: dict[int, Place] = {}
        self.waiting: dict[int, asyncio.Task[None]] = {}


class AdmissionCoordinator:
    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.workers: list[_Worker] = []
        self._seq = itertools.count(1)
        self._scrapes: dict[int, tuple[_Worker, int, list[Any], int]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._last_state: list[Any] | None = None

    async def attach(self, sock: Any, name: str) -> _Worker:
        """Serve one worker on ``sock`` (the supervisor's end of its socket pair)."""
        worker = _Worker(name)
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
        if self._ticker is None:
            self._ticker = loop.create_task(self._push_state(), name="admission-state")
        return worker

    def state(self) -> list[Any]:
        adm = self.admission
        return [adm.in_flight, adm.queued, adm.limit, adm.estimate_wait()]

    def close(self) -> None:
        """Drain: waiters and later arrivals get 503 shutting_down."""
        self.admission.close()

    async def aclose(self) -> None:
        """Hang up on every worker; the state ticker and the acquires still waiting end here
        (cancelled and awaited), not with the loop."""
        tasks = [task for worker in self.workers for task in worker.waiting.values()]
        if self._ticker is not None:
            tasks.append(self._ticker)
            self._ticker = None
        for worker in list(self.workers):
            if worker.channel is not None:
                worker.channel.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- messages -------------------------------------------------------------------------------

    def _on_message(self, worker: _Worker, message: list[Any]) -> None:
        kind = message[0]
        if kind == "A":
            _, ident, tenant, priority = message
            self._acquire(worker, ident, tenant, priority)
        elif kind == "R":
            permit = worker.held.pop(message[1], None)
            if permit is not None:
                permit.release()
        elif kind == "C":
            ident = message[1]
            task = worker.waiting.pop(ident, None)
            if task is not None:
                task.cancel()
            permit = worker.held.pop(ident, None)
            if permit is not None:  # granted as the waiter left
                permit.release()
        elif kind == "Q":
            self._scrape(worker, message[1])
        elif kind == "M":
            self._snapshot(message[1], message[2])

    def _acquire(self, worker: _Worker, ident: int, tenant: str, priority: int) -> None:
        # The fast path: a free slot and nobody queued, answered in this callback.
        permit = self.admission.try_acquire()
        if permit is not None:
            worker.held[ident] = permit
            self._send(worker, ["G", ident, 0.0, self.state()])
            return
        task = asyncio.get_running_loop().create_task(self._wait(worker, ident, tenant, priority))
        worker.waiting[ident] = task
        self._send(worker, ["W", ident])  # it waits: the worker sheds what it need not hold

    async def _wait(self, worker: _Worker, ident: int, tenant: str, priority: int) -> None:
        try:
            permit = await self.admission.acquire(tenant=tenant, priority=priority)
        except GatewayError as err:
            worker.waiting.pop(ident, None)
            self._send(worker, ["X", ident, err.type, err.message, err.retry_after, self.state()])
            return
        except asyncio.CancelledError:
            return  # the worker's waiter left; Admission has taken it out of the queue
        worker.waiting.pop(ident, None)
        if worker.channel is None:  # the worker died while it waited
            permit.release()
            return
        worker.held[ident] = permit
        self._send(worker, ["G", ident, permit.queue_wait, self.state()])

    def _send(self, worker: _Worker, message: list[Any]) -> None:
        if worker.channel is not None:
            worker.channel.send(message)

    def _lost(self, worker: _Worker) -> None:
        worker.channel = None
        for task in worker.waiting.values():
            task.cancel()
        worker.waiting.clear()
        held, worker.held = worker.held, {}
        for permit in held.values():
            permit.release()
        if held:
            log.warning("worker %s left holding %d permit(s): released", worker.name, len(held))
        if worker in self.workers:
            self.workers.remove(worker)

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
