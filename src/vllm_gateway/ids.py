"""Request ids, and the ids of stored Responses that say which tenant owns them.

A request's id (``new_request_id``) is the client's ``X-Request-ID`` when it is sane, else a fresh
one: it is what logs show and what the response's ``X-Request-ID`` echoes. What goes upstream is
always the gateway's own (``fresh_id``), never a client's: vLLM takes it as its request id, and a
client that chose it could collide with another's requests.

Fresh ids are 24 hex digits of the operating system's CSPRNG, drawn 2 KiB at a time (one system
call per 170 ids): unique across processes and replicas and unpredictable to a client that has
seen any number of them. A forked worker throws away what its parent had drawn. The gateway makes
ids on its event loop only (one thread per process).

Stored Responses (``ResponseIds``): vLLM takes a create's ``request_id`` body field as the
response's id, so the gateway sets it to ``resp_`` + a random nonce + a MAC of (tenant, nonce).
Whoever names that id later (retrieve, replay, cancel, ``previous_response_id``) is its owner only
if the MAC verifies for their tenant; nothing is stored, so ownership holds across restarts and
replicas that share the MAC key. The key is ``VLLM_RESPONSE_ID_SECRET`` when set, else one per
tenant derived from that tenant's API key digests (a tenant that knows its own keys can mint ids
for itself only). Without client keys everyone is the one anonymous tenant and its key is a
constant: there is nothing to isolate.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable

from vllm_gateway.identity import parse_key_entry

__all__ = ["ResponseIds", "fresh_id", "new_request_id"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

_ID_DIGITS = 24
_DRAW = 2048  # random bytes per system call: 170 ids of 24 hex digits
_pool = ""
_pos = 0


def _reseed() -> None:
    global _pool, _pos
    _pool, _pos = "", 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def fresh_id() -> str:
    """24 hex digits nobody can predict (the gateway's own request id)."""
    global _pool, _pos
    pos = _pos
    if pos + _ID_DIGITS > len(_pool):
        _pool, pos = os.urandom(_DRAW).hex(), 0
    _pos = pos + _ID_DIGITS
    return _pool[pos : pos + _ID_DIGITS]


def new_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID if it is sane, else a fresh one (``headers`` in lower case)."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
            break
    return fresh_id()


# --- stored Responses: ids that name their owner --------------------------------------------------

_PREFIX = "resp_"
_NONCE = 16
_TAG = 16
_RESPONSE_ID_LENGTH = len(_PREFIX) + 2 * (_NONCE + _TAG)
_LABEL = b"vllm-gateway response ids\0"


def _mac_key(material: bytes) -> bytes:
    return hashlib.sha256(_LABEL + material).digest()


class ResponseIds:
    """Mints the ids of stored Responses for a tenant and tells whether an id is a tenant's.

    ``entries`` are the client key entries (``KEY[:TENANT[:PRIORITY]]``); ``secret``, when given,
    is the one MAC key of every tenant (shared by replicas, kept across key rotations)."""

    __slots__ = ("_default", "_keys")

    def __init__(self, entries: Iterable[str] = (), secret: str | None = None) -> None:
        self._keys: dict[str, bytes] = {}
        if secret:
            self._default = _mac_key(b"secret\0" + secret.encode())
            return
        # Without a secret: each tenant's key from its own keys' digests, so adding a tenant or
        # rotating one tenant's keys leaves every other tenant's ids as they were.
        digests: dict[str, list[bytes]] = {}
        for entry in entries:
            key, identity = parse_key_entry(entry)
            digests.setdefault(identity.tenant, []).append(hashlib.sha256(key.encode()).digest())
        for tenant, found in digests.items():
            self._keys[tenant] = _mac_key(b"tenant\0" + b"".join(sorted(found)))
        self._default = _mac_key(b"anonymous\0")

    def _tag(self, tenant: str, nonce: bytes) -> bytes:
        key = self._keys.get(tenant, self._default)
        message = tenant.encode() + b"\0" + nonce
        return hashlib.blake2b(message, key=key, digest_size=_TAG).digest()

    def mint(self, tenant: str) -> str:
        """A new response id owned by ``tenant``."""
        nonce = os.urandom(_NONCE)
        return _PREFIX + nonce.hex() + self._tag(tenant, nonce).hex()

    def owns(self, tenant: str, response_id: str) -> bool:
        """Whether ``response_id`` was minted for ``tenant`` (False for anything else)."""
        if len(response_id) != _RESPONSE_ID_LENGTH or not response_id.startswith(_PREFIX):
            return False
        digits = response_id[len(_PREFIX) :]
        try:
            raw = bytes.fromhex(digits)
        except ValueError:
            return False
        if raw.hex() != digits:  # one spelling only (fromhex also takes spaces, upper case)
            return False
        nonce, tag = raw[:_NONCE], raw[_NONCE:]
        return hmac.compare_digest(tag, self._tag(tenant, nonce))
