"""``/v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic Messages API, as vLLM serves it).

Output length: the answer is ``tokens`` tokens long; ``max_tokens`` (required) cuts it short,
which ends with ``stop_reason: max_tokens``, else ``end_turn``. Body validation errors use
vLLM's OpenAI-shaped envelope; handler errors (unknown model, prompt too long, the ``status`` and
``error_traceback`` faults) use Anthropic's envelope with vLLM's type names.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from vllm_gateway_tools.simulator import render
from vllm_gateway_tools.simulator.engine import Job
from vllm_gateway_tools.simulator.exchange import (
    Conn,
    Req,
    begin,
    context_error,
    int_field,
    reject,
    request_id,
    resolve_model,
    unknown_model,
)
from vllm_gateway_tools.simulator.render_messages import MessagesScript, count_tokens_body
from vllm_gateway_tools.simulator.tokenizer import chat_messages, chat_tokens, content_text

__all__ = ["count_tokens", "messages"]

_ROLES = ("user", "assistant", "system")


def _validate(body: dict[str, Any], *, max_tokens: bool) -> list[dict[str, Any]]:
    """What pydantic reports for the request's fields (vLLM's ``AnthropicMessagesRequest``)."""
    errors = []
    if not isinstance(body.get("model"), str):
        errors.append(render.missing("body.model", body))
    msgs = body.get("messages")
    if msgs is None:
        errors.append(render.missing("body.messages", body))
    elif not isinstance(msgs, list):
        errors.append({"type": "list_type", "loc": "body.messages",
                       "msg": "Input should be a valid list", "input": msgs})  # fmt: skip
    else:
        for i, m in enumerate(msgs):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in _ROLES:
                errors.append({"type": "literal_error", "loc": f"body.messages.{i}.role",
                               "msg": "Input should be 'user', 'assistant' or 'system'",
                               "input": role,
                               "ctx": {"expected": "'user', 'assistant' or 'system'"}})  # fmt: skip
    if max_tokens:
        if body.get("max_tokens") is None:
            errors.append(render.missing("body.max_tokens", body))
        else:
            _, error = int_field(body, "max_tokens")
            if error is not None:
                errors.append(error)
    return errors


def _conversation(body: dict[str, Any]) -> list[tuple[str, str]]:
    system = content_text(body.get("system"))
    head = [("system", system)] if system else []
    return head + chat_messages(body["messages"])


def messages(conn: Conn, req: Req) -> None:
    started = begin(conn, req)
    if started is None:
        return
    record, body, cfg = started
    stream = body.get("stream") is True
    record["stream"] = stream
    errors = _validate(body, max_tokens=True)
    if errors:
        reject(conn, req, record, 400, render.validation_body(errors))
        return
    model = resolve_model(conn.state, body, record)
    if model is None:
        message = unknown_model(conn.state, record["model"])
        reject(conn, req, record, 404, render.anthropic_error_body(message, "NotFoundError"))
        return
    prompt_tokens = max(1, chat_tokens(_conversation(body)))
    if prompt_tokens >= cfg.max_model_len:
        message = context_error(cfg.max_model_len, prompt_tokens)
        reject(conn, req, record, 400, render.anthropic_error_body(message, "BadRequestError"))
        return
    max_tokens = int(body["max_tokens"])
    if max_tokens < 1:
        message = f"max_tokens must be at least 1, got {max_tokens}."
        reject(conn, req, record, 400, render.anthropic_error_body(message, "BadRequestError"))
        return
    limit = min(max_tokens, cfg.max_model_len - prompt_tokens)
    script = MessagesScript(
        request_id=request_id(req, "chatcmpl-"),
        model=model,
        n=min(limit, cfg.tokens),
        finish="length" if limit < cfg.tokens else "stop",
        prompt_tokens=prompt_tokens,
        created=int(time.time()),
        stream=stream,
    )
    conn.run(Job(state=conn.state, cfg=cfg, record=record, script=script, route=req.route,
                 sink=conn, loop=conn.loop))  # fmt: skip


def count_tokens(conn: Conn, req: Req) -> None:
    """The prompt size ``/v1/messages`` would count; no generation."""
    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        conn.reply(req, 400, render.not_json())
        return
    errors = _validate(body, max_tokens=False)
    if errors:
        conn.reply(req, 400, render.validation_body(errors))
        return
    state = conn.state
    if body["model"] not in state.models():
        message = unknown_model(state, body["model"])
        conn.reply(req, 404, render.anthropic_error_body(message, "NotFoundError"))
        return
    conn.reply(req, 200, count_tokens_body(max(1, chat_tokens(_conversation(body)))))
