"""Client API keys: who is calling, compared in constant time.

The presented key (``Authorization: Bearer KEY`` or ``x-api-key: KEY``) is hashed and compared
with every known digest with ``hmac.compare_digest``, without stopping at the first match, so the
time taken does not depend on which key matched. Key entries and tenants: ``identity.py``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from vllm_gateway.identity import Identity, parse_key_entry

__all__ = ["KeyRing"]


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
