"""The dev/admin routes (``dev_mode``: vLLM with ``VLLM_SERVER_DEV_MODE=1``, runtime LoRA updating
on and ``--enable-lora``). Every call is logged in ``/sim/stats`` under ``admin``.

Sleep and pause, as vLLM's engine does them: while the engine sleeps or is paused, a new engine
request waits before the scheduler (a stream gets its head, and a Responses stream its
``response.created`` and ``response.in_progress``, then nothing) until ``/wake_up`` or ``/resume``.
The ``mode`` of ``/sleep`` and ``/pause`` decides what happens to the requests already running:
``abort`` (vLLM's default) ends them at once with finish reason ``abort``, ``wait`` lets them
finish before the call answers, ``keep`` freezes them until they are woken.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import orjson

from vllm_gateway_tools.simulator import render
from vllm_gateway_tools.simulator.engine import JSON
from vllm_gateway_tools.simulator.exchange import Conn, Req
from vllm_gateway_tools.simulator.state import SimState

__all__ = ["MODES", "ROUTES"]

MODES = ("abort", "wait", "keep")


def _log(conn: Conn, req: Req, status: int) -> None:
    query = "&".join(f"{k}={v}" for k, vs in req.query.items() for v in vs)
    conn.state.admin.append({"method": req.method, "path": req.path, "query": query,
                             "body": req.body[:1000].decode("utf-8", "replace"),
                             "status": status, "time": time.time()})  # fmt: skip


def _answer(
    conn: Conn, req: Req, status: int, body: bytes, content_type: bytes | None = JSON
) -> None:
    _log(conn, req, status)
    conn.reply(req, status, body, content_type)


def _query_error(
    loc: str, msg: str, value: Any, kind: str, ctx: dict[str, Any] | None = None
) -> bytes:
    error: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx is not None:
        error["ctx"] = ctx
    return render.validation_body([error])


def _mode(req: Req) -> str | bytes:
    """The ``mode`` query parameter, or the 400 for a bad one."""
    mode = req.arg("mode") or "abort"
    if mode in MODES:
        return mode
    expected = "'abort', 'wait' or 'keep'"
    return _query_error("query.mode", f"Input should be {expected}", mode, "literal_error",
                        {"expected": expected})  # fmt: skip


def _stop_running(state: SimState, mode: str, answer: Callable[[], None]) -> None:
    """Apply ``mode`` to the running requests, then ``answer`` (at once, or once they are done)."""
    if mode == "keep":
        for job in list(state.active):
            job.hold()
    elif mode == "abort":
        for job in list(state.active):
            job.end_early("abort")
    elif state.active:  # wait
        state.idle_waiters.append(answer)
        return
    answer()


def _release(state: SimState) -> None:
    if not state.holding:
        for job in list(state.held):
            job.release()


def sleep(conn: Conn, req: Req) -> None:
    """``POST /sleep?level=1&mode=abort`` → ``{"status":"sleeping","level":1}``."""
    level_text = req.arg("level") or "1"
    if not level_text.isdigit() or int(level_text) > 2:
        msg = "Input should be less than or equal to 2"
        kind = "less_than_equal" if level_text.isdigit() else "int_parsing"
        if kind == "int_parsing":
            msg = "Input should be a valid integer, unable to parse string as an integer"
        _answer(conn, req, 400, _query_error("query.level", msg, level_text, kind))
        return
    mode = _mode(req)
    if isinstance(mode, bytes):
        _answer(conn, req, 400, mode)
        return
    level = int(level_text)
    state = conn.state
    state.sleeping_tags = {"weights", "kv_cache"}
    state.sleep_level = level
    reply = conn.later(req)

    def answer() -> None:
        _log(conn, req, 200)
        reply(200, orjson.dumps({"status": "sleeping", "level": level}))

    _stop_running(state, mode, answer)


def wake_up(conn: Conn, req: Req) -> None:
    """``POST /wake_up[?tags=weights&tags=kv_cache]``: all of it when no tag is named."""
    state = conn.state
    tags = req.query.get("tags") or None
    if tags is None:
        state.sleeping_tags.clear()
    else:
        state.sleeping_tags.difference_update(tags)
    _release(state)
    status = "sleeping" if state.sleeping_tags else "awake"
    _answer(conn, req, 200, orjson.dumps({"status": status, "tags": tags}))


def is_sleeping(conn: Conn, req: Req) -> None:
    _answer(conn, req, 200, orjson.dumps({"is_sleeping": conn.state.sleeping}))


def pause(conn: Conn, req: Req) -> None:
    """``POST /pause?mode=abort|wait|keep`` → ``{"status":"paused"}``."""
    mode = _mode(req)
    if isinstance(mode, bytes):
        _answer(conn, req, 400, mode)
        return
    state = conn.state
    state.paused = True
    reply = conn.later(req)

    def answer() -> None:
        _log(conn, req, 200)
        reply(200, b'{"status":"paused"}')

    _stop_running(state, mode, answer)


def resume(conn: Conn, req: Req) -> None:
    conn.state.paused = False
    _release(conn.state)
    _answer(conn, req, 200, b'{"status":"resumed"}')


def is_paused(conn: Conn, req: Req) -> None:
    _answer(conn, req, 200, orjson.dumps({"is_paused": conn.state.paused}))


def reset_prefix_cache(conn: Conn, req: Req) -> None:
    """Empty the prefix cache model and publish ``AllBlocksCleared``. Always succeeds: unlike
    vLLM's, the model pins no block to a running request."""
    conn.state.reset_prefix_cache()
    _answer(conn, req, 200, b'{"success":true}')


def collective_rpc(conn: Conn, req: Req) -> None:
    """``{"method": ...}`` → ``{"results": [null]}``: one worker whose method returns nothing."""
    try:
        body = json.loads(req.body)
    except json.JSONDecodeError as exc:
        _answer(conn, req, 400, render.http_error_body(f"JSON decode error: {exc}", 400))
        return
    if not isinstance(body, dict):
        _answer(conn, req, 400, render.http_error_body("Request body must be a JSON object", 400))
        return
    if body.get("method") is None:
        _answer(conn, req, 400, render.http_error_body("Missing 'method' in request body", 400))
        return
    _answer(conn, req, 200, b'{"results":[null]}')


def server_info(conn: Conn, req: Req) -> None:
    cfg = conn.state.config
    config = (f"model={cfg.models[0]!r}, served_model_name={list(cfg.models)!r}, "
              f"max_seq_len={cfg.max_model_len}, device_config=simulator, enforce_eager=True")  # fmt: skip
    body = {
        "vllm_config": config,
        "vllm_env": {"VLLM_SERVER_DEV_MODE": True, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": True,
                     "VLLM_ENABLE_RESPONSES_API_STORE": cfg.responses_store},
        "system_env": {"os": "vllm-gateway simulator", "python_version": "3"},
    }  # fmt: skip
    _answer(conn, req, 200, orjson.dumps(body))


def _lora_body(conn: Conn, req: Req) -> dict[str, Any] | None:
    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        _answer(conn, req, 400, render.not_json())
        return None
    return body


def _lora_error(message: str, status: int, kind: str) -> bytes:
    return render.error_body(message, status, err_type=kind)


def load_lora_adapter(conn: Conn, req: Req) -> None:
    """``{"lora_name", "lora_path"[, "load_inplace"]}`` → 200 text; the adapter is then served
    (listed in ``/v1/models``, accepted as a request's ``model``)."""
    body = _lora_body(conn, req)
    if body is None:
        return
    state = conn.state
    name, path = body.get("lora_name"), body.get("lora_path")
    if not name or not path:
        error = _lora_error("Both 'lora_name' and 'lora_path' must be provided.", 400,
                            "InvalidUserInput")  # fmt: skip
    elif name in state.config.models:
        error = _lora_error(f"The lora adapter '{name}' conflicts with a served base model.", 400,
                            "InvalidUserInput")  # fmt: skip
    elif name in state.loras and not body.get("load_inplace"):
        error = _lora_error(f"The lora adapter '{name}' has already been loaded. If you want to "
                            "load the adapter in place, set 'load_inplace' to True.", 400,
                            "InvalidUserInput")  # fmt: skip
    else:
        state.loras[str(name)] = str(path)
        _answer(conn, req, 200, f"Success: LoRA adapter '{name}' added successfully.".encode(),
                None)  # fmt: skip
        return
    _answer(conn, req, 400, error)


def unload_lora_adapter(conn: Conn, req: Req) -> None:
    body = _lora_body(conn, req)
    if body is None:
        return
    name = body.get("lora_name")
    if not name:
        error = _lora_error("'lora_name' needs to be provided to unload a LoRA adapter.", 400,
                            "InvalidUserInput")  # fmt: skip
        _answer(conn, req, 400, error)
    elif name not in conn.state.loras:
        error = _lora_error(f"The lora adapter '{name}' cannot be found.", 404, "NotFoundError")
        _answer(conn, req, 404, error)
    else:
        del conn.state.loras[name]
        _answer(conn, req, 200, f"Success: LoRA adapter '{name}' removed successfully.".encode(),
                None)  # fmt: skip


ROUTES: dict[str, tuple[str, Callable[[Any, Req], None]]] = {
    "/sleep": ("POST", sleep),
    "/wake_up": ("POST", wake_up),
    "/is_sleeping": ("GET", is_sleeping),
    "/pause": ("POST", pause),
    "/resume": ("POST", resume),
    "/is_paused": ("GET", is_paused),
    "/reset_prefix_cache": ("POST", reset_prefix_cache),
    "/collective_rpc": ("POST", collective_rpc),
    "/server_info": ("GET", server_info),
    "/v1/load_lora_adapter": ("POST", load_lora_adapter),
    "/v1/unload_lora_adapter": ("POST", unload_lora_adapter),
}
