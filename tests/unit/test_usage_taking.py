"""Token counts for the token limit: the usage chunk the gateway asks vLLM for and takes out of a
stream again (the client's bytes must be what vLLM sends without the ask), the request fields the
up-front charge reads (the ones vLLM reads), and the usage of each protocol."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from vllm_gateway.errors import InvalidRequest
from vllm_gateway.proxy.usage import UsageTaker, ask_for_usage, asks_for_usage, parse_usage
from vllm_gateway.proxy.validation import validate_body

FP = "vllm-0.32.0-1a2b3c4d"
_HEAD = b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":17,"model":"m",'


def _chunk(index: int, content: str, finish: str | None = None, fp: str | None = None) -> bytes:
    """A chat chunk as vLLM 0.32 serialises it (model_dump_json(exclude_unset=True)); ``fp``: the
    fingerprint it stamps on a finished chunk when no usage chunk follows."""
    choice = {"index": index, "delta": {"content": content}, "logprobs": None}
    choice["finish_reason"] = finish
    tail = b"" if fp is None else b',"system_fingerprint":' + orjson.dumps(fp)
    return _HEAD + b'"choices":[' + orjson.dumps(choice) + b"]" + tail + b"}"


def _role(index: int) -> bytes:
    return (
        _HEAD + b'"choices":[{"index":%d,"delta":{"role":"assistant","content":""},'
        b'"logprobs":null,"finish_reason":null}]}' % index
    )


USAGE = (
    _HEAD + b'"choices":[],"usage":{"prompt_tokens":9,"total_tokens":12,"completion_tokens":3},'
    b'"system_fingerprint":"' + FP.encode() + b'"}'
)
DONE = b"data: [DONE]"
_FINISH = b'"finish_reason":"'


def _streams(n: int) -> tuple[list[bytes], list[bytes]]:
    """(vLLM's events with include_usage, the same stream without it) for ``n`` choices."""
    asked: list[bytes] = [_role(i) for i in range(n)]
    plain = list(asked)
    for step in range(3):
        for i in range(n):
            finish = "length" if step == 2 else None
            asked.append(_chunk(i, f" tok{step}", finish))
            plain.append(_chunk(i, f" tok{step}", finish, FP if finish else None))
    return [*asked, USAGE, DONE], [*plain, DONE]


def _reads(events: list[bytes]) -> list[list[list[bytes]]]:
    """Every way of cutting ``events`` into consecutive reads."""
    out = []
    for cuts in itertools.product((False, True), repeat=len(events) - 1):
        reads, current = [], [events[0]]
        for event, cut in zip(events[1:], cuts, strict=True):
            if cut:
                reads.append(current)
                current = []
            current.append(event)
        reads.append(current)
        out.append(reads)
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_the_client_gets_vllms_bytes_without_the_ask_however_the_reads_fall(n: int) -> None:
    asked, plain = _streams(n)
    ways = _reads(asked)
    assert len(ways) == 2 ** (len(asked) - 1)
    for reads in ways:
        taker = UsageTaker()
        sent: list[bytes] = []
        for k, read in enumerate(reads):
            done = k == len(reads) - 1
            block = b"".join(e + b"\n\n" for e in read)
            # As the relay does: a read the taker has no concern with passes as it is.
            sent += taker.take(list(read), done) if taker.concerns(block, read, done) else read
        assert sent == plain, reads
        assert taker.usage == USAGE and taker.release() == []
        assert parse_usage(taker.usage) == (9, 3)


def test_held_events_go_out_unchanged_when_the_stream_fails_before_its_usage() -> None:
    asked, _ = _streams(2)
    taker = UsageTaker()
    # Two roles, two tokens of each choice, then choice 0's last chunk: held from there on.
    assert _FINISH not in asked[5] and _FINISH in asked[6]
    assert taker.take(asked[:7], done=False) == asked[:6]
    assert taker.take(asked[7:8], done=False) == []
    assert taker.release() == asked[6:8]  # as vLLM sent them: no usage came, no fingerprint
    assert taker.usage is None and taker.release() == []


def test_a_stream_without_a_usage_chunk_is_released_at_its_end() -> None:
    events = [_role(0), _chunk(0, " a", "stop"), DONE]
    taker = UsageTaker()
    assert taker.take(events[:2], done=False) == events[:1]
    assert taker.take(events[2:], done=True) == events[1:]
    assert taker.usage is None


def test_a_usage_chunk_without_a_fingerprint_changes_nothing_else() -> None:
    usage = _HEAD + b'"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    events = [_chunk(0, " a", "stop"), usage, DONE]
    taker = UsageTaker()
    assert taker.take(events, done=True) == [events[0], DONE]
    assert taker.usage == usage


def test_text_that_looks_like_the_markers_is_not_taken_for_them() -> None:
    # A token "usage", and a delta quoting the finish key: JSON escapes the quotes inside strings.
    tricky = [_chunk(0, "usage"), _chunk(0, '"finish_reason":"x" "usage"'), DONE]
    taker = UsageTaker()
    assert taker.take(list(tricky), done=True) == tricky
    assert taker.usage is None


# --- the request the backend gets ------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "asked"),
    [
        (None, False),
        ({}, False),
        ({"include_usage": False}, False),
        ({"include_usage": None}, False),
        ({"include_usage": 0}, False),
        ({"include_usage": "no"}, False),
        ({"include_usage": "False"}, False),
        ({"continuous_usage_stats": True}, False),
        ({"include_usage": True}, True),
        ({"include_usage": 1}, True),
        ({"include_usage": "true"}, True),
        ({"include_usage": "on"}, True),
        ({"include_usage": "maybe"}, True),  # vLLM refuses it: never taken out
    ],
)
def test_what_counts_as_the_client_asking_for_usage(options: Any, asked: bool) -> None:
    body: dict[str, Any] = {"stream": True}
    if options is not None:
        body["stream_options"] = options
    assert asks_for_usage(body) is asked


def test_a_body_without_stream_options_gets_the_ask_first_and_is_otherwise_untouched() -> None:
    raw = b'{ "model":"m","stream":true,"messages":[{"role":"user","content":"1.50"}],"x":1.0}'
    body = orjson.loads(raw)
    out, parsed = ask_for_usage(raw, body)
    assert out == (
        b'{"stream_options":{"include_usage":true}, "model":"m","stream":true,'
        b'"messages":[{"role":"user","content":"1.50"}],"x":1.0}'
    )
    assert orjson.loads(out) == parsed == {**body, "stream_options": {"include_usage": True}}
    assert "stream_options" not in body  # the client's own stays as it was (failover reads it)
    empty, _ = ask_for_usage(b"{}", {})
    assert orjson.loads(empty) == {"stream_options": {"include_usage": True}}


def test_a_clients_own_stream_options_keep_their_fields_with_continuous_usage_off() -> None:
    body = {
        "stream": True,
        "stream_options": {"include_usage": False, "continuous_usage_stats": True, "other": 1},
    }
    raw, parsed = ask_for_usage(orjson.dumps(body), body)
    assert orjson.loads(raw) == parsed
    assert parsed["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": False,
        "other": 1,
    }
    _, from_null = ask_for_usage(b'{"stream_options":null}', {"stream_options": None})
    assert from_null["stream_options"] == {"include_usage": True}


# --- what the up-front charge reads ------------------------------------------------------------


def _requested(path: str, **fields: Any) -> int:
    base: dict[str, Any] = {"model": "m"}
    if path == "/v1/completions":
        base["prompt"] = "hi"
    elif path == "/v1/responses":
        base["input"] = "hi"
    else:
        base["messages"] = [{"role": "user", "content": "hi"}]
    return validate_body(path, orjson.dumps({**base, **fields}), {}).requested_tokens


def test_the_up_front_charge_reads_the_field_vllm_reads() -> None:
    chat = "/v1/chat/completions"
    # vLLM: max_completion_tokens when it is given, else max_tokens.
    assert _requested(chat, max_tokens=90, max_completion_tokens=10) == 10
    assert _requested(chat, max_tokens=90, max_completion_tokens=None) == 90
    assert _requested(chat, max_completion_tokens=7) == 7
    assert _requested(chat) == 0  # vLLM's default is the context left: charged after
    assert _requested(chat, max_tokens=5, n=3) == 15  # every choice has the whole budget
    with pytest.raises(InvalidRequest):
        _requested(chat, max_tokens=5, max_completion_tokens=0)  # both are still checked
    # Completions: vLLM's default is 16; each prompt of a list runs with the whole budget.
    comp = "/v1/completions"
    assert _requested(comp) == 16
    assert _requested(comp, max_tokens=None) == 16
    assert _requested(comp, max_tokens=4, n=2) == 8
    assert _requested(comp, max_tokens=4, prompt=["a", "b", "c"]) == 12
    assert _requested(comp, max_tokens=4, prompt=[[1, 2], [3]]) == 8
    assert _requested(comp, max_tokens=4, prompt=[1, 2, 3]) == 4  # one prompt of token ids
    assert _requested("/v1/responses", max_output_tokens=33) == 33
    assert _requested("/v1/messages", max_tokens=12) == 12


def test_messages_usage_counts_the_cached_prompt_too() -> None:
    event = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"input_tokens":4,"output_tokens":6,"cache_read_input_tokens":32,'
        b'"cache_creation_input_tokens":0}}\n\n'
    )
    assert parse_usage(event) == (36, 6)
    assert parse_usage({"usage": {"input_tokens": 4, "output_tokens": 6}}) == (4, 6)
    assert parse_usage(
        {"usage": {"input_tokens": 4, "output_tokens": 6, "cache_read_input_tokens": 8}}
    ) == (12, 6)
    responses = b'{"usage":{"input_tokens":40,"input_tokens_details":{"cached_tokens":32},"output_tokens":2}}'
    assert parse_usage(responses) == (40, 2)  # the Responses API's input_tokens is the whole prompt
