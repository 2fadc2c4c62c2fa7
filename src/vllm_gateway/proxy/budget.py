"""The process's budget for buffered bodies: request bodies and non-streamed backend answers.

Shared by the HTTP server (request bodies, counted as they arrive) and the proxy call (backend
answers it must hold whole before relaying them). Every ``take`` that succeeds is matched by one
``give``; ``used`` is back to 0 when nothing is held.
"""

from __future__ import annotations

__all__ = ["BufferBudget"]


class BufferBudget:
    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n
