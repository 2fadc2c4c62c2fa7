"""A small ``multipart/form-data`` reader, enough for the audio routes: field names, text values,
file names and sizes. No I/O; the whole body is in memory (the server caps it at 16 MiB).

``parse`` raises ``MultipartError`` where Starlette's parser would refuse the body (vLLM then
answers 400 "There was an error parsing the body").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MultipartError", "Part", "boundary_of", "parse"]


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data."""


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def boundary_of(content_type: str) -> str | None:
    """The boundary of a ``multipart/form-data`` content type; None for any other type."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"') or None
    return None


def _disposition(value: str) -> tuple[str | None, str | None]:
    name = filename = None
    for item in value.split(";")[1:]:
        key, _, val = item.strip().partition("=")
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        if key.lower() == "name":
            name = val
        elif key.lower() == "filename":
            filename = val
    return name, filename


def parse(body: bytes, boundary: str) -> list[Part]:
    """The parts of ``body``. Raises ``MultipartError``."""
    delimiter = b"--" + boundary.encode("latin-1")
    if not body.startswith(delimiter):
        raise MultipartError("the body does not start with the boundary")
    chunks = body.split(b"\r\n" + delimiter)
    first = chunks[0][len(delimiter) :]
    pieces = [first, *chunks[1:]]
    if not pieces[-1].startswith(b"--"):
        raise MultipartError("the closing boundary is missing")
    parts = []
    for piece in pieces[:-1]:
        if not piece.startswith(b"\r\n"):
            raise MultipartError("a boundary is not followed by a line break")
        head, sep, data = piece[2:].partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("a part has no header block")
        headers = {}
        for line in head.split(b"\r\n"):
            key, colon, value = line.partition(b":")
            if not colon:
                raise MultipartError("a part header has no colon")
            headers[key.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        disposition = headers.get("content-disposition", "")
        if not disposition.lower().startswith("form-data"):
            raise MultipartError("a part is not form-data")
        name, filename = _disposition(disposition)
        if name is None:
            raise MultipartError("a part has no name")
        parts.append(Part(name, filename, headers.get("content-type"), data))
    return parts
