"""``/v1/audio/transcriptions`` and ``/v1/audio/translations``: multipart uploads.

The form is read as FastAPI reads vLLM's ``Form()`` model: a body that is not multipart (or
urlencoded) is an empty form, so it fails validation for its missing ``file`` (400, vLLM's
validation envelope); a multipart body that does not parse is a 400 "There was an error parsing
the body". The audio is never decoded: the file counts as 16 kHz 16-bit mono PCM, so its
duration is ``bytes / 32000`` seconds (one prompt token a second, plus the ``prompt`` field's
tokens). The answer is ``tokens`` tokens long and ends with ``"stop"``.
"""

from __future__ import annotations

import math
import time

import orjson

from vllm_gateway_tools.simulator import multipart, render
from vllm_gateway_tools.simulator.config import ConfigError
from vllm_gateway_tools.simulator.engine import Job
from vllm_gateway_tools.simulator.exchange import (
    Conn,
    Req,
    new_record,
    reject,
    request_id,
    unknown_model,
)
from vllm_gateway_tools.simulator.render_audio import AudioScript
from vllm_gateway_tools.simulator.tokenizer import count_text

__all__ = ["BYTES_PER_SECOND", "transcriptions", "translations"]

BYTES_PER_SECOND = 32_000
_TRUE = ("1", "true", "yes", "on", "t", "y")


def transcriptions(conn: Conn, req: Req) -> None:
    _audio(conn, req, translate=False)


def translations(conn: Conn, req: Req) -> None:
    _audio(conn, req, translate=True)


def _audio(conn: Conn, req: Req, *, translate: bool) -> None:
    state = conn.state
    record = new_record(state, req)
    content_type = req.headers.get("content-type", "")
    boundary = multipart.boundary_of(content_type)
    parts: list[multipart.Part] = []
    if boundary is not None:
        try:
            parts = multipart.parse(req.body, boundary)
        except multipart.MultipartError:
            body = render.http_error_body("There was an error parsing the body", 400)
            reject(conn, req, record, 400, body)
            return
    elif content_type.lower().startswith("multipart/form-data"):
        reject(
            conn, req, record, 400, render.http_error_body("Missing boundary in multipart.", 400)
        )
        return
    fields = {p.name: p.text() for p in parts if p.filename is None}
    upload = next((p for p in parts if p.name == "file" and p.filename is not None), None)
    if upload is None:
        form = {**fields, **{p.name: p.filename for p in parts if p.filename is not None}}
        reject(conn, req, record, 400, render.validation_body([render.missing("body.file", form)]))
        return
    cfg = state.config
    if "vllm_sim" in fields:
        try:
            cfg = cfg.overridden(orjson.loads(fields["vllm_sim"]))
        except (orjson.JSONDecodeError, ConfigError) as exc:
            reject(conn, req, record, 400, render.error_body(str(exc), 400, param="vllm_sim"))
            return
    stream = fields.get("stream", "").lower() in _TRUE
    record["stream"] = stream
    model = fields.get("model") or cfg.models[0]
    record["model"] = model
    if model not in state.models():
        reject(conn, req, record, 404, render.error_body(unknown_model(state, model), 404,
                                                         param="model", err_type="NotFoundError"))  # fmt: skip
        return
    fmt = fields.get("response_format", "json")
    if fmt in ("verbose_json", "diarized_json"):
        message = f"Currently do not support {fmt} for {model}"
        reject(conn, req, record, 400, render.error_body(message, 400))
        return
    if fmt not in ("json", "text"):
        message = "Currently only support response_format: `text`, `json`, `verbose_json` or `diarized_json`"
        reject(conn, req, record, 400, render.error_body(message, 400))
        return
    seconds = len(upload.data) / BYTES_PER_SECOND
    prompt_tokens = max(1, math.ceil(seconds) + count_text(fields.get("prompt", "")))
    script = AudioScript(
        request_id=request_id(req, "translate-" if translate else "transcribe-"),
        model=model,
        n=cfg.tokens,
        finish="stop",
        prompt_tokens=prompt_tokens,
        created=int(time.time()),
        stream=stream,
        translate=translate,
        include_usage=fields.get("stream_include_usage", "").lower() in _TRUE,
        seconds=math.ceil(seconds),
    )
    conn.run(Job(state=state, cfg=cfg, record=record, script=script, route=req.route,
                 sink=conn, loop=conn.loop))  # fmt: skip
