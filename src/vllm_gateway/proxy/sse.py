"""SSE framing of a backend's stream: pure logic, no I/O.

The backend is untrusted. ``EventScanner`` cuts the byte stream into complete events (an event
ends with a blank line), so the relay only ever forwards whole events and never half of one
before an error. It bounds how much it holds: an event longer than ``max_event_bytes`` is an
error, not a reason to buffer without end. What one event means is each protocol's business
(``protocols.py``).

Events are forwarded byte for byte; the JSON of a ``data:`` line is parsed only to check it is
an object and to see an ``error`` the backend reports mid-stream.
"""

from __future__ import annotations

__all__ = ["EventScanner", "FramingError", "split_events"]


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
