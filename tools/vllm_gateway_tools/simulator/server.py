"""The simulator's HTTP/1.1 server: a raw ``asyncio.Protocol`` with the ``httptools`` parser.

Why not an ASGI app: the simulator shares a core with the load generator in the benchmark rig and
must pace thousands of streams. So there is no task per request and no sleep per chunk: each stream
is a ``_Stream`` driven by one ``loop.call_at`` timer at a time, its chunks rendered from byte
templates (``simulator.render``) and written straight to the transport.

Invariants:
- A connection serves one request at a time; a pipelined request waits in ``_pending`` until the
  current response has ended (HTTP/1.1 order).
- Every generation request is counted ``running`` from its arrival until exactly one ``_finish``,
  which records its outcome: ``completed``, ``error`` (a status fault or a rejected request),
  ``dropped`` (``drop_after`` closed the connection) or ``aborted`` (the client left first).
- ``connection_lost`` is the single place that notices a client leaving: it cancels the stream's
  timer and finishes the request as ``aborted`` at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from typing import Any

import httptools
import orjson

from vllm_gateway_tools.simulator import render
from vllm_gateway_tools.simulator.config import ConfigError, SimulatorConfig
from vllm_gateway_tools.simulator.state import SimState, authorized
from vllm_gateway_tools.simulator.state import prompt_tokens as count_prompt_tokens

__all__ = ["SimProtocol"]

MAX_BODY = 16 * 1024 * 1024
_GENERATION = {"/v1/chat/completions": True, "/v1/completions": False}  # path -> is chat
_ROUTES = {
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/metrics": "GET",
    "/sim/stats": "GET",
    "/sim/config": "POST",
    "/sim/reset": "POST",
}
_JSON = b"application/json"
_BAD_JSON_EVENT = b"data: {not json\n\n"
_HTML = (
    b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
)


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "reject", "url")

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.keep_alive = True
        self.reject = 0  # a status to answer without reading the body (411, 413)


class _Stream:
    """The pacing state of one generation request in flight."""

    __slots__ = (
        "cfg",
        "chunks",
        "finish_reason",
        "handle",
        "i",
        "include_usage",
        "keep",
        "model",
        "n",
        "prompt_tokens",
        "record",
        "stream",
        "t0",
        "tmpl",
    )  # fmt: skip

    def __init__(
        self,
        *,
        cfg: SimulatorConfig,
        record: dict[str, Any],
        tmpl: render.StreamTemplate,
        model: str,
        stream: bool,
        n: int,
        prompt_tokens: int,
        finish_reason: str,
        include_usage: bool,
        keep: bool,
        t0: float,
    ) -> None:
        self.cfg = cfg
        self.record = record
        self.tmpl = tmpl
        self.model = model
        self.stream = stream  # SSE or one JSON body
        self.n = n  # output tokens
        self.prompt_tokens = prompt_tokens
        self.finish_reason = finish_reason
        self.include_usage = include_usage
        self.keep = keep  # keep the connection open after the response
        self.t0 = t0  # loop time of arrival: every chunk is due at t0 + ttft + i * itl
        self.handle: asyncio.TimerHandle | None = None
        self.i = 0  # next token index
        self.chunks = 0  # SSE events written


class SimProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._req = _Request()
        self._pending: deque[_Request] = deque()
        self._active: _Stream | None = None
        self._busy = False
        self._closed = False

    # --- connection lifecycle -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.state.connections.discard(self)
        self._pending.clear()
        stream = self._active
        if stream is not None:
            self._finish(stream, "aborted")

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._busy:  # a response is going out: do not write another into it
                self.close()
            else:
                self._send(400, render.error_body("malformed HTTP request", 400), close=True)
            return
        if not self._busy:
            self._next()

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    # --- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._req = _Request()

    def on_url(self, url: bytes) -> None:
        self._req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._req.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        req = self._req
        req.method = self.parser.get_method()
        req.keep_alive = self.parser.should_keep_alive()
        if "transfer-encoding" in req.headers:
            req.reject = 411  # like many servers, the simulator wants a Content-Length body
        elif int(req.headers.get("content-length", "0") or 0) > MAX_BODY:
            req.reject = 413
        elif req.headers.get("expect", "").lower() == "100-continue":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for it otherwise

    def on_body(self, body: bytes) -> None:
        if not self._req.reject:
            self._req.body.append(body)

    def on_message_complete(self) -> None:
        self._pending.append(self._req)

    # --- dispatch -----------------------------------------------------------------------------
    def _next(self) -> None:
        while self._pending and not self._busy and not self._closed:
            self._busy = True
            self._handle(self._pending.popleft())

    def _handle(self, req: _Request) -> None:
        state = self.state
        cfg = state.config
        path = req.url.split(b"?", 1)[0].decode("latin-1")
        method = req.method.decode("latin-1")
        keep = req.keep_alive
        if req.reject:
            self._send(
                req.reject, render.error_body("request body not accepted", req.reject), close=True
            )
            return
        want = _ROUTES.get(path)
        if want is None:
            self._send(404, b'{"detail":"Not Found"}', keep=keep)
            return
        if (
            cfg.api_key is not None
            and path.startswith("/v1")
            and not authorized(req.headers, cfg.api_key)
        ):
            self._send(401, b'{"error":"Unauthorized"}', keep=keep)
            return
        if method != want:
            self._send(405, b'{"detail":"Method Not Allowed"}', keep=keep)
            return
        body = b"".join(req.body)
        if path in _GENERATION:
            self._generate(req, path, body)
        elif path == "/v1/models":
            self._send(
                200,
                render.models_body(
                    cfg.models, max_model_len=cfg.max_model_len, created=state.created
                ),
                keep=keep,
            )
        elif path == "/health":
            self._send(503 if cfg.unhealthy else 200, b"", content_type=None, keep=keep)
        elif path == "/metrics":
            self._send(
                200,
                state.metrics(),
                content_type=b"text/plain; version=0.0.4; charset=utf-8",
                keep=keep,
            )
        elif path == "/sim/stats":
            self._send(200, orjson.dumps(state.stats()), keep=keep)
        elif path == "/sim/reset":
            state.reset()
            self._send(200, orjson.dumps(state.stats()), keep=keep)
        else:  # /sim/config
            try:
                changes = orjson.loads(body) if body else {}
                if not isinstance(changes, dict):
                    raise ConfigError("the body must be a JSON object of knobs")
                state.config = cfg.updated(changes)
            except (orjson.JSONDecodeError, ConfigError) as exc:
                self._send(400, render.error_body(str(exc), 400), keep=keep)
                return
            self._send(200, orjson.dumps(state.config.as_dict()), keep=keep)

    def _generate(self, req: _Request, path: str, raw: bytes) -> None:
        state = self.state
        chat = _GENERATION[path]
        keep = req.keep_alive
        header_id = req.headers.get("x-request-id")
        record: dict[str, Any] = {
            "request_id": header_id,
            "path": path,
            "stream": False,
            "model": None,
            "headers": dict(req.headers),
            "status": None,
            "chunks": 0,
            "outcome": "running",
            "fault": None,
            "started": time.time(),
            "ended": None,
        }
        state.records.append(record)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self._reject(record, 400, "Expected a JSON object in the request body.", None, keep)
            return
        try:
            cfg = state.config.overridden(body["vllm_sim"]) if "vllm_sim" in body else state.config
        except ConfigError as exc:
            self._reject(record, 400, str(exc), "vllm_sim", keep)
            return
        stream_flag = body.get("stream") is True
        record["stream"] = stream_flag
        model = body.get("model") or cfg.models[0]
        record["model"] = model
        if model not in cfg.models:
            message = f"The model `{model}` does not exist. Valid aliases: {', '.join(cfg.models)}."
            self._reject(record, 404, message, "model", keep, err_type="NotFoundError")
            return
        prompt_tokens = count_prompt_tokens(body, chat)
        if prompt_tokens is None:
            field = "messages" if chat else "prompt"
            self._reject(record, 400, f"Field required: {field}", field, keep)
            return
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            self._reject(
                record, 400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", keep
            )
            return
        n = cfg.tokens if max_tokens is None else max_tokens
        if prompt_tokens + n > cfg.max_model_len:
            message = (
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, you "
                f"requested {n} output tokens and your prompt contains at least {prompt_tokens} input "
                f"tokens, for a total of at least {prompt_tokens + n} tokens. Please reduce the length "
                "of the input prompt or the number of requested output tokens."
            )
            self._reject(record, 400, message, "max_tokens", keep)
            return

        options = body.get("stream_options")
        prefix = "chatcmpl-" if chat else "cmpl-"
        rid = prefix + (header_id or uuid.uuid4().hex)  # vLLM takes X-Request-Id as the id too
        s = _Stream(
            cfg=cfg,
            record=record,
            tmpl=render.StreamTemplate(
                chat=chat, request_id=rid, model=model, created=int(time.time())
            ),
            model=model,
            stream=stream_flag,
            n=n,
            prompt_tokens=prompt_tokens,
            finish_reason="stop" if max_tokens is None else "length",
            include_usage=stream_flag
            and isinstance(options, dict)
            and options.get("include_usage") is True,
            keep=keep,
            t0=self.loop.time(),
        )
        self._active = s
        state.total += 1
        state.running += 1
        state.running_by_model[model] = state.running_by_model.get(model, 0) + 1
        state.prompt_tokens[model] = state.prompt_tokens.get(model, 0) + prompt_tokens
        s.keep = keep
        self._start(s)

    def _reject(self, record: dict[str, Any], status: int, message: str, param: str | None,
                keep: bool, *, err_type: str | None = None) -> None:  # fmt: skip
        """A generation request refused before it ran: counted in ``total`` and ``failed``."""
        self.state.total += 1
        self.state.failed += 1
        record.update(status=status, outcome="error", ended=time.time())
        self._send(
            status, render.error_body(message, status, param=param, err_type=err_type), keep=keep
        )

    # --- generation ----------------------------------------------------------------------------
    def _start(self, s: _Stream) -> None:
        cfg = s.cfg
        record = s.record
        if cfg.status is not None:
            record["fault"] = f"status={cfg.status}"
            message = f"simulated error (status {cfg.status})"
            self._end(s, "error", cfg.status, render.error_body(message, cfg.status), _JSON)
        elif cfg.error_traceback:
            record["fault"] = "error_traceback"
            self._end(s, "error", 500, render.traceback_body(s.tmpl.request_id), _JSON)
        elif cfg.hang:
            record["fault"] = "hang"  # hold the connection: connection_lost finishes it
        elif cfg.malformed == "html":
            record["fault"] = "malformed=html"
            self._end(s, "completed", 200, _HTML, b"text/html; charset=utf-8")
        elif s.stream:
            record["status"] = 200
            self._write(render.stream_head())
            if cfg.malformed is not None:
                record["fault"] = f"malformed={cfg.malformed}"
            if self._cut(s):
                return
            s.handle = self.loop.call_at(s.t0 + cfg.ttft, self._tick, s)
        else:
            s.handle = self.loop.call_at(s.t0 + cfg.ttft + cfg.itl * (s.n - 1), self._whole, s)

    def _tick(self, s: _Stream) -> None:
        """Send the chunks due now (one token; the opening and closing events around it)."""
        s.handle = None
        cfg = s.cfg
        tmpl = s.tmpl
        i = s.i
        last = i == s.n - 1
        events = []
        if i == 0 and tmpl.chat:
            events.append(tmpl.first())
        if cfg.malformed == "huge_line" and i == s.n // 2:
            # One enormous line with no newline, then the body ends: the reader must bound it.
            s.i = i + 1
            if self._events(s, [*events, b"data: " + b"x" * cfg.huge_line_bytes]):
                self._end_stream(s)
            return
        events.append(tmpl.token(render.token_text(i), s.finish_reason if last else None))
        if cfg.malformed == "bad_json" and i == s.n // 2:
            events.append(_BAD_JSON_EVENT)
        if last:
            if s.include_usage:
                events.append(tmpl.usage(s.prompt_tokens, s.n))
            if cfg.malformed != "no_done":
                events.append(render.DONE)
        s.i = i + 1
        if not self._events(s, events):
            return
        if last:
            self._end_stream(s)
        else:
            s.handle = self.loop.call_at(s.t0 + cfg.ttft + cfg.itl * s.i, self._tick, s)

    def _end_stream(self, s: _Stream) -> None:
        self._write(render.LAST_CHUNK)
        self._finish(s, "completed")
        self._done_response(s.keep)

    def _events(self, s: _Stream, events: list[Any]) -> bool:
        """Write ``events`` as chunks, obeying stall_after/drop_after. False: the stream is cut."""
        cfg = s.cfg
        if cfg.stall_after is None and cfg.drop_after is None:
            self._write(b"".join([render.frame(e) for e in events]))
            s.chunks += len(events)
            self.state.chunks += len(events)
            return True
        for event in events:
            self._write(render.frame(event))
            s.chunks += 1
            self.state.chunks += 1
            if self._cut(s):
                return False
        return True

    def _cut(self, s: _Stream) -> bool:
        """Apply stall_after/drop_after once ``s.chunks`` reaches them. True: the stream stops here."""
        cfg = s.cfg
        if cfg.drop_after is not None and s.chunks >= cfg.drop_after:
            self._drop(s)
            return True
        if cfg.stall_after is not None and s.chunks >= cfg.stall_after:
            s.record["fault"] = f"stall_after={cfg.stall_after}"
            s.record["chunks"] = s.chunks
            return True  # no timer: nothing more is sent until the client leaves
        return False

    def _drop(self, s: _Stream) -> None:
        s.record["fault"] = f"drop_after={s.cfg.drop_after}"
        self._finish(s, "dropped")
        if self.transport is not None:
            self.transport.close()  # flushes what was sent, then FIN: no terminating chunk

    def _whole(self, s: _Stream) -> None:
        """The non-streamed response, due once every token would have been generated."""
        s.handle = None
        cfg = s.cfg
        text = "".join([render.token_text(i) for i in range(s.n)])
        make = render.chat_response if s.tmpl.chat else render.completion_response
        body = make(request_id=s.tmpl.request_id, model=s.model, created=s.tmpl.created, text=text,
                    finish_reason=s.finish_reason, prompt_tokens=s.prompt_tokens, completion_tokens=s.n)  # fmt: skip
        if cfg.malformed == "bad_json":
            s.record["fault"] = "malformed=bad_json"
            body = b"{not json"
        if cfg.drop_after is None and cfg.stall_after is None:
            self._end(s, "completed", 200, body, _JSON)
            return
        # Cut mid-body: the head promises the full length, only half of the body follows.
        s.record["status"] = 200
        self._write(
            render.response_head(200, _JSON, len(body), close=False) + body[: len(body) // 2]
        )
        if cfg.drop_after is not None:
            self._drop(s)
        else:
            s.record["fault"] = f"stall_after={cfg.stall_after}"

    def _end(self, s: _Stream, outcome: str, status: int, body: bytes, content_type: bytes) -> None:
        s.record["status"] = status
        self._finish(s, outcome)
        self._send(status, body, content_type=content_type, keep=s.keep)

    def _finish(self, s: _Stream, outcome: str) -> None:
        """Account for the end of a generation request. Runs exactly once per request."""
        if self._active is not s:
            return
        self._active = None
        if s.handle is not None:
            s.handle.cancel()
            s.handle = None
        state = self.state
        state.running -= 1
        state.running_by_model[s.model] -= 1
        if outcome == "completed":
            state.completed += 1
        elif outcome == "aborted":
            state.aborted += 1
        elif outcome == "dropped":
            state.dropped += 1
        else:
            state.failed += 1
        tokens = s.n if outcome == "completed" else max(0, s.i)
        state.generation_tokens[s.model] = state.generation_tokens.get(s.model, 0) + tokens
        s.record.update(outcome=outcome, chunks=s.chunks, ended=time.time())

    # --- writing --------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if not self._closed and self.transport is not None:
            self.transport.write(data)

    def _send(self, status: int, body: bytes, *, content_type: bytes | None = _JSON,
              keep: bool = True, close: bool = False) -> None:  # fmt: skip
        """A whole response; then the next pipelined request, or close."""
        close = close or not keep
        self._write(render.response_head(status, content_type, len(body), close=close) + body)
        self._done_response(not close)

    def _done_response(self, keep: bool) -> None:
        self._busy = False
        if not keep:
            self.close()
        elif self._pending:
            self.loop.call_soon(self._next)
