"""The pool's retry budget: how many requests may move to another member.

Invariants: retries in the last ``window`` seconds are at most ``ratio`` of the requests in it (or
``minimum``), so that when every member fails at once retries do not multiply the load.
"""

from __future__ import annotations

import math
import time
from collections import deque

__all__ = ["RetryBudget"]


class RetryBudget:
    """Retries allowed: at most ``ratio`` of the requests of the last ``window`` seconds (or ``min``).

    A budget keeps retries from multiplying load when every member is failing at once.
    """

    def __init__(self, ratio: float, minimum: int, window: float) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.window = window
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.exhausted = 0

    def _trim(self, now: float) -> None:
        edge = now - self.window
        for q in (self._requests, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def request(self) -> None:
        self._requests.append(time.monotonic())

    def try_retry(self) -> bool:
        now = time.monotonic()
        self._trim(now)
        allowed = max(self.minimum, math.floor(self.ratio * len(self._requests)))
        if len(self._retries) >= allowed:
            self.exhausted += 1
            return False
        self._retries.append(now)
        return True
