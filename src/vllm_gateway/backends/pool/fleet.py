"""The set of members a pool routes over, and a member's leaving it (ejection).

``Fleet`` owns the pool's ``Member`` objects. Everything that works on "the members" (acquisition,
routing, retries, health, cache-aware routing, the fan-outs) holds the fleet, not a list, and reads
``fleet.members`` when it needs them: this is the one place where the set is kept.

``fail`` counts a member's failure and ejects it at ``eject_after_failures`` in a row. ``eject``
takes it out of the pool: ``Member.eject`` sets its readmission backoff and cancels the attempts
still waiting for its first byte (they move to another member, ``retry.py``), its live streams are
dropped at once (``abandon``: they may fail over), and the ``on_leave`` listeners are told
(cache-aware routing forgets what it held: it comes back cold). A member comes back through the
health checks (``health.py``).

Invariants: ``members`` is fixed at construction and never empty; an ejection of a member that is
already out does nothing, so each ejection is counted, announced and acted on once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.member import Member

__all__ = ["Fleet"]

# The pool's comings and goings share one logger name (health.py's too): what operators filter on.
log = logging.getLogger("vllm_gateway.backends.pool.backend")


class Fleet:
    def __init__(self, members: list[Member], config: PoolConfig) -> None:
        self.members = members
        self.config = config
        self.on_leave: list[Callable[[Member], None]] = []  # each called when a member is ejected

    def up(self) -> list[Member]:
        return [m for m in self.members if m.up]

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
