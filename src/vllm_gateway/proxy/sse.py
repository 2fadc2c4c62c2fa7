"""SSE framing of a backend's stream: pure logic, no I/O.

The backend is untrusted. ``EventScanner`` cuts the byte stream into complete events (an event
ends with a blank line), so the relay only ever forwards whole events and never half of one
before an error. It bounds how much it holds: an event longer than ``max_event_bytes`` is an
error, not a reason to buffer without end. ``classify`` tells a relay what one event means.

Events are forwarded byte for byte; the JSON of a ``data:`` line is parsed only to check it is
an object and to see an ``error`` the backend reports mid-stream.
"""

from __future__ import annotations

import orjson

__all__ = ["DONE", "ERROR", "OK", "EventScanner", "FramingError", "classify"]

OK = 0
DONE = 1
ERROR = 2

_DONE_EVENT = b"data: [DONE]"


class FramingError(ValueError):
    """The backend's stream is not well-formed SSE."""


class EventScanner:
    __slots__ = ("_buf", "_cr", "_max")

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._buf = b""
        self._cr = False
        self._max = max_event_bytes

    def feed(self, data: bytes) -> bytes:
        """Add bytes; return every complete event they finish (possibly b""), joined."""
        if self._cr and data:
            # The last read ended between a CR and its LF: that LF is already counted.
            self._cr = False
            if data[:1] == b"\n":
                data = data[1:]
        if self._buf:
            data = self._buf + data
        if b"\r" in data:
            # SSE allows CRLF and CR line ends; normalise so one boundary test serves all.
            self._cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            if len(data) > self._max:
                raise FramingError(f"an event exceeds {self._max} bytes")
            self._buf = data
            return b""
        end += 2
        self._buf = data[end:]
        if len(self._buf) > self._max:
            raise FramingError(f"an event exceeds {self._max} bytes")
        return data[:end] if end < len(data) else data

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet finished."""
        return self._buf


def split_events(block: bytes) -> list[bytes]:
    """Split a block of complete events (as ``feed`` returns) into single events without the
    blank line."""
    return [event for event in block.split(b"\n\n") if event]


def classify(event: bytes) -> int:
    """OK for a data event carrying a JSON object, DONE for ``[DONE]``, ERROR for anything
    else: an error object from the backend, broken JSON, or a line that is not SSE."""
    if event.startswith(b"data:"):
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return DONE
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ERROR
        if not isinstance(obj, dict) or "error" in obj or obj.get("object") == "error":
            return ERROR
        return OK
    # Comments (": ping") and other fields are legal SSE that carry no data.
    for line in event.split(b"\n"):
        if line and not line.startswith((b":", b"event:", b"id:", b"retry:")):
            return ERROR
    return OK
