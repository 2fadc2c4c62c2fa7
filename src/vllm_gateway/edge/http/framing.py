"""HTTP/1.1 on the wire, without I/O: status lines, the Date header, the server's own error
answers, and the RFC 9112/9110 rules on a request's head that llhttp leaves to its caller."""

from __future__ import annotations

import http
import time
from email.utils import formatdate

from vllm_gateway import errors
from vllm_gateway.errors import GatewayError

__all__ = [
    "CONTINUE",
    "NO_BODY_STATUS",
    "STATUS_LINES",
    "date_line",
    "error_headers",
    "error_response",
    "head_error",
]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
STATUS_LINES = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in http.HTTPStatus
}
NO_BODY_STATUS = frozenset({204, 304})


class _Date:
    """The Date header, formatted once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"date: %s\r\n" % formatdate(now, usegmt=True).encode("latin-1")
        return self._line


date_line = _Date().line


def error_headers(err: GatewayError, request_id: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"x-request-id", request_id.encode("latin-1")),
        *err.headers(),
    ]


def error_response(err: GatewayError, request_id: str) -> bytes:
    """A whole error response that closes the connection, for answers made outside an exchange."""
    body = errors.json_body(err, request_id)
    return b"".join(
        [
            STATUS_LINES[err.status],
            *(b"%s: %s\r\n" % pair for pair in error_headers(err, request_id)),
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body),
            body,
        ]
    )


def head_error(
    version: str, headers: list[tuple[bytes, bytes]], upgrade: bool
) -> tuple[GatewayError | None, bool]:
    """The refusal a request's head earns by the RFC 9112/9110 rules llhttp leaves to its caller
    (None if none), and whether the request expects a ``100 Continue``. ``headers`` in lower case;
    the conformance table (tests/integration/test_edge_conformance.py) states each rule's answer."""
    if version not in ("1.1", "1.0"):
        return errors.VersionNotSupported(), False
    if upgrade:
        return errors.InvalidRequest("Protocol upgrades are not supported here."), False
    hosts = 0
    codings: list[bytes] = []
    expect: bytes | None = None
    for name, value in headers:
        if name == b"host":
            hosts += 1
        elif name == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b","))
        elif name == b"expect":
            expect = value.strip().lower()
    if version == "1.1" and hosts != 1:
        # RFC 9112 3.2: exactly one Host in an HTTP/1.1 request, else 400.
        return errors.MalformedRequest(
            "An HTTP/1.1 request must carry exactly one Host header."
        ), False
    if hosts > 1:
        return errors.MalformedRequest("A request must not carry more than one Host header."), False
    if codings:
        if version != "1.1":
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
            return errors.MalformedRequest("Transfer-Encoding is not allowed in HTTP/1.0."), False
        if codings[-1] != b"chunked":
            # RFC 9112 6.3: without chunked last, the body's length cannot be known.
            return errors.MalformedRequest("Transfer-Encoding must end with 'chunked'."), False
        if codings != [b"chunked"]:
            return errors.UnsupportedTransferCoding(), False
    if expect is not None and version == "1.1":
        # RFC 9110 10.1.1: an HTTP/1.0 request's expectation is ignored.
        if expect != b"100-continue":
            return errors.ExpectationFailed(), False
        return None, True
    return None, False
