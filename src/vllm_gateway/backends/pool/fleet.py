"""The set of members a pool routes over: who is in it, who joins and leaves, and ejection.

``Fleet`` owns the pool's ``Member`` objects. Everything that works on "the members" (acquisition,
routing, retries, health, cache-aware routing, the fan-outs) holds the fleet, not a list, and reads
``fleet.members`` when it needs them: this is the one place where the set is kept.

Membership changes at run time through a small API, the same for every source (the backends
file, the admin API, DNS discovery): ``add``, ``remove``, ``drain``, ``undrain``, ``reconcile``
(make one source's members this set) and ``describe``. A member's lifecycle (``member.py``):

- ``add``: it is built and its client started, then ``joining``: it gets no traffic until the
  health loop (``health.py``) finds its ``/health`` passing and knows its model list; then
  ``ready``, its weight ramping over ``pool_slow_start`` seconds so a cold member is not flooded;
- ``drain``/``remove``: ``draining``: no new requests; those in flight finish there until
  ``pool_drain_timeout``, then its streams are dropped and go on elsewhere by the token-exact
  continuation (as when a member dies first); a removed member then leaves (``gone``) once nothing
  is in flight on it, and its client is closed; ``undrain`` (or adding it again) sends a draining
  member back through ``joining``;
- ``fail`` counts a member's failure and ejects it at ``eject_after_failures`` in a row. ``eject``
  takes it out (``ejected``): ``Member.eject`` sets its readmission backoff and cancels the
  attempts still waiting for its first byte (they move to another member, ``retry.py``), its live
  streams are dropped at once (``abandon``: they may fail over), and the ``on_leave`` listeners
  are told (cache-aware routing forgets what it held: it comes back cold). A member comes back
  through the health checks.

``tend`` (each tick of the health loop) does the time-driven part: the ramps, drain deadlines and
departures. No request pays for any of this: routing reads ``Member.up`` and ``Member.weight``,
plain attributes that only these transitions and ``tend`` write.

Invariants: ``members`` is replaced whole on each change, never changed in place, so a caller
iterating an old list is safe; it holds at most ``pool_max_members`` members (``add`` beyond it
raises ``FleetFull``); URLs are unique in it; an ejection of a member that is already out does
nothing, so each ejection is counted, announced and acted on once; a member is gone (and its
client closed) exactly once; ``gone`` keeps the last ``GONE_KEPT`` departed members for the
status page and metrics, no more.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from vllm_gateway.backends.pool.config import BackendSpec, PoolConfig
from vllm_gateway.backends.pool.member import Member

__all__ = ["GONE_KEPT", "Fleet", "FleetFull"]

# The pool's comings and goings share one logger name (health.py's too): what operators filter on.
log = logging.getLogger("vllm_gateway.backends.pool.backend")

GONE_KEPT = 16  # departed members still described (state "gone")


class FleetFull(ValueError):
    """The pool holds ``pool_max_members`` members already."""


class Fleet:
    def __init__(
        self,
        members: list[Member],
        config: PoolConfig,
        make: Callable[[BackendSpec], Member] | None = None,
    ) -> None:
        self.members = members
        self.config = config
        self._make = make  # builds a member for a spec (its backend not started)
        self.on_state: list[Callable[[Member], None]] = []  # a member's state changed (logs)
        for m in members:
            m.notify = self._state_changed
        self.on_leave: list[Callable[[Member], None]] = []  # each called when a member is ejected
        self.on_join: list[Callable[[Member], None]] = []  # a member was added (before routing)
        self.on_ready: list[Callable[[], None]] = []  # a member became ready (waiters re-check)
        self.on_gone: list[Callable[[Member], None]] = []  # a member left the pool
        self.gone: deque[Member] = deque(maxlen=GONE_KEPT)
        self.changes = 0  # membership changes (adds, removals, drains, undrains)

    def up(self) -> list[Member]:
        return [m for m in self.members if m.up]

    def find(self, url: str) -> Member:
        """The member at ``url`` (or named so); ``KeyError`` when there is none."""
        url = url.rstrip("/")
        for m in self.members:
            if m.url == url or m.name == url:
                return m
        raise KeyError(url)

    # --- failures --------------------------------------------------------------------------

    def fail(self, member: Member, kind: str) -> None:
        if member.failure(kind, self.config.eject_after_failures):
            self.eject(member, "failures")

    def eject(self, member: Member, reason: str) -> None:
        if not member.up:
            return
        member.eject(reason, self.config)
        for listener in self.on_leave:
            listener(member)
        for stream in list(member.streams):
            stream.abandon()
        left = sum(m.up for m in self.members)
        log.warning(
            "backend %s ejected (%s; errors %s); %d of %d backends left",
            member.name,
            reason,
            dict(member.errors),
            left,
            len(self.members),
        )

    # --- membership ------------------------------------------------------------------------

    async def add(self, url: str | BackendSpec, source: str = "admin") -> Member:
        """Add a member (``joining`` until its checks pass); a member already there is kept,
        and one draining goes back to ``joining``. ``FleetFull`` at ``pool_max_members``."""
        spec = url if isinstance(url, BackendSpec) else BackendSpec(url=url.rstrip("/"))
        try:
            existing = self.find(spec.url)
        except KeyError:
            pass
        else:
            existing.source = source
            self._update(existing, spec)
            if existing.state == "draining":
                self.undrain(existing.url)
            return existing
        if len(self.members) >= self.config.max_members:
            raise FleetFull(f"the pool holds {self.config.max_members} members already")
        if self._make is None:
            raise RuntimeError("this fleet cannot build members")
        member = self._make(spec)
        member.source = source
        member.notify = self._state_changed
        member.join()
        for listener in self.on_join:
            listener(member)
        await member.backend.start()
        self.members = [*self.members, member]
        self.changes += 1
        log.warning("backend %s joining the pool (%s)", member.name, source)
        return member

    def remove(self, url: str) -> Member:
        """Drain the member, then let it go once nothing is in flight on it (or at the drain
        deadline, its streams moved elsewhere)."""
        member = self.find(url)
        self._drain(member, leaving=True)
        return member

    def drain(self, url: str) -> Member:
        """No new requests for the member; it stays (``draining``) until ``undrain``."""
        member = self.find(url)
        self._drain(member, leaving=False)
        return member

    def undrain(self, url: str) -> Member:
        """Back through ``joining``: it takes requests again once its checks pass."""
        member = self.find(url)
        if member.state == "draining":
            member.leaving = False
            member.join()
            self.changes += 1
            log.warning("backend %s undrained: joining again", member.name)
        return member

    async def reconcile(self, urls: Iterable[str | BackendSpec], source: str) -> dict[str, int]:
        """Make ``source``'s members exactly ``urls``: new ones join (up to the cap), those of
        ``source`` no longer named drain, then go. Members from other sources are left alone.
        Returns how many were added, removed and refused (the cap)."""
        wanted: dict[str, BackendSpec] = {}
        for u in urls:
            spec = u if isinstance(u, BackendSpec) else BackendSpec(url=u.rstrip("/"))
            wanted.setdefault(spec.url, spec)
        added = removed = refused = 0
        for m in self.members:
            if m.source == source and m.url not in wanted and not m.leaving:
                self._drain(m, leaving=True)
                removed += 1
        present = {m.url: m for m in self.members}
        for url, spec in wanted.items():
            there = present.get(url)
            if there is not None and not there.leaving:
                self._update(there, spec)
                continue
            try:
                await self.add(spec, source)
                added += 1
            except FleetFull:
                refused += 1
        if refused:
            log.warning(
                "%s: %d backends not added: the pool holds %d at most",
                source,
                refused,
                self.config.max_members,
            )
        return {"added": added, "removed": removed, "refused": refused}

    def describe(self) -> list[dict[str, Any]]:
        """Each member (and the last ones gone): name, url, state, source, weight, in flight,
        why it is out, seconds in its state."""
        now = time.monotonic()
        return [
            {
                "name": m.name,
                "url": m.url,
                "state": m.state,
                "source": m.source,
                "weight": m.weight,
                "in_flight": m.in_flight,
                "down_reason": m.down_reason,
                "state_seconds": round(now - m.state_since, 3),
            }
            for m in (*self.members, *self.gone)
        ]

    # --- the time-driven part (the health loop calls it each tick) -------------------------

    async def tend(self) -> None:
        now = time.monotonic()
        for m in self.members:
            if m.state == "ready" and m.ramp_until:
                m.ramp(now)
            elif m.state == "draining":
                if now >= m.drain_at and (m.streams or m.pending):
                    log.warning(
                        "backend %s: drain deadline passed with %d in flight; its streams go on "
                        "elsewhere",
                        m.name,
                        m.in_flight,
                    )
                    for task in list(m.pending):
                        task.cancel()
                    for stream in list(m.streams):
                        stream.abandon()
                if m.leaving and m.in_flight == 0:
                    await self._let_go(m)

    def admitted(self, member: Member) -> None:
        """The health loop admitted a joining member, or readmitted an ejected one."""
        member.admit(self.config.slow_start)
        for listener in self.on_ready:
            listener()

    # --- internals -------------------------------------------------------------------------

    def _state_changed(self, member: Member) -> None:
        for listener in self.on_state:
            listener(member)

    def _drain(self, member: Member, *, leaving: bool) -> None:
        if member.state != "draining" and member.state != "joining":
            for listener in self.on_leave:
                listener(member)
        member.drain(time.monotonic() + self.config.drain_timeout, leaving=leaving)
        self.changes += 1
        log.warning(
            "backend %s %s (%d in flight)",
            member.name,
            "leaving the pool" if leaving else "draining",
            member.in_flight,
        )

    async def _let_go(self, member: Member) -> None:
        self.members = [m for m in self.members if m is not member]
        member.leave()
        self.gone.append(member)
        for listener in self.on_gone:
            listener(member)
        log.warning("backend %s left the pool; %d backends", member.name, len(self.members))
        await member.backend.aclose()

    def _update(self, member: Member, spec: BackendSpec) -> None:
        """A member named again (the file rewritten): its weight and limit as now given."""
        if spec.weight != member.base_weight:
            member.base_weight = spec.weight
            if not member.ramp_until:
                member.weight = spec.weight
        if spec.max_outstanding is not None:
            member.limit = spec.max_outstanding
