"""Counters of what the HTTP server did to client connections, read by the metrics at scrape time."""

from __future__ import annotations

__all__ = ["ConnectionStats"]


class ConnectionStats:
    __slots__ = (
        "accepted",
        "body_timeouts",
        "budget_refusals",
        "header_timeouts",
        "headers_too_large",
        "idle_closed",
        "malformed",
        "open",
        "refused",
        "send_timeouts",
    )

    # The counters that are events (``open`` is a level).
    EVENTS = (
        "accepted",
        "refused",
        "header_timeouts",
        "body_timeouts",
        "idle_closed",
        "send_timeouts",
        "headers_too_large",
        "malformed",
        "budget_refusals",
    )

    def __init__(self) -> None:
        self.open = 0  # connections open now
        self.accepted = 0
        self.refused = 0  # over max_connections
        self.header_timeouts = 0
        self.body_timeouts = 0
        self.idle_closed = 0
        self.send_timeouts = 0
        self.headers_too_large = 0
        self.malformed = 0
        self.budget_refusals = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}
