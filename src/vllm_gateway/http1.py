"""HTTP/1.1 framing rules that the gateway's server and its backend client share.

httptools (llhttp underneath) hands a header to its caller only when the header's line is complete,
and keeps the unfinished line itself. What it keeps is invisible until then, so each side bounds
it from what it can see: ``held_tail`` is an upper bound on those unseen bytes at the end of a
read, taken from the read itself, so that a head or a trailer section is counted per message and
never per read (bytes of a previous message's body in the same read do not count against the next
message's head).
"""

from __future__ import annotations

__all__ = ["held_tail"]


def held_tail(data: bytes, carry: int, seen: int) -> int:
    """Bytes a parser may hold unseen after ``data``, when the read ended inside a head or trailer
    section: ``carry`` is that bound after the previous read (0 if the section began in this one),
    ``seen`` the bytes of this read the parser handed over (URL pieces, headers, body).

    Two bounds, each exact in the cases the other is not: the bytes after the read's last line
    feed (an unfinished line holds no line feed; loose only when the section began after a body
    that held none), and the bytes of the read that no callback accounted for (loose only by
    framing: line ends, separators, chunk-size lines).
    """
    n = len(data)
    nl = data.rfind(b"\n")
    after_last_line = carry + n if nl < 0 else n - nl - 1
    unaccounted = carry + n - seen
    return max(0, min(after_last_line, unaccounted))
