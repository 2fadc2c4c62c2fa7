"""The simulator's rendering against vLLM 0.32's own serialisation.

The ``VLLM_*`` strings below were produced by vLLM 0.32's pydantic models, built the way its serving
code builds them (``ChatCompletionStreamResponse(...).model_dump_json(exclude_unset=True)`` and so
on) with id ``chatcmpl-abc``/``cmpl-abc``, created 1700000000 and model ``sim-model``. The simulator
must render the same bytes for the same inputs.
"""

from __future__ import annotations

import json

import orjson
import pytest

from vllm_gateway_tools.simulator import render, render_openai

VLLM_CHAT_FIRST = '{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1700000000,"model":"sim-model","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}'
VLLM_CHAT_TOKEN = '{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1700000000,"model":"sim-model","choices":[{"index":0,"delta":{"content":" tok0"},"logprobs":null,"finish_reason":null,"token_ids":null}]}'
VLLM_CHAT_LAST = '{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1700000000,"model":"sim-model","choices":[{"index":0,"delta":{"content":" tok7"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}'
VLLM_CHAT_USAGE = '{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1700000000,"model":"sim-model","choices":[],"usage":{"prompt_tokens":5,"total_tokens":13,"completion_tokens":8}}'
VLLM_CMPL_TOKEN = '{"id":"cmpl-abc","object":"text_completion","created":1700000000,"model":"sim-model","choices":[{"index":0,"text":" tok0","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}'
VLLM_CMPL_LAST = '{"id":"cmpl-abc","object":"text_completion","created":1700000000,"model":"sim-model","choices":[{"index":0,"text":" tok7","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}'
VLLM_CMPL_USAGE = '{"id":"cmpl-abc","object":"text_completion","created":1700000000,"model":"sim-model","choices":[],"usage":{"prompt_tokens":5,"total_tokens":13,"completion_tokens":8}}'
VLLM_CHAT_FULL = '{"id": "chatcmpl-abc", "object": "chat.completion", "created": 1700000000, "model": "sim-model", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x", "refusal": null, "annotations": null, "audio": null, "function_call": null, "reasoning": null}, "logprobs": null, "finish_reason": "length", "stop_reason": null, "token_ids": null, "routed_experts": null}], "service_tier": null, "system_fingerprint": null, "usage": {"prompt_tokens": 5, "total_tokens": 13, "completion_tokens": 8, "prompt_tokens_details": null, "completion_tokens_details": null}, "prompt_logprobs": null, "prompt_token_ids": null, "prompt_text": null, "kv_transfer_params": null, "ec_transfer_params": null, "metrics": null}'
VLLM_CMPL_FULL = '{"id": "cmpl-abc", "object": "text_completion", "created": 1700000000, "model": "sim-model", "choices": [{"index": 0, "text": "x", "logprobs": null, "finish_reason": "length", "stop_reason": null, "token_ids": null, "prompt_logprobs": null, "prompt_token_ids": null, "routed_experts": null}], "service_tier": null, "system_fingerprint": null, "usage": {"prompt_tokens": 5, "total_tokens": 13, "completion_tokens": 8, "prompt_tokens_details": null, "completion_tokens_details": null}, "kv_transfer_params": null, "ec_transfer_params": null, "metrics": null}'
VLLM_NOT_FOUND = (
    '{"error": {"message": "m", "type": "NotFoundError", "param": "model", "code": 404}}'
)
VLLM_MODEL_KEYS = [
    "id",
    "object",
    "created",
    "owned_by",
    "root",
    "parent",
    "max_model_len",
    "permission",
]
VLLM_PERMISSION_KEYS = ["id", "object", "created", "allow_create_engine", "allow_sampling", "allow_logprobs",
                        "allow_search_indices", "allow_view", "allow_fine_tuning", "organization", "group",
                        "is_blocking"]  # fmt: skip


def _event(line: bytes) -> str:
    """The JSON of one SSE event, checking its framing."""
    assert line.startswith(b"data: ") and line.endswith(b"\n\n") and line.count(b"\n") == 2
    return line[len(b"data: ") : -2].decode()


def _chat() -> render_openai.StreamTemplate:
    return render_openai.StreamTemplate(
        chat=True, request_id="chatcmpl-abc", model="sim-model", created=1700000000
    )


def _cmpl() -> render_openai.StreamTemplate:
    return render_openai.StreamTemplate(
        chat=False, request_id="cmpl-abc", model="sim-model", created=1700000000
    )


def test_chat_stream_chunks_match_vllm_bytes() -> None:
    t = _chat()
    first = t.first()
    assert first is not None
    assert _event(first) == VLLM_CHAT_FIRST
    assert _event(t.token(" tok0")) == VLLM_CHAT_TOKEN
    assert _event(t.token(" tok7", "length")) == VLLM_CHAT_LAST
    assert _event(t.usage(5, 8)) == VLLM_CHAT_USAGE


def test_completion_stream_chunks_match_vllm_bytes() -> None:
    t = _cmpl()
    assert t.first() is None  # vLLM's completions stream has no role chunk
    assert _event(t.token(" tok0")) == VLLM_CMPL_TOKEN
    assert _event(t.token(" tok7", "length")) == VLLM_CMPL_LAST
    assert _event(t.usage(5, 8)) == VLLM_CMPL_USAGE


def test_whole_responses_match_vllm_json() -> None:
    common = dict(model="sim-model", created=1700000000, text="x", finish_reason="length",
                  prompt_tokens=5, completion_tokens=8)  # fmt: skip
    chat = render_openai.chat_response(request_id="chatcmpl-abc", **common)  # type: ignore[arg-type]
    cmpl = render_openai.completion_response(request_id="cmpl-abc", **common)  # type: ignore[arg-type]
    # Same keys in the same order, same values.
    assert list(orjson.loads(chat).items()) == list(json.loads(VLLM_CHAT_FULL).items())
    assert list(orjson.loads(cmpl).items()) == list(json.loads(VLLM_CMPL_FULL).items())


@pytest.mark.parametrize("text", [' quote " and \\ backslash', "newline\nand tab\t", "ünïcödé ✓"])
def test_token_text_is_json_escaped(text: str) -> None:
    for t in (_chat(), _cmpl()):
        chunk = json.loads(_event(t.token(text)))
        got = chunk["choices"][0]["delta"]["content"] if t.chat else chunk["choices"][0]["text"]
        assert got == text


def test_request_id_and_model_are_escaped() -> None:
    t = render_openai.StreamTemplate(chat=True, request_id='chatcmpl-"x"', model="m\\1", created=1)
    chunk = json.loads(_event(t.token(" a")))
    assert (chunk["id"], chunk["model"]) == ('chatcmpl-"x"', "m\\1")


def test_chunk_size_is_near_vllms() -> None:
    # A real id is "chatcmpl-" + 16 hex digits; vLLM's content chunks are about 200 bytes.
    t = render_openai.StreamTemplate(
        chat=True, request_id="chatcmpl-" + "0" * 16, model="sim-model", created=1700000000
    )
    assert 180 <= len(t.token(render.token_text(12))) <= 260


def test_tokens_are_deterministic() -> None:
    assert [render.token_text(i) for i in range(3)] == [" tok0", " tok1", " tok2"]


def test_frame_is_one_http_chunk() -> None:
    event = b"data: {}\n\n"
    assert render.frame(event) == b"a\r\ndata: {}\n\n\r\n"
    big = b"x" * 300
    assert render.frame(big) == b"12c\r\n" + big + b"\r\n"
    assert render.LAST_CHUNK == b"0\r\n\r\n"


def test_error_body_matches_vllm_error_response() -> None:
    body = render.error_body("m", 404, param="model", err_type="NotFoundError")
    assert list(orjson.loads(body).items()) == list(json.loads(VLLM_NOT_FOUND).items())


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "BadRequestError"), (404, "NotFoundError"), (500, "InternalServerError"),
     (503, "ServiceUnavailableError"), (429, "Too Many Requests"), (599, "InternalServerError")],
)  # fmt: skip
def test_error_type_follows_vllm(status: int, kind: str) -> None:
    assert render.error_type(status) == kind
    assert orjson.loads(render.error_body("m", status))["error"] == {
        "message": "m", "type": kind, "param": None, "code": status,
    }  # fmt: skip


def test_traceback_body_leaks_a_trace_and_a_path() -> None:
    error = orjson.loads(render.traceback_body("r1"))["error"]
    assert error["code"] == 500 and error["type"] == "InternalServerError"
    assert "Traceback (most recent call last)" in error["message"]
    assert "/opt/vllm/" in error["message"]


def test_models_body_has_vllms_fields() -> None:
    body = orjson.loads(render.models_body(("a", "b"), max_model_len=2048, created=1))
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a", "b"]
    for card in body["data"]:
        assert list(card) == VLLM_MODEL_KEYS
        assert (card["owned_by"], card["root"], card["parent"], card["max_model_len"]) == (
            "vllm",
            card["id"],
            None,
            2048,
        )
        assert [list(p) for p in card["permission"]] == [VLLM_PERMISSION_KEYS]


def test_response_heads_are_http11() -> None:
    head = render.response_head(404, b"application/json", 12, close=True)
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n") and head.endswith(b"\r\n\r\n")
    assert b"\r\ncontent-length: 12\r\n" in head and b"\r\nconnection: close\r\n" in head
    assert b"\r\ndate: " in head
    assert b"connection" not in render.response_head(200, None, 0, close=False)
    stream = render.stream_head()
    assert b"\r\ntransfer-encoding: chunked\r\n" in stream
    assert b"\r\ncontent-type: text/event-stream; charset=utf-8\r\n" in stream
    assert b"content-length" not in stream


# Chunks with logprobs and continuous usage statistics, and a choice other than the first, made
# the same way (``chunk.usage = UsageInfo(...)`` set after the chunk, as the serving code does).
VLLM_CHAT_LOGPROBS = '{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1700000000,"model":"sim-model","choices":[{"index":1,"delta":{"content":" tok2"},"logprobs":{"content":[{"token":" tok2","logprob":-0.3125,"bytes":[32,116,111,107,50],"top_logprobs":[{"token":" tok2","logprob":-0.3125,"bytes":[32,116,111,107,50]},{"token":" alt1","logprob":-0.8125,"bytes":[32,97,108,116,49]},{"token":" alt2","logprob":-1.3125,"bytes":[32,97,108,116,50]}]}]},"finish_reason":null,"token_ids":null}],"usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3,"completion_tokens_details":null}}'
VLLM_CHAT_ROLE_USAGE = '{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1700000000,"model":"sim-model","choices":[{"index":1,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":5,"total_tokens":5,"completion_tokens":0,"completion_tokens_details":null},"prompt_token_ids":null,"prompt_text":null}'
VLLM_CMPL_LOGPROBS = '{"id":"cmpl-abc","object":"text_completion","created":1700000000,"model":"sim-model","choices":[{"index":2,"text":" tok2","logprobs":{"text_offset":[10],"token_logprobs":[-0.3125],"tokens":[" tok2"],"top_logprobs":[{" tok2":-0.3125," alt1":-0.8125}]},"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}],"usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3}}'


def test_chat_logprobs_and_continuous_usage_render_as_vllm() -> None:
    t = _chat()
    lp = render_openai.chat_logprobs(2, 0, 3)
    chunk = t.token(" tok2", index=1, logprobs=lp, usage=t.chunk_usage(5, 3))
    assert _event(chunk) == VLLM_CHAT_LOGPROBS
    first = t.first(1, t.chunk_usage(5, 0))
    assert first is not None and _event(first) == VLLM_CHAT_ROLE_USAGE


def test_completion_logprobs_and_continuous_usage_render_as_vllm() -> None:
    t = _cmpl()
    lp = render_openai.completion_logprobs(2, 0, 2, 10)
    assert _event(t.token(" tok2", index=2, logprobs=lp, usage=t.chunk_usage(5, 3))) == (
        VLLM_CMPL_LOGPROBS
    )
