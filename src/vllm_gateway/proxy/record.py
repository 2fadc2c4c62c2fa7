"""The record of an ended request that observers (metrics, the access log, the status page,
tracing) read: ``CallRecord``. ``ProxyCall`` is one; ``RejectedCall`` is the record of a request
answered before a call existed (401, 405, 408, 431, 503 while draining...).

Times are ``time.perf_counter()`` values; None where the request never got that far.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from vllm_gateway import errors

__all__ = ["CallRecord", "RejectedCall"]


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


class RejectedCall:
    """A request the gateway answered before a ``ProxyCall`` existed."""

    __slots__ = (
        "chunks",
        "ended_at",
        "failovers",
        "first_byte_at",
        "members",
        "model",
        "outcome",
        "path",
        "queue_wait",
        "request_headers",
        "request_id",
        "served_by",
        "started_at",
        "status",
        "stream",
        "tenant",
        "upstream_answered_at",
        "upstream_id",
        "upstream_sent_at",
        "usage",
    )

    admitted = False

    def __init__(
        self, request_id: str, path: str, err: errors.GatewayError, started_at: float | None = None
    ) -> None:
        self.request_id = request_id
        self.path = path
        self.status = err.status
        self.outcome = err.type
        self.started_at = time.perf_counter() if started_at is None else started_at
        self.first_byte_at: float | None = None
        self.ended_at: float | None = None
        self.upstream_sent_at: float | None = None
        self.upstream_answered_at: float | None = None
        self.upstream_id: str | None = None
        self.model: str | None = None
        self.tenant: str | None = None
        self.stream = False
        self.chunks = 0
        self.queue_wait = 0.0
        self.usage: bytes | None = None
        self.served_by: str | None = None
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.failovers: list[tuple[str, str]] = []
        self.members: list[str] = []
