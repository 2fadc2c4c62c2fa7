"""SSE framing of untrusted backend output, request validation, and error rendering."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_gateway import errors
from vllm_gateway.proxy.protocols import DONE, ERROR, NOTE, OK, OPENAI
from vllm_gateway.proxy.routes import CHAT, COMPLETIONS
from vllm_gateway.proxy.sse import EventScanner, FramingError, split_events
from vllm_gateway.proxy.validation import set_response_id, validate_body

classify = OPENAI.classify

RECORDED = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Paris"}}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


def _events_of(pieces: list[bytes]) -> list[bytes]:
    scanner = EventScanner(1 << 16)
    out: list[bytes] = []
    for piece in pieces:
        out.extend(split_events(scanner.feed(piece)))
    assert scanner.pending == b""
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=20))
def test_any_rechunking_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    pieces = [RECORDED[a:b] for a, b in zip([0, *points], [*points, len(RECORDED)], strict=True)]
    assert _events_of(pieces) == _events_of([RECORDED])
    assert len(_events_of(pieces)) == 4


def test_crlf_framing_is_accepted() -> None:
    assert _events_of([RECORDED.replace(b"\n", b"\r\n")]) == _events_of([RECORDED])


def test_oversized_event_is_an_error_not_a_buffer() -> None:
    scanner = EventScanner(1024)
    with pytest.raises(FramingError):
        for _ in range(10):
            scanner.feed(b"data: " + b"x" * 200)


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (b'data: {"choices":[]}', OK),
        (b"data: [DONE]", DONE),
        (b"data: {not json", ERROR),
        (b'data: {"error": {"message": "boom"}}', ERROR),
        (b'data: {"object": "error", "message": "boom"}', ERROR),
        (b"<html><body>oops</body></html>", ERROR),
        (b": keep-alive", NOTE),
    ],
)
def test_classify(event: bytes, kind: int) -> None:
    assert classify(event) == kind


def test_error_body_has_the_openai_shape_and_request_id() -> None:
    body = orjson.loads(errors.json_body(errors.QueueTimeout(), "req-1"))
    assert set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["type"] == "queue_timeout"
    assert body["error"]["code"] == 503
    assert body["error"]["request_id"] == "req-1"


def test_sse_error_event_is_a_data_event_without_done() -> None:
    event = errors.sse_event(errors.StreamIdleTimeout(), "r")
    assert event.startswith(b"data: {") and event.endswith(b"\n\n")
    assert b"[DONE]" not in event
    assert classify(event.strip()) == ERROR


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert errors.Overloaded(retry_after=0.2).headers() == [(b"retry-after", b"1")]
    assert errors.Overloaded(retry_after=2.1).headers() == [(b"retry-after", b"3")]
    assert errors.BackendUnavailable().headers() == []


def _body(**fields: object) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"n": 1000}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stream": "yes"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"model": 5}, "model"),
    ],
)
def test_validation_names_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        validate_body(CHAT, _body(**fields), {})
    assert info.value.param == param
    assert info.value.status == 400


def test_invalid_json_and_non_objects() -> None:
    with pytest.raises(errors.InvalidJSON):
        validate_body(CHAT, b"{", {})
    with pytest.raises(errors.InvalidRequest):
        validate_body(CHAT, b"[1]", {})
    with pytest.raises(errors.InvalidRequest):
        validate_body(COMPLETIONS, b'{"model": "m"}', {})


def test_valid_body_is_forwarded_unchanged_unless_aliased() -> None:
    body = _body(stream=True)
    valid = validate_body(CHAT, body, {"other": "x"})
    assert valid.body is body and valid.stream and valid.model == "m"
    aliased = validate_body(CHAT, body, {"m": "org/m"})
    assert aliased.model == "org/m" and orjson.loads(aliased.body)["model"] == "org/m"


def test_the_gateway_names_a_responses_create_and_keeps_the_rest_of_its_bytes() -> None:
    body = b' \n{"model": "m", "input": "hi"}'
    valid = validate_body("/v1/responses", body, {})
    set_response_id(valid, "resp_ours")
    assert valid.body == b' \n{"request_id":"resp_ours","model": "m", "input": "hi"}'
    assert orjson.loads(valid.body) == {"request_id": "resp_ours", "model": "m", "input": "hi"}
    # One the client chose is replaced, not shadowed by a second key.
    valid = validate_body("/v1/responses", b'{"input": "hi", "request_id": "resp_mine"}', {})
    set_response_id(valid, "resp_ours")
    assert valid.body.count(b"request_id") == 1
    assert orjson.loads(valid.body)["request_id"] == valid.json["request_id"] == "resp_ours"  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "body", "aliases", "response_id"),
    [
        (CHAT, _body(), {}, None),
        (CHAT, _body(), {"m": "org/m"}, None),
        ("/v1/responses", b'{"input": "hi", "model": "m"}', {"m": "org/m"}, "resp_1"),
        ("/v1/responses", b'{"input": "hi", "request_id": "theirs"}', {}, "resp_2"),
    ],
)
def test_a_parsed_body_dropped_for_a_wait_comes_back_as_it_was(
    path: str, body: bytes, aliases: dict[str, str], response_id: str | None
) -> None:
    valid = validate_body(path, body, aliases)
    if response_id is not None:
        set_response_id(valid, response_id)
    parsed = valid.json
    valid.drop_parsed()
    assert valid.json is None
    valid.parse_again()
    assert valid.json == parsed and valid.json is not parsed
    again = valid.json
    valid.parse_again()  # nothing dropped: nothing parsed
    assert valid.json is again
