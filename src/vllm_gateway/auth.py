"""Client API keys: who is calling, compared in constant time.

A key entry (``VLLM_API_KEYS``, comma-separated, or one per line in ``VLLM_API_KEYS_FILE``) is
``KEY``, ``KEY:TENANT`` or ``KEY:TENANT:PRIORITY``. The tenant is whose share of the queue and of
the rate limits a request counts against (several keys may share one); without one, each key is
its own tenant, named by a digest prefix so that no key ever appears in a log or a metric. The
priority class (an integer, default 0) decides who is served first when the queue is not empty.

The presented key is hashed and compared with every known digest with ``hmac.compare_digest``,
without stopping at the first match, so the time taken does not depend on which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Identity", "KeyRing", "parse_key_entry"]


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


class KeyRing:
    def __init__(self, entries: Iterable[str]) -> None:
        self._known: list[tuple[bytes, Identity]] = []
        for entry in entries:
            key, identity = parse_key_entry(entry)
            self._known.append((hashlib.sha256(key.encode()).digest(), identity))

    def __bool__(self) -> bool:
        return bool(self._known)

    def identify(self, headers: list[tuple[bytes, bytes]]) -> Identity | None:
        """The caller's identity (``headers`` in lower case), or None when the key is missing or
        unknown."""
        presented = b""
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = token.strip()
                break
            if name == b"x-api-key":
                presented = value.strip()
        digest = hashlib.sha256(presented).digest()
        found: Identity | None = None
        for known, identity in self._known:
            if hmac.compare_digest(digest, known):
                found = identity
        return found if presented else None
