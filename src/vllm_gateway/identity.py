"""Who a request counts against: a tenant and its priority class, and the key entries that name them.

A key entry (``VLLM_API_KEYS``, comma-separated, or one per line in ``VLLM_API_KEYS_FILE``) is
``KEY``, ``KEY:TENANT`` or ``KEY:TENANT:PRIORITY``. The tenant is whose share of the queue and of
the rate limits a request counts against (several keys may share one); without one, each key is
its own tenant, named by a digest prefix so that no key ever appears in a log or a metric. The
priority class (an integer, default 0) decides who is served first when the queue is not empty.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["ANONYMOUS", "Identity", "parse_key_entry"]


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    priority: int = 0


ANONYMOUS = Identity("anonymous")


def parse_key_entry(entry: str) -> tuple[str, Identity]:
    key, _, rest = entry.strip().partition(":")
    tenant, _, priority = rest.partition(":")
    if not tenant:
        tenant = "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    try:
        level = int(priority) if priority else 0
    except ValueError:
        raise ValueError(f"the priority of tenant {tenant!r} must be an integer") from None
    return key, Identity(tenant, level)
