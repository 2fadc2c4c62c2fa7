"""``/tokenize`` and ``/detokenize`` with the simulator's toy tokenizer (``simulator.tokenizer``).

The counts agree with what the generation routes report: ``/tokenize`` of a conversation gives
the ``prompt_tokens`` a chat completion of it reports. Both routes exist on either runner and are
open even with an API key, as in vLLM. No pacing: they answer at once.
"""

from __future__ import annotations

from typing import Any

import orjson

from vllm_gateway_tools.simulator import render
from vllm_gateway_tools.simulator.exchange import Conn, Req, unknown_model
from vllm_gateway_tools.simulator.tokenizer import chat_messages

__all__ = ["detokenize", "tokenize"]


def _body(conn: Conn, req: Req) -> dict[str, Any] | None:
    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        conn.reply(req, 400, render.not_json())
        return None
    model = body.get("model")
    if model is not None and model not in conn.state.models():
        conn.reply(req, 404, render.error_body(unknown_model(conn.state, model), 404,
                                               param="model", err_type="NotFoundError"))  # fmt: skip
        return None
    return body


def tokenize(conn: Conn, req: Req) -> None:
    """The prompt variant (``prompt``) or the chat variant (``messages``)."""
    body = _body(conn, req)
    if body is None:
        return
    vocab = conn.state.vocab
    if isinstance(body.get("prompt"), str):
        if body.get("add_special_tokens") is False:
            tokens = vocab.encode_output(body["prompt"])  # the model's own text read back
        else:
            tokens = vocab.encode(body["prompt"])
    elif isinstance(body.get("messages"), list):
        tokens = vocab.encode_chat(chat_messages(body["messages"]))
    else:
        errors = [render.missing("body.prompt", body), render.missing("body.messages", body)]
        conn.reply(req, 400, render.validation_body(errors))
        return
    strs = [vocab.piece(t) for t in tokens] if body.get("return_token_strs") is True else None
    conn.reply(req, 200, orjson.dumps({"count": len(tokens),
                                       "max_model_len": conn.state.config.max_model_len,
                                       "tokens": tokens, "token_strs": strs}))  # fmt: skip


def detokenize(conn: Conn, req: Req) -> None:
    """``{"tokens": [...]}`` → ``{"prompt": text}``; an unknown id decodes to nothing."""
    body = _body(conn, req)
    if body is None:
        return
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        error = (
            render.missing("body.tokens", body)
            if tokens is None
            else {
                "type": "list_type",
                "loc": "body.tokens",
                "msg": "Input should be a valid list",
                "input": tokens,
            }
        )
        conn.reply(req, 400, render.validation_body([error]))
        return
    errors = []
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int):
            errors.append({"type": "int_type", "loc": f"body.tokens.{i}",
                           "msg": "Input should be a valid integer", "input": t})  # fmt: skip
        elif t < 0:
            errors.append({"type": "greater_than_equal", "loc": f"body.tokens.{i}",
                           "msg": "Input should be greater than or equal to 0", "input": t,
                           "ctx": {"ge": 0}})  # fmt: skip
    if errors:
        conn.reply(req, 400, render.validation_body(errors))
        return
    conn.reply(req, 200, orjson.dumps({"prompt": conn.state.vocab.decode(tokens)}))
