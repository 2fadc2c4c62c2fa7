"""Properties of the SSE scanner beyond tests/unit/test_sse_and_errors.py.

- Any bytes at all, in any chunking, raise nothing but ``FramingError``, and the scanner never holds
  more than its cap.
- Nothing is lost or invented: what comes out plus what is pending is the input with line ends
  normalised.
- CRLF framing gives the same events however the reads are cut, including between a CR and its LF.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_gateway.proxy.protocols import OPENAI
from vllm_gateway.proxy.sse import EventScanner, FramingError, split_events

classify = OPENAI.classify


CAP = 256


def _feed_all(parts: list[bytes], cap: int = CAP) -> tuple[bytes, bytes]:
    scanner = EventScanner(cap)
    out = b"".join(scanner.feed(p) for p in parts)
    return out, scanner.pending


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    parts, last = [], 0
    for p in points:
        parts.append(data[last:p])
        last = p
    parts.append(data[last:])
    return parts


def _normalise(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=12))
def test_garbage_raises_only_framing_errors_and_holds_at_most_the_cap(parts: list[bytes]) -> None:
    scanner = EventScanner(CAP)
    for part in parts:
        try:
            block = scanner.feed(part)
        except FramingError:
            return
        assert len(scanner.pending) <= CAP
        for event in split_events(block):
            classify(event)  # never raises, whatever the bytes


_LINE = st.sampled_from(
    [
        b'data: {"a": 1}',
        b"data: [DONE]",
        b": ping",
        b"event: x",
        b"id: 7",
        b'data: {"error": {}}',
        b"data:{}",
        b"retry: 10",
    ]
)


@st.composite
def _crlf_stream(draw: st.DrawFn) -> bytes:
    events = draw(st.lists(st.lists(_LINE, min_size=1, max_size=3), min_size=1, max_size=8))
    return b"".join(b"".join(line + b"\r\n" for line in ev) + b"\r\n" for ev in events)


@settings(max_examples=300, deadline=None)
@given(_crlf_stream(), st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_crlf_events_do_not_depend_on_where_reads_are_cut(data: bytes, cuts: list[int]) -> None:
    whole, pending_whole = _feed_all([data], cap=1 << 20)
    cut, pending_cut = _feed_all(_cut(data, cuts), cap=1 << 20)
    assert split_events(cut) == split_events(whole)
    assert [classify(e) for e in split_events(cut)] == [classify(e) for e in split_events(whole)]
    assert pending_whole == pending_cut == b""


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300).filter(lambda b: b"\r" not in b),
    st.lists(st.integers(min_value=0, max_value=300), max_size=10),
)
def test_nothing_is_lost_or_invented(data: bytes, cuts: list[int]) -> None:
    out, pending = _feed_all(_cut(data, cuts), cap=1 << 20)
    assert out + pending == _normalise(data)
