"""CORS, off unless origins are configured (``VLLM_CORS_ORIGINS``).

An allowed origin gets ``Access-Control-Allow-Origin`` on every answer, proxied streams included;
a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered here,
without a key, since browsers never send one on a preflight. Any other origin gets no CORS header
and, on a preflight, a 400. The methods are the gateway's own (GET, POST).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Cors"]

_METHODS = b"GET, POST"
_MAX_AGE = b"600"


class Cors:
    def __init__(self, origins: Iterable[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(o.encode("latin-1") for o in origins if o != "*")

    def allowed(self, origin: bytes | None) -> bool:
        return origin is not None and (self._any or origin in self._origins)

    def response_headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """Headers an ordinary answer to ``origin`` carries."""
        if not self.allowed(origin):
            return []
        assert origin is not None
        return [
            (b"access-control-allow-origin", b"*" if self._any else origin),
            (b"access-control-expose-headers", b"x-request-id, retry-after"),
            (b"vary", b"Origin"),
        ]

    @staticmethod
    def is_preflight(method: str, headers: list[tuple[bytes, bytes]]) -> bool:
        if method != "OPTIONS":
            return False
        names = {name for name, _ in headers}
        return b"origin" in names and b"access-control-request-method" in names

    def preflight(
        self, origin: bytes | None, requested_headers: bytes | None
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Status and headers of the answer to a preflight."""
        if not self.allowed(origin):
            return 400, [(b"vary", b"Origin")]
        headers = self.response_headers(origin)
        headers += [
            (b"access-control-allow-methods", _METHODS),
            (b"access-control-max-age", _MAX_AGE),
        ]
        if requested_headers:
            headers.append((b"access-control-allow-headers", requested_headers))
        return 200, headers
