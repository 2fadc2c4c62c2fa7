"""SSE splitting and classification in the benchmark client, without any socket."""

from __future__ import annotations

import pytest

from vllm_gateway_tools.bench.client import SSEScanner, Target, build_request, normalise_events

ROLE = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'


def content(text: str, rid: str = "chatcmpl-1") -> bytes:
    return (
        b'data: {"id":"%s","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"%s"},"logprobs":null,"finish_reason":null}]}\n\n'
        % (rid.encode(), text.encode())
    )


FINISH = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"length"}]}\n\n'
USAGE = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3}}\n\n'
DONE = b"data: [DONE]\n\n"
STREAM = ROLE + content(" a") + content(" b") + content(" c") + FINISH + USAGE + DONE


def test_counts_only_non_empty_content_chunks() -> None:
    s = SSEScanner()
    s.feed(STREAM, 1.0)
    assert len(s.times) == 3
    assert s.done
    assert s.usage_tokens == 3
    assert s.error is None


@pytest.mark.parametrize("size", [1, 2, 7, 64, 199, 1000])
def test_split_anywhere_gives_the_same_events(size: int) -> None:
    s = SSEScanner()
    for i in range(0, len(STREAM), size):
        s.feed(STREAM[i : i + size], float(i))
    assert len(s.times) == 3
    assert s.done and s.usage_tokens == 3
    # Each chunk is stamped with the read that completed it.
    assert s.times == sorted(s.times)


def test_one_read_stamps_every_event_in_it() -> None:
    s = SSEScanner()
    s.feed(content(" a") + content(" b"), 5.0)
    assert s.times == [5.0, 5.0]


def test_completions_text_chunks_and_crlf_framing() -> None:
    body = (
        b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" x"}]}\r\n\r\n'
        b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":""}]}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    s = SSEScanner()
    s.feed(body, 0.0)
    assert len(s.times) == 1
    assert s.done


def test_spaced_json_is_classified_too() -> None:
    s = SSEScanner()
    s.feed(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n', 0.0)
    s.feed(b'data: {"choices": [{"delta": {"content": ""}}]}\n\n', 0.0)
    s.feed(b'data: {"choices": [{"delta": {"content": null}}]}\n\n', 0.0)
    assert len(s.times) == 1


def test_error_event_is_reported() -> None:
    s = SSEScanner()
    s.feed(content(" a") + b'event: error\ndata: {"error": {"message": "x", "type": "t"}}\n\n', 0.0)
    assert s.error == "sse_error"
    assert not s.done


def test_event_without_trailing_blank_line_is_kept_for_flush() -> None:
    s = SSEScanner()
    s.feed(content(" a") + DONE[:-2], 0.0)
    assert not s.done
    s.flush(1.0)
    assert s.done


def test_normalise_masks_ids_and_times_only() -> None:
    a = normalise_events(content(" a", rid="chatcmpl-1"))
    b = normalise_events(content(" a", rid="chatcmpl-2"))
    c = normalise_events(content(" b", rid="chatcmpl-1"))
    assert a == b
    assert a != c


def test_build_request_has_exact_length_and_path() -> None:
    raw = build_request(Target("t", "http://127.0.0.1:9/v1", api_key="k"), "/v1/completions", b"{}")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"Content-Length: 2" in head
    assert b"Authorization: Bearer k" in head
    assert body == b"{}"
