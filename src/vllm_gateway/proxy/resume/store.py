"""The registry of keyed generations and their event logs: one protocol, the in-process store.

``Store.claim(scope, key, fingerprint)`` is the one way in: the first request for a key gets a
``Writer`` (it runs the generation) and a ``Reader``; a later one with the same body gets a
``Reader`` of the same log; one with another body gets a conflict. A writer is synchronous (the
generation never waits for its log); a reader's ``read`` waits at most the time it is given.

Events are numbered from 1 in the order the generation produced them; a reader asks for those
after a number (0: from the start). A log ends with its protocol's end marker or the generation's
error event (``ended``), or is ``lost`` (why: the budget cut it, nobody read it for the grace
period, the writer's replica vanished): a reader that gets ``lost`` without events stops there.

``LocalStore``'s invariants: ``used`` is the bytes of every log still registered or still read,
never above ``limit`` after an append; a byte is counted when appended and given back once, when
its entry has left the registry and has no reader. Past the budget, finished entries nobody reads
go first, oldest first (``evicted``); when that is not enough the generation that appends is cut
(``cut``: its readers get an error event, its upstream request is aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm_gateway.errors import Overloaded

__all__ = [
    "CUT",
    "STAT_EVENTS",
    "Batch",
    "Claim",
    "Head",
    "LocalStore",
    "Reader",
    "Store",
    "Writer",
    "transient",
]

# Why a log was lost when the budget could not keep it (a reader says "overloaded", not "lost").
CUT = "the gateway holds as many kept answers as its budget allows"

# What the stores count, by name (the metric's label values).
STAT_EVENTS = (
    "started",  # a generation began under a key
    "attached",  # a request read a generation already running
    "replayed",  # a request read a generation already finished
    "conflicts",  # a key came again with another body (422)
    "evicted",  # a finished entry left before its grace period, for the budget
    "expired",  # a finished entry left at the end of its grace period
    "abandoned",  # a generation nobody read for the grace period was stopped
    "cut",  # a running generation the budget could not keep was stopped
    "lost",  # a reader found its log gone (a replica vanished, an entry cut)
)


@dataclass(slots=True)
class Head:
    """How an answer starts: its status and headers, and for a whole answer (not a stream) its
    body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes | None = None


@dataclass(slots=True)
class Batch:
    """What a read found: the head once known, the events after the asked number, whether the log
    has ended, and why it was lost (None: it was not)."""

    head: Head | None
    events: list[tuple[int, bytes]] = field(default_factory=list)
    ended: bool = False
    lost: str | None = None


def transient(status: int) -> bool:
    """A whole answer worth asking again rather than keeping (the gateway or the backend was
    busy or failed): a retry with the key runs the request again."""
    return status in (408, 429) or status >= 500


class Writer(Protocol):
    """The generation's side of a log. ``on_abandon`` is called (once) when the log will take no
    more: the generation should stop."""

    on_abandon: Callable[[], None] | None

    def head(self, head: Head) -> None: ...

    def append(self, events: list[bytes], ended: bool) -> None: ...

    def close(self) -> None:
        """The generation's call ended; a log not ended by then is lost."""


class Reader(Protocol):
    async def read(self, after: int, timeout: float) -> Batch:
        """What the log holds after event ``after``, waiting up to ``timeout`` for something new
        when there is nothing yet."""

    def close(self) -> None:
        """This reader left (exactly once)."""


@dataclass(slots=True)
class Claim:
    reader: Reader | None = None
    writer: Writer | None = None  # set: this request runs the generation
    replayed: bool = False  # the generation had already finished
    missing: bool = False  # nothing is kept under the key, and the claim was not to create


class Store(Protocol):
    limit: int
    counts: dict[str, int]

    @property
    def used(self) -> int: ...

    @property
    def entries(self) -> int: ...

    async def claim(self, scope: str, key: str, fingerprint: str, create: bool = True) -> Claim:
        """The key's log; ``Claim()`` (nothing) when another body holds the key. A generation
        that was lost (its replica gone, cut, abandoned) runs again when ``create``; without
        ``create`` (a client resuming from an event) a key with nothing kept is ``missing``."""

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run a generation as a task the store owns (cancelled and awaited at ``aclose``)."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class Tasks:
    """The generations' tasks, owned by their store: each is awaited or cancelled at ``aclose``."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Entry:
    """One key's generation in this process: its head, its events, who reads it."""

    __slots__ = (
        "changed",
        "ended",
        "events",
        "fingerprint",
        "head",
        "key",
        "listed",
        "lost",
        "on_abandon",
        "readers",
        "size",
        "timer",
        "writing",
    )

    def __init__(self, key: tuple[str, str], fingerprint: str) -> None:
        self.key = key
        self.fingerprint = fingerprint
        self.head: Head | None = None
        self.events: list[bytes] = []
        self.ended = False
        self.lost: str | None = None
        self.size = 0  # bytes counted in the store's ``used``
        self.readers = 0
        self.writing = True  # the generation's call has not ended
        self.listed = True  # in the registry
        self.on_abandon: Callable[[], None] | None = None
        self.timer: asyncio.TimerHandle | None = None  # the grace period's, when one runs
        self.changed = asyncio.Event()  # set (and replaced) at every change

    @property
    def finished(self) -> bool:
        return self.ended or (self.head is not None and self.head.body is not None)

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def batch(self, after: int) -> Batch:
        events = self.events
        start = max(after, 0)
        return Batch(
            self.head,
            [(i + 1, events[i]) for i in range(start, len(events))],
            self.ended,
            self.lost,
        )


class _LocalWriter:
    __slots__ = ("_entry", "_store")

    def __init__(self, store: LocalStore, entry: _Entry) -> None:
        self._store = store
        self._entry = entry

    @property
    def on_abandon(self) -> Callable[[], None] | None:
        return self._entry.on_abandon

    @on_abandon.setter
    def on_abandon(self, callback: Callable[[], None] | None) -> None:
        self._entry.on_abandon = callback

    def head(self, head: Head) -> None:
        entry = self._entry
        if entry.lost is not None or entry.finished:
            return
        size = len(head.body or b"") + sum(len(k) + len(v) for k, v in head.headers)
        if not self._store.take(entry, size):
            return
        entry.head = head
        if head.body is not None:
            self._store.finished(entry, keep=not transient(head.status))
        entry.notify()

    def append(self, events: list[bytes], ended: bool) -> None:
        entry = self._entry
        if entry.lost is not None or entry.finished:
            return
        if not self._store.take(entry, sum(len(e) for e in events)):
            return
        entry.events.extend(events)
        if ended:
            entry.ended = True
            self._store.finished(entry, keep=True)
        entry.notify()

    def close(self) -> None:
        entry = self._entry
        entry.writing = False
        if not entry.finished and entry.lost is None:
            self._store.lose(entry, "the generation ended without an answer", "lost")
        self._store.settle(entry)


class _LocalReader:
    __slots__ = ("_closed", "_entry", "_store")

    def __init__(self, store: LocalStore, entry: _Entry) -> None:
        self._store = store
        self._entry = entry
        self._closed = False
        entry.readers += 1
        if entry.timer is not None and not entry.finished:
            entry.timer.cancel()  # a reader is back: the generation goes on
            entry.timer = None

    async def read(self, after: int, timeout: float) -> Batch:
        entry = self._entry
        changed = entry.changed
        batch = entry.batch(after)
        if batch.events or batch.ended or batch.lost or entry.finished:
            return batch
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await changed.wait()
        return entry.batch(after)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        entry = self._entry
        entry.readers -= 1
        if entry.readers == 0 and not entry.finished and entry.lost is None and entry.writing:
            # Nobody reads the generation: it goes on for the grace period, for a retry.
            self._store.wait_for_reader(entry)
        self._store.settle(entry)


class LocalStore(Tasks):
    """Keyed generations kept in this process's memory, within ``limit`` bytes, each finished one
    for ``grace`` seconds."""

    def __init__(self, limit: int, grace: float) -> None:
        super().__init__()
        self.limit = limit
        self.grace = grace
        self.counts = dict.fromkeys(STAT_EVENTS, 0)
        self._used = 0
        self._entries: dict[tuple[str, str], _Entry] = {}
        # Finished entries in the order they finished: the first to evict.
        self._finished: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    @property
    def used(self) -> int:
        return self._used

    @property
    def entries(self) -> int:
        return len(self._entries)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        await self.cancel_all()
        for entry in list(self._entries.values()):
            self._unlist(entry)

    async def claim(self, scope: str, key: str, fingerprint: str, create: bool = True) -> Claim:
        name = (scope, key)
        entry = self._entries.get(name)
        if entry is not None and entry.lost is not None:
            self._unlist(entry)  # a lost generation is run again
            entry = None
        if entry is None and not create:
            return Claim(missing=True)
        if entry is None:
            if not self._room(1):
                raise Overloaded(f"{CUT}; retry later.", retry_after=1.0)
            entry = self._entries[name] = _Entry(name, fingerprint)
            self.counts["started"] += 1
            return Claim(_LocalReader(self, entry), _LocalWriter(self, entry))
        if entry.fingerprint != fingerprint:
            self.counts["conflicts"] += 1
            return Claim()
        replayed = entry.finished
        self.counts["replayed" if replayed else "attached"] += 1
        return Claim(_LocalReader(self, entry), replayed=replayed)

    # --- the budget and the grace period ---------------------------------------------------

    def _room(self, n: int) -> bool:
        """Whether ``n`` more bytes fit, after evicting finished entries nobody reads, oldest
        first, as far as needed."""
        if self._used + n > self.limit:
            for other in list(self._finished.values()):
                if self._used + n <= self.limit:
                    break
                if other.readers == 0:
                    self.counts["evicted"] += 1
                    self._unlist(other)
        return self._used + n <= self.limit

    def take(self, entry: _Entry, n: int) -> bool:
        """Count ``n`` more bytes of ``entry``'s log (``_room``); when they do not fit, cut
        ``entry`` (False)."""
        if not self._room(n):
            self.lose(entry, CUT, "cut")
            return False
        self._used += n
        entry.size += n
        return True

    def finished(self, entry: _Entry, keep: bool) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if not keep:  # answered to the readers it has; a retry runs it again
            self._unlist(entry)
            return
        self._finished[entry.key] = entry
        entry.timer = asyncio.get_running_loop().call_later(self.grace, self._expire, entry)

    def _expire(self, entry: _Entry) -> None:
        entry.timer = None
        if entry.listed:
            self.counts["expired"] += 1
            self._unlist(entry)

    def wait_for_reader(self, entry: _Entry) -> None:
        entry.timer = asyncio.get_running_loop().call_later(self.grace, self._abandon, entry)

    def _abandon(self, entry: _Entry) -> None:
        entry.timer = None
        if entry.readers == 0 and not entry.finished and entry.lost is None:
            self.lose(entry, "nobody read the generation for the grace period", "abandoned")

    def lose(self, entry: _Entry, why: str, count: str) -> None:
        """The log will take nothing more: its readers stop, its generation is stopped."""
        entry.lost = why
        self.counts[count] += 1
        self._unlist(entry)
        entry.notify()
        callback, entry.on_abandon = entry.on_abandon, None
        if callback is not None and entry.writing:
            callback()

    def _unlist(self, entry: _Entry) -> None:
        if entry.listed:
            entry.listed = False
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
            self._finished.pop(entry.key, None)
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        self.settle(entry)

    def settle(self, entry: _Entry) -> None:
        """Give back an entry's bytes once nothing can read them: out of the registry, no
        reader, no writer."""
        if not entry.listed and entry.readers == 0 and entry.size:
            self._used -= entry.size
            entry.size = 0
            entry.events = []
