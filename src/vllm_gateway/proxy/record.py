"""The record of an ended request that observers (metrics, the access log, the status page,
tracing) read: ``CallRecord``, and ``Record``, its fields. ``ProxyCall`` is a ``Record`` that fills
them as its request goes; ``RejectedCall`` is the record of a request answered before a call
existed (401, 405, 408, 431, 503 while draining...).

Observers read a record once, when its request has ended (``Gateway.request_ended``), and never
change it; the status page also reads ``chunks`` of the calls in flight.

Times are ``time.perf_counter()`` values; None where the request never got that far.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from vllm_gateway import errors

__all__ = ["CallRecord", "Record", "RejectedCall"]


class CallRecord(Protocol):
    """Read-only: what an observer may look at."""

    @property
    def request_id(self) -> str: ...

    @property
    def upstream_id(self) -> str | None:
        """The id the gateway gives the request upstream (its own, never the client's); None for
        a request answered before a call existed."""

    @property
    def path(self) -> str: ...

    @property
    def status(self) -> int: ...

    @property
    def outcome(self) -> str: ...

    @property
    def model(self) -> str | None: ...

    @property
    def tenant(self) -> str | None: ...

    @property
    def stream(self) -> bool: ...

    @property
    def chunks(self) -> int: ...

    @property
    def started_at(self) -> float: ...

    @property
    def first_byte_at(self) -> float | None: ...

    @property
    def ended_at(self) -> float | None: ...

    @property
    def upstream_sent_at(self) -> float | None: ...

    @property
    def upstream_answered_at(self) -> float | None: ...

    @property
    def queue_wait(self) -> float: ...

    @property
    def overhead(self) -> float | None:
        """The gateway's own time for the request, in seconds (the ``X-Gateway-Overhead-Ms``
        header's value); None where the request ended without an answer that carried it."""

    @property
    def admitted(self) -> bool: ...

    @property
    def usage(self) -> bytes | dict[str, Any] | None: ...

    @property
    def served_by(self) -> str | None: ...

    @property
    def request_headers(self) -> list[tuple[bytes, bytes]]: ...

    @property
    def failovers(self) -> list[tuple[str, str]]:
        """(reason, outcome) of each mid-stream failover."""

    @property
    def members(self) -> list[str]:
        """The pool members the request used, in order, when it used several."""


class Record:
    """The fields of ``CallRecord``, as one request fills them; the base of ``ProxyCall`` (which
    fills them as the request goes) and of ``RejectedCall``. Slotted: the relay updates ``chunks``
    on every event, and a slot is the cheapest field there is. ``tenant``, ``upstream_id`` and
    ``served_by`` are each subclass's own: a call always has the first two, a refusal may not."""

    __slots__ = (
        "admitted",
        "chunks",
        "ended_at",
        "failovers",
        "first_byte_at",
        "members",
        "model",
        "outcome",
        "overhead",
        "path",
        "queue_wait",
        "request_headers",
        "request_id",
        "started_at",
        "status",
        "stream",
        "upstream_answered_at",
        "upstream_sent_at",
        "usage",
    )

    def __init__(self, request_id: str, path: str, started_at: float) -> None:
        self.request_id = request_id
        self.path = path
        self.started_at = started_at
        self.status = 0
        self.outcome = "unknown"
        self.model: str | None = None
        self.stream = False
        self.chunks = 0  # content events relayed
        self.admitted = False  # the request held an admission slot
        self.queue_wait = 0.0
        self.overhead: float | None = None  # what X-Gateway-Overhead-Ms said (relay.py)
        self.first_byte_at: float | None = None
        self.ended_at: float | None = None
        self.upstream_sent_at: float | None = None
        self.upstream_answered_at: float | None = None
        self.usage: bytes | dict[str, Any] | None = None  # the usage event(s), or object
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.failovers: list[tuple[str, str]] = []  # (reason, outcome) of each failover
        self.members: list[str] = []  # every member this request used, in order


class RejectedCall(Record):
    """A request the gateway answered before a ``ProxyCall`` existed."""

    __slots__ = ("served_by", "tenant", "upstream_id")

    def __init__(
        self, request_id: str, path: str, err: errors.GatewayError, started_at: float | None = None
    ) -> None:
        super().__init__(
            request_id, path, time.perf_counter() if started_at is None else started_at
        )
        self.status = err.status
        self.outcome = err.type
        self.tenant: str | None = None  # known once the request's key was
        self.upstream_id: str | None = None
        self.served_by: str | None = None
