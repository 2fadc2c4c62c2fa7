"""Request ids: the client's ``X-Request-ID`` when it is sane, else a fresh one.

A request's id is what logs show and what the response's ``X-Request-ID`` echoes. What goes
upstream is always the gateway's own (``fresh_id``), never a client's: vLLM takes it as its
request id, and a client that chose it could collide with another's requests.

Fresh ids are 24 hex digits of the operating system's CSPRNG, drawn 2 KiB at a time (one system
call per 170 ids): unique across processes and replicas and unpredictable to a client that has
seen any number of them. A forked worker throws away what its parent had drawn. The gateway makes
ids on its event loop only (one thread per process).
"""

from __future__ import annotations

import os
import re

__all__ = ["fresh_id", "new_request_id"]

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
