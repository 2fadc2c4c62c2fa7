"""The Responses, Messages, audio, batch and pooling bytes against vLLM 0.32's.

The ``VLLM_*`` constants are response bodies captured from a real vLLM 0.32 (SmolLM2 served as
``smol``, all-MiniLM-L6-v2 as ``minilm``, a SmolLM2 classifier as ``smol-rerank``). The simulator's
scripts are given the same ids, timestamps, sizes and request fields, and must render the same
bytes once the model's text is swapped for the simulator's `` tok0``, `` tok1``, ...
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest

from vllm_gateway_tools.simulator import render, render_openai, render_pooling
from vllm_gateway_tools.simulator.render_audio import AudioScript
from vllm_gateway_tools.simulator.render_messages import MessagesScript, count_tokens_body
from vllm_gateway_tools.simulator.render_responses import ResponsesScript, not_found_body

VLLM_RESPONSES_STREAM = (
    "event: response.created\n"
    'data: {"response":{"id":"resp_b5a136267835dccd","created_at":1796120094,"incomplete_details":null,"instructions":null,"metadata":null,"model":"smol","object":"response","output":[],"parallel_tool_calls":true,"temperature":0.0,"tool_choice":"none","tools":[],"top_p":1.0,"background":false,"max_output_tokens":3,"max_tool_calls":null,"previous_response_id":null,"prompt":null,"reasoning":null,"service_tier":"auto","status":"in_progress","text":null,"top_logprobs":null,"truncation":"disabled","usage":null,"user":null,"presence_penalty":0.0,"frequency_penalty":0.0,"kv_transfer_params":null,"ec_transfer_params":null,"input_messages":null,"output_messages":null},"sequence_number":0,"type":"response.created"}\n'
    "\n"
    "event: response.in_progress\n"
    'data: {"response":{"id":"resp_b5a136267835dccd","created_at":1796120094,"incomplete_details":null,"instructions":null,"metadata":null,"model":"smol","object":"response","output":[],"parallel_tool_calls":true,"temperature":0.0,"tool_choice":"none","tools":[],"top_p":1.0,"background":false,"max_output_tokens":3,"max_tool_calls":null,"previous_response_id":null,"prompt":null,"reasoning":null,"service_tier":"auto","status":"in_progress","text":null,"top_logprobs":null,"truncation":"disabled","usage":null,"user":null,"presence_penalty":0.0,"frequency_penalty":0.0,"kv_transfer_params":null,"ec_transfer_params":null,"input_messages":null,"output_messages":null},"sequence_number":1,"type":"response.in_progress"}\n'
    "\n"
    "event: response.output_item.added\n"
    'data: {"item":{"id":"msg_9da7844e22ef9de4","content":[],"role":"assistant","status":"in_progress","type":"message","phase":null},"output_index":0,"sequence_number":2,"type":"response.output_item.added"}\n'
    "\n"
    "event: response.content_part.added\n"
    'data: {"content_index":0,"item_id":"msg_9da7844e22ef9de4","output_index":0,"part":{"annotations":[],"text":"","type":"output_text","logprobs":[]},"sequence_number":3,"type":"response.content_part.added"}\n'
    "\n"
    "event: response.output_text.delta\n"
    'data: {"content_index":0,"delta":"In","item_id":"msg_9da7844e22ef9de4","logprobs":[],"output_index":0,"sequence_number":4,"type":"response.output_text.delta"}\n'
    "\n"
    "event: response.output_text.delta\n"
    'data: {"content_index":0,"delta":" the","item_id":"msg_9da7844e22ef9de4","logprobs":[],"output_index":0,"sequence_number":5,"type":"response.output_text.delta"}\n'
    "\n"
    "event: response.output_text.delta\n"
    'data: {"content_index":0,"delta":" depths","item_id":"msg_9da7844e22ef9de4","logprobs":[],"output_index":0,"sequence_number":6,"type":"response.output_text.delta"}\n'
    "\n"
    "event: response.output_text.done\n"
    'data: {"content_index":0,"item_id":"msg_9da7844e22ef9de4","logprobs":[],"output_index":0,"sequence_number":7,"text":"In the depths","type":"response.output_text.done"}\n'
    "\n"
    "event: response.content_part.done\n"
    'data: {"content_index":0,"item_id":"msg_9da7844e22ef9de4","output_index":0,"part":{"annotations":[],"text":"In the depths","type":"output_text","logprobs":null},"sequence_number":8,"type":"response.content_part.done"}\n'
    "\n"
    "event: response.output_item.done\n"
    'data: {"item":{"id":"msg_9da7844e22ef9de4","content":[{"annotations":[],"text":"In the depths","type":"output_text","logprobs":null}],"role":"assistant","status":"completed","type":"message","phase":null},"output_index":0,"sequence_number":9,"type":"response.output_item.done"}\n'
    "\n"
    "event: response.completed\n"
    'data: {"response":{"id":"resp_b5a136267835dccd","created_at":1796120094,"incomplete_details":{"reason":"max_output_tokens"},"instructions":null,"metadata":null,"model":"smol","object":"response","output":[{"id":"msg_9da7844e22ef9de4","content":[{"annotations":[],"text":"In the depths","type":"output_text","logprobs":null}],"role":"assistant","status":"completed","type":"message","phase":null}],"parallel_tool_calls":true,"temperature":0.0,"tool_choice":"none","tools":[],"top_p":1.0,"background":false,"max_output_tokens":3,"max_tool_calls":null,"previous_response_id":null,"prompt":null,"reasoning":null,"service_tier":"auto","status":"incomplete","text":null,"top_logprobs":null,"truncation":"disabled","usage":{"input_tokens":38,"input_tokens_details":{"cached_tokens":0,"cache_write_tokens":0,"input_tokens_per_turn":[],"cached_tokens_per_turn":[]},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":0,"tool_output_tokens":0,"output_tokens_per_turn":[],"tool_output_tokens_per_turn":[]},"total_tokens":41},"user":null,"presence_penalty":0.0,"frequency_penalty":0.0,"kv_transfer_params":null,"ec_transfer_params":null,"input_messages":null,"output_messages":null},"sequence_number":10,"type":"response.completed"}\n'
    "\n"
)
VLLM_MESSAGES_STREAM = (
    "event: message_start\n"
    'data: {"type":"message_start","message":{"id":"chatcmpl-aba5e04631281d61","type":"message","role":"assistant","content":[],"model":"smol","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":38,"output_tokens":0}}}\n'
    "\n"
    "event: content_block_start\n"
    'data: {"type":"content_block_start","content_block":{"type":"text","text":""},"index":0}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"In"},"index":0}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":" twilight"},"index":0}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":" of"},"index":0}\n'
    "\n"
    "event: content_block_stop\n"
    'data: {"type":"content_block_stop","index":0}\n'
    "\n"
    "event: message_delta\n"
    'data: {"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},"usage":{"input_tokens":38,"output_tokens":3}}\n'
    "\n"
    "event: message_stop\n"
    'data: {"type":"message_stop"}\n'
    "\n"
)
VLLM_RESPONSES_WHOLE = '{"id":"resp_b45c7e353e6e5117","created_at":1796120081,"incomplete_details":null,"instructions":null,"metadata":null,"model":"smol","object":"response","output":[{"id":"msg_b5ae7ee4364aacdd","content":[{"annotations":[],"text":"The capital of France is Paris.","type":"output_text","logprobs":null}],"role":"assistant","status":"completed","type":"message","phase":null}],"parallel_tool_calls":true,"temperature":0.0,"tool_choice":"none","tools":[],"top_p":1.0,"background":false,"max_output_tokens":16,"max_tool_calls":null,"previous_response_id":null,"prompt":null,"reasoning":null,"service_tier":"auto","status":"completed","text":null,"top_logprobs":null,"truncation":"disabled","usage":{"input_tokens":42,"input_tokens_details":{"cached_tokens":0,"cache_write_tokens":0,"input_tokens_per_turn":[],"cached_tokens_per_turn":[]},"output_tokens":8,"output_tokens_details":{"reasoning_tokens":0,"tool_output_tokens":0,"output_tokens_per_turn":[],"tool_output_tokens_per_turn":[]},"total_tokens":50},"user":null,"presence_penalty":0.0,"frequency_penalty":0.0,"kv_transfer_params":null,"ec_transfer_params":null,"input_messages":null,"output_messages":null}'
VLLM_MESSAGES_WHOLE = '{"id":"chatcmpl-a1743515845aab76","type":"message","role":"assistant","content":[{"type":"text","text":"The capital of France is Paris."}],"model":"smol","stop_reason":"end_turn","usage":{"input_tokens":42,"output_tokens":8}}'
VLLM_RESPONSES_QUEUED = '{"id":"resp_87c83a71ca97c745","created_at":1796120981,"incomplete_details":null,"instructions":null,"metadata":null,"model":"smol","object":"response","output":[],"parallel_tool_calls":true,"temperature":1.0,"tool_choice":"none","tools":[],"top_p":1.0,"background":true,"max_output_tokens":40,"max_tool_calls":null,"previous_response_id":null,"prompt":null,"reasoning":null,"service_tier":"auto","status":"queued","text":null,"top_logprobs":null,"truncation":"disabled","usage":null,"user":null,"presence_penalty":0.0,"frequency_penalty":0.0,"kv_transfer_params":null,"ec_transfer_params":null,"input_messages":null,"output_messages":null}'
VLLM_RESPONSES_CANCELLED = '{"id":"resp_9698d56f634b0699","created_at":1796121012,"incomplete_details":null,"instructions":null,"metadata":null,"model":"smol","object":"response","output":[],"parallel_tool_calls":true,"temperature":1.0,"tool_choice":"none","tools":[],"top_p":1.0,"background":true,"max_output_tokens":400,"max_tool_calls":null,"previous_response_id":null,"prompt":null,"reasoning":null,"service_tier":"auto","status":"cancelled","text":null,"top_logprobs":null,"truncation":"disabled","usage":null,"user":null,"presence_penalty":0.0,"frequency_penalty":0.0,"kv_transfer_params":null,"ec_transfer_params":null,"input_messages":null,"output_messages":null}'
VLLM_BATCH = '{"id":"chatcmpl-8a87f1e1c396006d","object":"chat.completion","created":1796120127,"model":"smol","choices":[{"index":0,"message":{"role":"assistant","content":"La France, la France. La France","refusal":null,"annotations":null,"audio":null,"function_call":null,"reasoning":null},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null,"routed_experts":null},{"index":1,"message":{"role":"assistant","content":"The capital of Italy is Rome.","refusal":null,"annotations":null,"audio":null,"function_call":null,"reasoning":null},"logprobs":null,"finish_reason":"stop","stop_reason":null,"token_ids":null,"routed_experts":null}],"service_tier":null,"system_fingerprint":"vllm-0.32.0-48feacd7","usage":{"prompt_tokens":68,"total_tokens":84,"completion_tokens":16,"prompt_tokens_details":null,"completion_tokens_details":null},"prompt_logprobs":null,"prompt_token_ids":null,"prompt_text":null,"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}'
VLLM_RERANK = '{"id":"score-a739c07eec74dcc5","model":"minilm","usage":{"prompt_tokens":23,"total_tokens":23},"results":[{"index":1,"document":{"text":"The cat sat on the mat.","multi_modal":null},"relevance_score":0.35373175144195557},{"index":0,"document":{"text":"Stock markets fell today.","multi_modal":null},"relevance_score":0.03449180722236633}]}'
VLLM_SCORE = '{"id":"score-b0289b892f72c722","object":"list","created":1796121528,"model":"minilm","data":[{"index":0,"object":"score","score":0.35373175144195557},{"index":1,"object":"score","score":0.03449180722236633}],"usage":{"prompt_tokens":23,"total_tokens":23,"completion_tokens":0,"prompt_tokens_details":null,"completion_tokens_details":null}}'
VLLM_CLASSIFY = '{"id":"classify-bec4e99dac1b85a0","object":"list","created":1796121706,"model":"smol-rerank","data":[{"index":0,"label":"LABEL_0","probs":[0.05959627777338028],"num_classes":1},{"index":1,"label":"LABEL_0","probs":[0.07673594355583191],"num_classes":1}],"usage":{"prompt_tokens":12,"total_tokens":12,"completion_tokens":0,"prompt_tokens_details":null,"completion_tokens_details":null}}'
VLLM_POOLING_CLS = '{"id":"pooling-86a1bc966e2e0b04","object":"list","created":1796121713,"model":"smol-rerank","data":[{"index":0,"object":"pooling","data":[0.05959627777338028]}],"usage":{"prompt_tokens":7,"total_tokens":7,"completion_tokens":0,"prompt_tokens_details":null,"completion_tokens_details":null}}'
VLLM_COUNT_TOKENS = '{"input_tokens":37,"context_management":{"original_input_tokens":37}}'

# From vLLM's own pydantic models (no speech model runs here): TranscriptionStreamResponse and
# TranslationStreamResponse dumped as its speech-to-text serving code dumps them.
VLLM_TRSC_TOKEN = '{"id":"trsc-abc","object":"transcription.chunk","created":1700000000,"model":"m","choices":[{"delta":{"content":" tok0"}}]}'
VLLM_TRSC_LAST = '{"id":"trsc-abc","object":"transcription.chunk","created":1700000000,"model":"m","choices":[{"delta":{"content":" tok7"},"finish_reason":"stop","stop_reason":null}]}'
VLLM_TRSC_USAGE = '{"id":"trsc-abc","object":"transcription.chunk","created":1700000000,"model":"m","choices":[],"usage":{"prompt_tokens":5,"total_tokens":13,"completion_tokens":8}}'
VLLM_TRSL_TOKEN = '{"id":"trsc-abc","object":"translation.chunk","created":1700000000,"model":"m","choices":[{"delta":{"content":" tok0"}}]}'
VLLM_TRSC_WHOLE = '{"text": "x", "usage": {"type": "duration", "seconds": 3}}'
# The first eight numbers of a captured /v1/embeddings vector (float32, printed shortest).
VLLM_EMBED_FLOATS = ["0.13024518", "-0.015794843", "-0.036766667", "0.058090545", "-0.059853766",
                     "0.032982532", "0.030154396", "0.028986424"]  # fmt: skip
# The first 32 bytes of a captured base64 embedding, and the float32 numbers they hold.
VLLM_EMBED_B64 = "qZ+AvXoHYT3Jo1U9OdCvPfKWqb1F15i9HHGMPQzqlzw="


def _swap(text: str, words: list[str]) -> str:
    """``text`` with the model's words replaced by the simulator's tokens, in order."""
    for i, word in enumerate(words):
        text = text.replace(f'"delta":{orjson.dumps(word).decode()}', f'"delta":" tok{i}"', 1)
        text = text.replace(f'"text":{orjson.dumps(word).decode()}', f'"text":" tok{i}"', 1)
    return text.replace(orjson.dumps("".join(words)).decode(),
                        orjson.dumps(render.output_text(len(words))).decode())  # fmt: skip


def _stream(script: render.Script) -> bytes:
    events = script.opening() + script.first()
    events += [script.token(i, i == script.n - 1) for i in range(script.n)]
    return b"".join(events + script.closing())


def _responses(**kw: Any) -> ResponsesScript:
    return ResponsesScript(model="smol", finish="stop", **kw)


# --- Responses -------------------------------------------------------------------------------------
def test_responses_stream_is_vllms_bytes() -> None:
    body = {"model": "smol", "input": "Write a long poem about the sea.", "max_output_tokens": 3,
            "temperature": 0, "stream": True}  # fmt: skip
    script = _responses(request_id="resp_b5a136267835dccd", item_id="msg_9da7844e22ef9de4",
                        created=1796120094, n=3, prompt_tokens=38, body=body,
                        max_output_tokens=3, stream=True)  # fmt: skip
    script.finish = "length"
    expected = _swap(VLLM_RESPONSES_STREAM, ["In", " the", " depths"])
    assert _stream(script).decode() == expected


def test_responses_whole_queued_and_cancelled_are_vllms_bytes() -> None:
    body = {"model": "smol", "input": "What is the capital of France? Answer in one word.",
            "max_output_tokens": 16, "temperature": 0}  # fmt: skip
    whole = _responses(request_id="resp_b45c7e353e6e5117", item_id="msg_b5ae7ee4364aacdd",
                       created=1796120081, n=8, prompt_tokens=42, body=body,
                       max_output_tokens=16, stream=False)  # fmt: skip
    expected = VLLM_RESPONSES_WHOLE.replace('"The capital of France is Paris."',
                                            orjson.dumps(render.output_text(8)).decode())  # fmt: skip
    assert whole.whole().decode() == expected
    queued = _responses(request_id="resp_87c83a71ca97c745", item_id="msg_x", created=1796120981,
                        n=1, prompt_tokens=1, max_output_tokens=40, stream=False,
                        body={"model": "smol", "input": "Write a haiku about the sea.",
                              "max_output_tokens": 40, "background": True})  # fmt: skip
    assert orjson.dumps(queued.obj("queued", False)).decode() == VLLM_RESPONSES_QUEUED
    cancelled = _responses(request_id="resp_9698d56f634b0699", item_id="msg_x",
                           created=1796121012, n=1, prompt_tokens=1, max_output_tokens=400,
                           stream=False, body={"input": "x", "background": True})  # fmt: skip
    assert orjson.dumps(cancelled.obj("cancelled", False)).decode() == VLLM_RESPONSES_CANCELLED


def test_responses_sequence_numbers_count_every_event() -> None:
    script = _responses(request_id="resp_1", item_id="msg_1", created=1, n=5, prompt_tokens=3,
                        body={"input": "x"}, max_output_tokens=99, stream=True)  # fmt: skip
    events = _stream(script).decode().split("\n\n")[:-1]
    payloads = [orjson.loads(e.split("\ndata: ", 1)[1]) for e in events]
    assert [p["sequence_number"] for p in payloads] == list(range(len(events)))
    for event, payload in zip(events, payloads, strict=True):
        assert event.startswith(f"event: {payload['type']}\ndata: ")
    assert payloads[-1]["response"]["status"] == "completed"
    assert payloads[-1]["response"]["incomplete_details"] is None


def test_responses_echo_request_fields_and_tool_choice() -> None:
    body = {"input": "x", "instructions": "be brief", "metadata": {"k": "v"}, "temperature": 0.5,
            "top_p": 0.9, "tools": [{"type": "function", "name": "f"}], "tool_choice": "auto",
            "previous_response_id": "resp_prev", "user": "u1"}  # fmt: skip
    obj = _responses(request_id="resp_1", item_id="msg_1", created=1, n=1, prompt_tokens=1,
                     body=body, max_output_tokens=7, stream=False).final_object()  # fmt: skip
    assert (obj["instructions"], obj["metadata"], obj["temperature"], obj["top_p"]) == (
        "be brief", {"k": "v"}, 0.5, 0.9)  # fmt: skip
    assert (obj["tool_choice"], obj["previous_response_id"], obj["user"]) == (
        "auto",
        "resp_prev",
        "u1",
    )
    assert obj["max_output_tokens"] == 7


def test_responses_not_found_is_vllms_bytes() -> None:
    assert not_found_body("resp_doesnotexist") == (
        b'{"error":{"message":"Response with id \'resp_doesnotexist\' not found.",'
        b'"type":"invalid_request_error","param":"response_id","code":404}}'
    )


# --- Messages --------------------------------------------------------------------------------------
def test_messages_stream_is_vllms_bytes() -> None:
    script = MessagesScript(request_id="chatcmpl-aba5e04631281d61", model="smol", n=3,
                            finish="length", prompt_tokens=38, created=1, stream=True)  # fmt: skip
    expected = _swap(VLLM_MESSAGES_STREAM, ["In", " twilight", " of"])
    assert _stream(script).decode() == expected


def test_messages_whole_and_count_are_vllms_bytes() -> None:
    script = MessagesScript(request_id="chatcmpl-a1743515845aab76", model="smol", n=8,
                            finish="stop", prompt_tokens=42, created=1, stream=False)  # fmt: skip
    expected = VLLM_MESSAGES_WHOLE.replace('"The capital of France is Paris."',
                                           orjson.dumps(render.output_text(8)).decode())  # fmt: skip
    assert script.whole().decode() == expected
    assert count_tokens_body(37).decode() == VLLM_COUNT_TOKENS


@pytest.mark.parametrize(
    ("finish", "reason"), [("stop", "end_turn"), ("length", "max_tokens"), ("abort", None)]
)
def test_messages_stop_reason_follows_vllms_mapping(finish: str, reason: str | None) -> None:
    script = MessagesScript(request_id="chatcmpl-1", model="m", n=2, finish=finish,
                            prompt_tokens=1, created=1, stream=False)  # fmt: skip
    whole = orjson.loads(script.whole())
    assert whole.get("stop_reason") == reason and "stop_sequence" not in whole
    delta = orjson.loads(script.closing()[1].split(b"data: ", 1)[1])
    assert delta["delta"] == {"stop_reason": reason, "stop_sequence": None}


def test_messages_errors_use_the_anthropic_envelope() -> None:
    script = MessagesScript(request_id="chatcmpl-1", model="m", n=1, finish="stop",
                            prompt_tokens=1, created=1, stream=True)  # fmt: skip
    assert orjson.loads(script.error(503, "busy")) == {
        "type": "error", "error": {"type": "ServiceUnavailableError", "message": "busy"}}  # fmt: skip


# --- audio, batch ----------------------------------------------------------------------------------
def _event(line: bytes) -> str:
    assert line.startswith(b"data: ") and line.endswith(b"\n\n")
    return line[len(b"data: ") : -2].decode()


def test_audio_chunks_are_vllms_bytes() -> None:
    common = dict(request_id="trsc-abc", model="m", n=8, finish="stop", prompt_tokens=5,
                  created=1700000000, stream=True, include_usage=True, seconds=3)  # fmt: skip
    script = AudioScript(translate=False, **common)  # type: ignore[arg-type]
    assert _event(script.token(0, False)) == VLLM_TRSC_TOKEN
    assert _event(script.token(7, True)) == VLLM_TRSC_LAST
    usage, done = script.closing()
    assert (_event(usage), done) == (VLLM_TRSC_USAGE, render.DONE)
    translation = AudioScript(translate=True, **common)  # type: ignore[arg-type]
    assert _event(translation.token(0, False)) == VLLM_TRSL_TOKEN
    whole = AudioScript(translate=False, **{**common, "n": 1})  # type: ignore[arg-type]
    assert orjson.loads(whole.whole()) == {
        "text": " tok0",
        "usage": {"type": "duration", "seconds": 3},
    }
    assert list(orjson.loads(VLLM_TRSC_WHOLE)) == list(orjson.loads(whole.whole()))
    assert orjson.loads(translation.whole()) == {"text": render.output_text(8)}


def test_batch_body_has_vllms_keys() -> None:
    script = render_openai.BatchScript(request_id="chatcmpl-8a87f1e1c396006d", model="smol", n=8,
                                       finish="length", prompt_tokens=68, created=1796120127,
                                       conversations=2)  # fmt: skip
    ours, theirs = orjson.loads(script.whole()), orjson.loads(VLLM_BATCH)
    assert list(ours) == list(theirs)
    assert [list(c) for c in ours["choices"]] == [list(c) for c in theirs["choices"]]
    assert [c["index"] for c in ours["choices"]] == [0, 1]
    assert ours["usage"] == {**theirs["usage"], "completion_tokens": 16, "total_tokens": 84}
    assert ours["system_fingerprint"].startswith("vllm-0.32.0-")


# --- pooling ---------------------------------------------------------------------------------------
def test_pooling_bodies_are_vllms_bytes() -> None:
    rerank = render_pooling.rerank_body(
        request_id="score-a739c07eec74dcc5", model="minilm", top_n=2, prompt_tokens=23,
        documents=["Stock markets fell today.", "The cat sat on the mat."],
        scores=[0.03449180722236633, 0.35373175144195557])  # fmt: skip
    assert rerank.decode() == VLLM_RERANK
    score = render_pooling.score_body(request_id="score-b0289b892f72c722", model="minilm",
                                      created=1796121528, prompt_tokens=23,
                                      scores=[0.35373175144195557, 0.03449180722236633])  # fmt: skip
    assert score.decode() == VLLM_SCORE
    classify = render_pooling.classify_body(request_id="classify-bec4e99dac1b85a0",
                                            model="smol-rerank", created=1796121706,
                                            probs=[0.05959627777338028, 0.07673594355583191],
                                            prompt_tokens=12)  # fmt: skip
    assert classify.decode() == VLLM_CLASSIFY
    pooled = render_pooling.pooling_body(request_id="pooling-86a1bc966e2e0b04", model="smol-rerank",
                                         created=1796121713, vectors=[[0.05959627777338028]],
                                         prompt_tokens=7)  # fmt: skip
    assert pooled.decode() == VLLM_POOLING_CLS


def test_embeddings_print_float32_like_vllm() -> None:
    floats = [render_pooling.f32(float(x)) for x in VLLM_EMBED_FLOATS]
    body = render_pooling.embeddings_body(request_id="embd-1", model="minilm", created=1,
                                          vectors=[floats], encoding_format="float",
                                          prompt_tokens=3)  # fmt: skip
    assert b'"embedding":[' + ",".join(VLLM_EMBED_FLOATS).encode() + b"]" in body
    decoded = struct.unpack("<8f", base64.b64decode(VLLM_EMBED_B64))
    b64 = render_pooling.embeddings_body(request_id="embd-1", model="minilm", created=1,
                                         vectors=[list(decoded)], encoding_format="base64",
                                         prompt_tokens=3)  # fmt: skip
    assert orjson.loads(b64)["data"][0]["embedding"] == VLLM_EMBED_B64


def test_embedding_vectors_are_deterministic_unit_vectors() -> None:
    a, b = render_pooling.embed("hello"), render_pooling.embed("world")
    assert a == render_pooling.embed("hello") and a != b
    assert len(a) == render_pooling.DIM
    assert abs(sum(x * x for x in a) - 1.0) < 1e-6
    assert all(render_pooling.f32(x) == x for x in a)  # float32 values
    assert 0.0 <= render_pooling.probability("x") <= 1.0


def test_v2_embed_types() -> None:
    vec = render_pooling.embed("x")
    body = orjson.loads(render_pooling.v2_embed_body(request_id="embd-1", texts=["x"],
                                                     vectors=[vec],
                                                     types=["float", "binary", "ubinary", "base64"],
                                                     prompt_tokens=1))  # fmt: skip
    bits = int("".join("1" if x >= 0 else "0" for x in vec), 2)
    assert body["embeddings"]["float"] == [vec]
    assert body["embeddings"]["ubinary"] == [[bits]] and body["embeddings"]["binary"] == [
        [bits - 128]
    ]
    assert struct.unpack("<8f", base64.b64decode(body["embeddings"]["base64"][0])) == tuple(vec)
    assert list(body) == ["id", "embeddings", "texts", "meta", "response_type"]
    assert body["meta"] == {"api_version": {"version": "2"},
                            "billed_units": {"input_tokens": 1, "image_tokens": 0}}  # fmt: skip


# --- error envelopes -------------------------------------------------------------------------------
def test_validation_body_is_vllms_bytes() -> None:
    missing = render.validation_body([render.missing("body.input", {"a": 1, "b": 2, "c": 3})])
    assert missing == (
        b"{\"error\":{\"message\":\"1 validation error:\\n  {'type': 'missing', 'loc': 'body.input', "
        b"'msg': 'Field required', 'input': '<dict of 3 items>'}\",\"type\":\"Bad Request\","
        b'"param":"body.input","code":400}}'
    )
    assert render.not_json() == (
        b"{\"error\":{\"message\":\"1 validation error:\\n  {'type': 'json_invalid', 'loc': 'body.0', "
        b"'msg': 'JSON decode error', 'input': '<dict of 0 items>', 'ctx': {'error': "
        b'\'Expecting value\'}}","type":"Bad Request","param":"body.0","code":400}}'
    )
    many = orjson.loads(
        render.validation_body([render.missing(f"body.f{i}", None) for i in range(12)])
    )
    assert many["error"]["message"].startswith("12 validation errors:")
    assert many["error"]["message"].endswith("...and 2 more errors")


def test_http_error_body_uses_the_status_phrase() -> None:
    assert orjson.loads(render.http_error_body("There was an error parsing the body", 400)) == {
        "error": {"message": "There was an error parsing the body", "type": "Bad Request",
                  "param": None, "code": 400}}  # fmt: skip
