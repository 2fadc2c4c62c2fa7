"""The simulator's multipart/form-data reader (the audio routes' uploads)."""

from __future__ import annotations

import httpx
import pytest

from vllm_gateway_tools.simulator.multipart import MultipartError, boundary_of, parse


def _encoded(files: dict[str, tuple[str, bytes]], data: dict[str, str]) -> tuple[str, bytes]:
    """A body as httpx (and so the openai SDK) encodes it."""
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.headers["content-type"], request.read()


def test_parse_reads_fields_and_files_as_httpx_sends_them() -> None:
    audio = b"RIFF" + bytes(range(256)) * 10 + b"\r\n--not-the-boundary\r\n"
    content_type, body = _encoded({"file": ("clip.wav", audio)}, {"model": "m", "stream": "true"})
    boundary = boundary_of(content_type)
    assert boundary is not None
    parts = {p.name: p for p in parse(body, boundary)}
    assert parts["model"].text() == "m" and parts["model"].filename is None
    assert parts["stream"].text() == "true"
    assert parts["file"].filename == "clip.wav" and parts["file"].data == audio


def test_boundary_of_other_types() -> None:
    assert boundary_of("application/json") is None
    assert boundary_of("multipart/form-data") is None
    assert boundary_of('multipart/form-data; boundary="abc"') == "abc"


@pytest.mark.parametrize(
    "body",
    [b"", b"garbage", b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx",  # no closing
     b"--B\r\nno-colon-here\r\n\r\nx\r\n--B--\r\n",
     b"--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n--B--\r\n",  # no name
     b"--Bx\r\n"],
)  # fmt: skip
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse(body, "B")
