"""Who a request counts against: a tenant and its priority class, and the key entries that name them.

A key entry (``VLLM_API_KEYS``, comma-separated, or one per line in ``VLLM_API_KEYS_FILE``) is
``KEY``, ``KEY:TENANT``, ``KEY:TENANT:PRIORITY`` or ``KEY:TENANT:PRIORITY:DEADLINE_MS``. The tenant is whose share of the queue and of
the rate limits a request counts against (several keys may share one); without one, each key is
its own tenant, named by a digest prefix so that no key ever appears in a log or a metric. The
priority class (an integer, default 0) decides who is served first when the queue is not empty.
The deadline (milliseconds, optional) is the tenant's default for ``X-Request-Deadline-Ms``
(docs/admission.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["ANONYMOUS", "MAX_DEADLINE_MS", "Identity", "parse_deadline_ms", "parse_key_entry"]

# The longest deadline a request or a tenant may state: one day, in milliseconds.
MAX_DEADLINE_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    priority: int = 0
    deadline_ms: int | None = None  # the tenant's default deadline (X-Request-Deadline-Ms)


ANONYMOUS = Identity("anonymous")


def parse_key_entry(entry: str) -> tuple[str, Identity]:
    key, _, rest = entry.strip().partition(":")
    tenant, _, rest = rest.partition(":")
    priority, _, deadline = rest.partition(":")
    if not tenant:
        tenant = "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    try:
        level = int(priority) if priority else 0
    except ValueError:
        raise ValueError(f"the priority of tenant {tenant!r} must be an integer") from None
    deadline_ms = None
    if deadline:
        deadline_ms = parse_deadline_ms(deadline.encode())
        if deadline_ms is None:
            raise ValueError(
                f"the deadline of tenant {tenant!r} must be whole milliseconds, "
                f"1 to {MAX_DEADLINE_MS}"
            )
    return key, Identity(tenant, level, deadline_ms)


def parse_deadline_ms(raw: bytes) -> int | None:
    """A deadline in whole milliseconds, 1 to ``MAX_DEADLINE_MS``; None for anything else
    (empty, a sign, text, a fraction, zero, too large)."""
    raw = raw.strip()
    if not raw or len(raw) > 8 or not raw.isdigit():
        return None
    value = int(raw)
    return value if 1 <= value <= MAX_DEADLINE_MS else None
