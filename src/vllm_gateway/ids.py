"""Request ids: the client's ``X-Request-ID`` when it is sane, else a fresh one.

Fresh ids are 8 random bytes per process, then a counter: unique across processes and replicas
(vLLM uses the id forwarded to it as its own request id), 24 hex digits, and no system call per
request as ``os.urandom`` would make. A forked worker draws a new prefix.
"""

from __future__ import annotations

import itertools
import os
import re

__all__ = ["new_request_id"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

_prefix = os.urandom(8).hex()
_counter = itertools.count(1)


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex()
    _counter = itertools.count(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def new_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID if it is sane, else a fresh one (``headers`` in lower case)."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.match(text):
                return text
            break
    return f"{_prefix}{next(_counter):08x}"
