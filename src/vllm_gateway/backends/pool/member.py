"""One member of a pool: its backend and the state the pool routes, retries and checks health on.

A ``Member`` wraps one ``HTTPBackend`` with the state the pool routes on: requests in flight, when
its in-flight requests last produced a byte (the watchdog reads it), whether it is up, its
consecutive failures and its error counters. It is touched only from the event loop, so plain
attributes need no lock.

Its lifecycle ``state`` (docs/pool.md): ``joining`` (added; no traffic until its health check and
model list succeed), ``ready`` (takes requests; ramping up while ``ramp_until`` is ahead),
``draining`` (no new requests; its in-flight ones finish there until ``drain_at``), ``ejected``
(out after failures; back through the health checks) and ``gone`` (left the pool). ``up`` is True
exactly in ``ready``: routing reads that plain attribute, so the states cost the hot path nothing.

Invariants: ``in_flight`` goes up in ``begin()`` and down in ``end()`` exactly once per attempt;
``up`` is False from an ejection until a health check (and, after a watchdog ejection, a canary)
passes once ``readmit_at`` has come; counters only grow; ``state`` changes only through the
methods here (``admit``, ``eject``, ``readmit``, ``drain``, ``undrain``, ``leave``).

Who changes it: ``acquire.py`` takes and gives back its slot (``begin``/``end``); ``fleet.py`` counts
failures and ejects it; ``health.py`` checks it, readmits it and refreshes ``models``; ``retry.py``
and ``response.py`` mark ``progress`` and ``success``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vllm_gateway.backends.base import Backend, BackendStats
from vllm_gateway.backends.pool.config import BackendSpec, PoolConfig
from vllm_gateway.backends.pool.engine_metrics import EngineGauges

if TYPE_CHECKING:
    from vllm_gateway.backends.pool.cache_index import MemberCache

__all__ = ["Member"]


class Member:
    __slots__ = (
        "backend",
        "base_weight",
        "cache",
        "consecutive_failures",
        "declared_models",
        "down_reason",
        "drain_at",
        "ejection_streak",
        "ejections",
        "engine",
        "errors",
        "health_failures",
        "in_flight",
        "kv_events",
        "last_progress",
        "leaving",
        "limit",
        "models",
        "name",
        "notify",
        "pending",
        "ramp_from",
        "ramp_until",
        "readmit_at",
        "requests",
        "retries",
        "source",
        "spec",
        "state",
        "state_since",
        "streams",
        "up",
        "url",
        "weight",
    )

    def __init__(
        self,
        spec: BackendSpec,
        config: PoolConfig,
        backend: Backend,
    ) -> None:
        self.spec = spec
        self.source = "start"  # where it came from: start, file, admin, dns (``Fleet.reconcile``)
        self.notify: Callable[[Member], None] | None = None  # told each state change (the fleet)
        self.url = spec.url
        self.name = spec.name or spec.url
        self.weight = self.base_weight = spec.weight
        self.limit = (
            spec.max_outstanding if spec.max_outstanding is not None else config.max_outstanding
        )
        self.declared_models = spec.models
        self.models: frozenset[str] | None = frozenset(spec.models) if spec.models else None
        self.backend = backend
        self.in_flight = 0
        self.last_progress = time.monotonic()
        self.up = True
        self.state = "ready"  # a member of the pool's first set; one added later starts joining
        self.state_since = time.monotonic()
        self.ramp_from = 0.0  # slow start: the weight ramps from ramp_from to ramp_until
        self.ramp_until = 0.0
        self.drain_at = 0.0  # draining: when its streams still here are moved elsewhere
        self.leaving = False  # draining to leave the pool (removed), not to come back (drained)
        self.down_reason: str | None = None
        self.readmit_at = 0.0
        self.ejection_streak = 0  # ejections since the member last completed a request
        self.consecutive_failures = 0
        self.health_failures = 0
        self.errors: Counter[str] = Counter()
        self.ejections = 0
        self.requests = 0
        self.retries = 0
        # Attempts still waiting for their first byte; an ejection cancels them so they can retry.
        self.pending: set[Any] = set()
        # Responses streaming from it now: an ejection drops them (they may go on elsewhere).
        self.streams: set[Any] = set()
        # cache_aware routing: what it holds (cache_index.py) and what its engine says.
        self.cache: MemberCache | None = None
        self.engine = EngineGauges()
        self.kv_events = spec.kv_events

    # --- accounting ------------------------------------------------------------------------

    def begin(self) -> None:
        if self.in_flight == 0:
            self.last_progress = time.monotonic()  # the stall clock starts with the first request
        self.in_flight += 1
        self.requests += 1

    def end(self) -> None:
        self.in_flight -= 1

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def success(self) -> None:
        self.consecutive_failures = 0
        self.ejection_streak = 0

    def failure(self, kind: str, threshold: int) -> bool:
        """Count a failure; True when it makes ``threshold`` in a row (the caller ejects)."""
        self.errors[kind] += 1
        self.consecutive_failures += 1
        return self.up and self.consecutive_failures >= threshold

    def _become(self, state: str) -> None:
        changed = state != self.state
        self.state = state
        self.state_since = time.monotonic()
        self.up = state == "ready"
        if changed and self.notify is not None:
            self.notify(self)

    def join(self) -> None:
        """A member added at run time: no traffic until ``admit``."""
        self._become("joining")
        self.down_reason = "joining"

    def admit(self, slow_start: float) -> None:
        """Its health check and model list succeeded: ready, its weight ramping over
        ``slow_start`` seconds (``ramp``, from the health loop)."""
        self.readmit()
        now = time.monotonic()
        if slow_start > 0:
            self.ramp_from, self.ramp_until = now, now + slow_start
            self.ramp(now)

    def ramp(self, now: float) -> None:
        """Slow start: the weight grows with the time since admission, from a tenth to whole."""
        if now >= self.ramp_until:
            self.weight = self.base_weight
            self.ramp_until = 0.0
            return
        span = self.ramp_until - self.ramp_from
        self.weight = self.base_weight * max(0.1, (now - self.ramp_from) / span)

    def drain(self, deadline: float, *, leaving: bool) -> None:
        """No new requests from now; the ones in flight may finish here until ``deadline``."""
        self.leaving = self.leaving or leaving
        if self.state != "draining":
            self.drain_at = deadline
            self._become("draining")
            self.down_reason = "draining"

    def undrain(self) -> None:
        """Back from draining: ready again (after a health check when it was ejected first)."""
        self.leaving = False
        self.readmit()

    def leave(self) -> None:
        """Out of the pool for good."""
        self._become("gone")
        self.down_reason = "gone"

    def eject(self, reason: str, config: PoolConfig) -> None:
        if not self.up:
            return
        self._become("ejected")
        self.down_reason = reason
        self.ejections += 1
        self.ejection_streak += 1
        backoff = config.readmit_backoff * (2 ** (self.ejection_streak - 1))
        self.readmit_at = time.monotonic() + min(backoff, config.readmit_backoff_max)
        for task in list(self.pending):
            task.cancel()  # pre-first-byte attempts on this member move elsewhere

    def readmit(self) -> None:
        self._become("ready")
        self.down_reason = None
        self.consecutive_failures = 0
        self.health_failures = 0
        self.last_progress = time.monotonic()

    # --- routing inputs --------------------------------------------------------------------

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models

    def has_room(self) -> bool:
        return self.limit is None or self.in_flight < self.limit

    def load(self) -> float:
        return self.in_flight / self.weight

    def stats(self) -> BackendStats:
        return {
            "name": self.name,
            "url": self.url,
            "weight": self.weight,
            "state": self.state,
            "in_flight": self.in_flight,
            "max_outstanding": self.limit,
            "healthy": self.up,
            "down_reason": self.down_reason,
            "errors": dict(self.errors),
            "ejections": self.ejections,
            "requests": self.requests,
            "retries": self.retries,
            "models": sorted(self.models) if self.models is not None else None,
        }
