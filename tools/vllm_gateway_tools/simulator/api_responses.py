"""``/v1/responses``: create (streamed or not, in the background or not), retrieve, cancel.

Output length: the answer is ``tokens`` tokens long; ``max_output_tokens`` (or what the context
leaves) cuts it short, which ends the response ``incomplete`` with reason ``max_output_tokens``.
The store (``simulator.store``) works when the ``responses_store`` knob is on, as vLLM's does with
``VLLM_ENABLE_RESPONSES_API_STORE=1``; with it off, ``store`` is ignored, ``background`` is a 400
and every id is unknown.
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
    resolve_model,
    unknown_model,
)
from vllm_gateway_tools.simulator.render_responses import ResponsesScript, not_found_body
from vllm_gateway_tools.simulator.store import Stored
from vllm_gateway_tools.simulator.tokenizer import chat_messages, chat_tokens

__all__ = ["cancel", "create", "retrieve"]

_NO_STORE = (
    "This vLLM engine does not support `store=True` and therefore does not support the "
    "background mode. To enable these features, set the environment variable "
    "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server."
)
_TRUE = ("1", "true", "yes", "on", "t", "y")


def _invalid(message: str, status: int, param: str) -> bytes:
    return render.error_body(message, status, param=param, err_type="invalid_request_error")


def _input_messages(body: dict[str, Any]) -> list[tuple[str, str]] | dict[str, Any]:
    """The conversation the request renders, or the validation error of its ``input``."""
    value = body.get("input")
    if value is None:
        # vLLM's "before" validators have run by then: with no tools, tool_choice became "none".
        seen = dict(body)
        if not body.get("tools") and body.get("tool_choice", "auto") in ("auto", "none"):
            seen["tool_choice"] = "none"
        return render.missing("body.input", seen)
    messages: list[tuple[str, str]] = []
    if isinstance(body.get("instructions"), str):
        messages.append(("system", body["instructions"]))
    if isinstance(value, str):
        messages.append(("user", value))
    elif isinstance(value, list):
        messages += chat_messages(value)
    else:
        return {"type": "string_type", "loc": "body.input", "msg": "Input should be a valid string",
                "input": value}  # fmt: skip
    return messages


def create(conn: Conn, req: Req) -> None:
    started = begin(conn, req)
    if started is None:
        return
    record, body, cfg = started
    state, store = conn.state, conn.store
    stream = body.get("stream") is True
    record["stream"] = stream
    messages = _input_messages(body)
    limit, int_error = int_field(body, "max_output_tokens")
    errors = [messages] if isinstance(messages, dict) else []
    if int_error is not None:
        errors.append(int_error)
    if errors:
        reject(conn, req, record, 400, render.validation_body(errors))
        return
    assert isinstance(messages, list)
    background = body.get("background") is True
    if background and body.get("store", True) is False:
        error = {"type": "value_error", "loc": "body",
                 "msg": "Value error, background can only be used when `store` is true",
                 "input": body}  # fmt: skip
        reject(conn, req, record, 400, render.validation_body([error], param="background"))
        return
    model = resolve_model(state, body, record)
    if model is None:
        message = unknown_model(state, record["model"])
        reject(conn, req, record, 404, render.error_body(message, 404, param="model",
                                                         err_type="NotFoundError"))  # fmt: skip
        return
    if background and not cfg.responses_store:
        reject(conn, req, record, 400, _invalid(_NO_STORE, 400, "background"))
        return
    prompt_tokens = max(1, chat_tokens(messages))
    previous_id = body.get("previous_response_id")
    if previous_id is not None:
        previous = store.get(str(previous_id)) if cfg.responses_store else None
        if previous is None:
            reject(conn, req, record, 404, not_found_body(str(previous_id)))
            return
        prompt_tokens += previous.script.prompt_tokens + previous.script.n
    if prompt_tokens >= cfg.max_model_len:
        message = context_error(cfg.max_model_len, prompt_tokens)
        reject(conn, req, record, 400, render.error_body(message, 400, param="input_tokens"))
        return
    room = cfg.max_model_len - prompt_tokens
    limit = room if limit is None else max(1, min(limit, room))
    rid = body.get("request_id")
    script = ResponsesScript(
        request_id=rid if isinstance(rid, str) and rid else "resp_" + render.random_id(),
        model=model,
        n=min(limit, cfg.tokens),
        finish="length" if limit < cfg.tokens else "stop",
        prompt_tokens=prompt_tokens,
        created=int(time.time()),
        body=body,
        max_output_tokens=limit,
        item_id="msg_" + render.random_id(),
        stream=stream,
    )
    keep = cfg.responses_store and body.get("store", True) is not False
    if not background or cfg.status is not None or cfg.error_traceback:
        # A status fault fails the request at once, so a background one is never stored.
        on_end = (lambda job, outcome: store.finished(job, outcome, None)) if keep else None
        conn.run(Job(state=state, cfg=cfg, record=record, script=script, route=req.route,
                     sink=conn, loop=conn.loop, on_end=on_end))  # fmt: skip
        return
    # Background: generated without a client; the stream faults belong to a connection.
    stored = Stored(script, "queued", keep_events=stream)
    store.put(script.request_id, stored)
    quiet = cfg.updated({"hang": False, "stall_after": None, "drop_after": None,
                         "malformed": None})  # fmt: skip
    job = Job(state=state, cfg=quiet, record=record, script=script, route=req.route,
              sink=stored, loop=conn.loop,
              on_end=lambda job, outcome: store.finished(job, outcome, stored))  # fmt: skip
    stored.job = job
    job.start()
    if stream:
        conn.replay(stored, None)
    else:
        conn.reply(req, 200, stored.body(), count=False)


def retrieve(conn: Conn, req: Req) -> None:
    """``GET /v1/responses/{id}[?stream=true&starting_after=N]``."""
    assert req.param is not None
    stored = conn.store.get(req.param) if conn.state.config.responses_store else None
    if stored is None:
        conn.reply(req, 404, not_found_body(req.param))
        return
    after_text = req.arg("starting_after")
    starting_after = None
    if after_text is not None:
        try:
            starting_after = int(after_text)
        except ValueError:
            error = {"type": "int_parsing", "loc": "query.starting_after",
                     "msg": "Input should be a valid integer, unable to parse string as an "
                     "integer", "input": after_text}  # fmt: skip
            conn.reply(req, 400, render.validation_body([error]))
            return
    if (req.arg("stream") or "").lower() not in _TRUE:
        conn.reply(req, 200, stored.body())
        return
    conn.state.served(req.route, 200)
    if stored.log is None:  # only a background stream keeps its events
        conn.stream_then_cut()
    else:
        conn.replay(stored, starting_after)


def cancel(conn: Conn, req: Req) -> None:
    """``POST /v1/responses/{id}/cancel``: stop a queued (background) response."""
    assert req.param is not None
    stored = conn.store.get(req.param) if conn.state.config.responses_store else None
    if stored is None:
        conn.reply(req, 404, not_found_body(req.param))
        return
    if stored.status not in ("queued", "in_progress"):
        conn.reply(req, 400, _invalid("Cannot cancel a synchronous response.", 400,
                                      "response_id"))  # fmt: skip
        return
    stored.status = "cancelled"
    job, stored.job = stored.job, None
    if job is not None:
        job.finish("aborted")
    conn.reply(req, 200, orjson.dumps(stored.script.obj("cancelled", False)))
