"""The simulator's HTTP/1.1 server: a raw ``asyncio.Protocol`` with the ``httptools`` parser.

Why not an ASGI app: the simulator shares a core with the load generator in the benchmark rig and
must pace thousands of streams. So there is no task per request and no sleep per chunk: each
engine request is an ``engine.Job`` driven by one ``loop.call_at`` timer at a time, its events
rendered from byte templates (``simulator.render*``) and written straight to the transport.

Routing follows a vLLM server started the way the config says: ``runner`` decides whether the
generate or the pooling routes exist, ``dev_mode`` whether the dev/admin routes do; a route that
does not exist answers 404 ``{"detail":"Not Found"}`` like FastAPI. With ``api_key`` set, paths
under ``/v1`` and ``/v2`` want the key, as vLLM's middleware does before any routing.

Invariants:
- A connection serves one request at a time; a pipelined request waits in ``_pending`` until the
  current response has ended (HTTP/1.1 order).
- ``connection_lost`` is the single place that notices a client leaving: it finishes the job the
  connection owns as ``aborted`` at once (cancelling its timer), or stops reading a stored
  response (a background response goes on without its reader).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import httptools
import orjson

from vllm_gateway_tools.simulator import (
    api_audio,
    api_dev,
    api_messages,
    api_openai,
    api_pooling,
    api_responses,
    api_tokens,
    render,
)
from vllm_gateway_tools.simulator.config import ConfigError
from vllm_gateway_tools.simulator.engine import JSON, Job
from vllm_gateway_tools.simulator.exchange import Req
from vllm_gateway_tools.simulator.state import SimState, authorized
from vllm_gateway_tools.simulator.store import ResponseStore, Stored

__all__ = ["ROUTES", "SimProtocol"]

MAX_BODY = 16 * 1024 * 1024
Handler = Callable[[Any, Req], None]

# path -> (method, family, handler). Families: "base" (always), "generate", "pooling", "dev",
# "sim" (the simulator's own, never behind the API key).
ROUTES: dict[str, tuple[str, str, Handler]] = {
    "/health": ("GET", "base", lambda c, r: c.reply_health(r)),
    "/metrics": ("GET", "base", lambda c, r: c.reply_metrics(r)),
    "/v1/models": ("GET", "base", lambda c, r: c.reply_models(r)),
    "/kv_event_sources": ("GET", "base", lambda c, r: c.reply_kv_event_sources(r)),
    "/tokenize": ("POST", "base", api_tokens.tokenize),
    "/detokenize": ("POST", "base", api_tokens.detokenize),
    "/sim/stats": ("GET", "sim", lambda c, r: c.reply(r, 200, orjson.dumps(c.state.stats()))),
    "/sim/config": ("POST", "sim", lambda c, r: c.reply_config(r)),
    "/sim/reset": ("POST", "sim", lambda c, r: c.reply_reset(r)),
    "/v1/chat/completions": ("POST", "generate", api_openai.chat),
    "/v1/chat/completions/batch": ("POST", "generate", api_openai.batch),
    "/v1/completions": ("POST", "generate", api_openai.completions),
    "/v1/responses": ("POST", "generate", api_responses.create),
    "/v1/responses/{response_id}": ("GET", "generate", api_responses.retrieve),
    "/v1/responses/{response_id}/cancel": ("POST", "generate", api_responses.cancel),
    "/v1/messages": ("POST", "generate", api_messages.messages),
    "/v1/messages/count_tokens": ("POST", "generate", api_messages.count_tokens),
    "/v1/audio/transcriptions": ("POST", "generate", api_audio.transcriptions),
    "/v1/audio/translations": ("POST", "generate", api_audio.translations),
    "/v1/embeddings": ("POST", "pooling", api_pooling.embeddings),
    "/v2/embed": ("POST", "pooling", api_pooling.v2_embed),
    "/pooling": ("POST", "pooling", api_pooling.pooling),
    "/classify": ("POST", "pooling", api_pooling.classify),
    "/score": ("POST", "pooling", api_pooling.score),
    "/v1/score": ("POST", "pooling", api_pooling.score),
    "/rerank": ("POST", "pooling", api_pooling.rerank),
    "/v1/rerank": ("POST", "pooling", api_pooling.rerank),
    "/v2/rerank": ("POST", "pooling", api_pooling.rerank),
    **{path: (method, "dev", handler) for path, (method, handler) in api_dev.ROUTES.items()},
}
_AUTH_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")


def _match(path: str) -> tuple[str, str | None] | None:
    """The route pattern serving ``path`` and its path parameter."""
    if path in ROUTES:
        return path, None
    if path.startswith("/v1/responses/"):
        rest = path[len("/v1/responses/") :]
        if rest and "/" not in rest:
            return "/v1/responses/{response_id}", rest
        if rest.endswith("/cancel") and rest.count("/") == 1 and len(rest) > len("/cancel"):
            return "/v1/responses/{response_id}/cancel", rest[: -len("/cancel")]
    return None


class _Incoming:
    __slots__ = ("body", "headers", "keep_alive", "method", "reject", "url")

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.keep_alive = True
        self.reject = 0  # a status to answer without reading the body (411, 413)


class SimProtocol(asyncio.Protocol):
    """One client connection. It is the sink of the job it runs (``engine.Sink``) and the reader
    of a stored response it replays (``store.Reader``)."""

    def __init__(self, state: SimState, store: ResponseStore) -> None:
        self.state = state
        self.store = store
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._req = _Incoming()
        self._pending: deque[_Incoming] = deque()
        self._active: Job | None = None  # the job this connection owns
        self._reading: Stored | None = None  # the stored response it replays
        self._keep = True  # keep-alive after the current response
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
        job, self._active = self._active, None
        if job is not None:
            job.finish("aborted")
        stored, self._reading = self._reading, None
        if stored is not None:
            stored.readers.discard(self)

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
        self._req = _Incoming()

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

    def _handle(self, incoming: _Incoming) -> None:
        cfg = self.state.config
        path_b, _, query_b = incoming.url.partition(b"?")
        path = path_b.decode("latin-1")
        keep = incoming.keep_alive
        self._keep = keep
        if incoming.reject:
            body = render.error_body("request body not accepted", incoming.reject)
            self._send(incoming.reject, body, close=True)
            return
        if (
            cfg.api_key is not None
            and path.startswith(_AUTH_PREFIXES)
            and not authorized(incoming.headers, cfg.api_key)
        ):
            self._send(401, b'{"error":"Unauthorized"}', keep=keep)
            return
        matched = _match(path)
        family = ROUTES[matched[0]][1] if matched is not None else None
        if (
            matched is None
            or (family in ("generate", "pooling") and family != cfg.runner)
            or (family == "dev" and not cfg.dev_mode)
        ):
            self._send(404, render.NOT_FOUND, keep=keep)
            return
        route, param = matched
        method, _, handler = ROUTES[route]
        if incoming.method.decode("latin-1") != method:
            self._send(405, b'{"detail":"Method Not Allowed"}', keep=keep)
            return
        query = parse_qs(query_b.decode("latin-1"), keep_blank_values=True)
        req = Req(method=method, path=path, query=query, headers=incoming.headers,
                  body=b"".join(incoming.body), keep=keep, route=route, param=param)  # fmt: skip
        handler(self, req)

    # --- what handlers call --------------------------------------------------------------------
    def reply(self, req: Req, status: int, body: bytes, content_type: bytes | None = JSON, *,
              count: bool = True) -> None:  # fmt: skip
        """A whole response to ``req``; ``count``: count it in ``/sim/stats`` routes."""
        if count:
            self.state.served(req.route, status)
        self._send(status, body, content_type=content_type, keep=req.keep)

    def run(self, job: Job) -> None:
        """Run ``job`` with this connection as its sink; it is aborted if the client leaves."""
        self._active = job
        job.start()

    def replay(self, stored: Stored, starting_after: int | None) -> None:
        """Stream ``stored``'s events after ``starting_after``, then its live ones."""
        self._reading = stored
        self._write(render.stream_head())
        stored.attach(self, starting_after)

    def stream_then_cut(self) -> None:
        """A stream head, then the connection closes: vLLM's answer when its stream generator
        raises before the first event (the status was already sent)."""
        self._write(render.stream_head())
        self._keep = False
        self.close()

    def later(self, req: Req) -> Callable[[int, bytes], None]:
        """An answer to ``req`` to be sent when ready (the connection stays busy meanwhile)."""

        def answer(status: int, body: bytes) -> None:
            if not self._closed:
                self.reply(req, status, body)

        return answer

    def reply_health(self, req: Req) -> None:
        self.reply(req, 503 if self.state.config.unhealthy else 200, b"", None, count=False)

    def reply_metrics(self, req: Req) -> None:
        self.reply(req, 200, self.state.metrics(), b"text/plain; version=0.0.4; charset=utf-8",
                   count=False)  # fmt: skip

    def reply_kv_event_sources(self, req: Req) -> None:
        self.reply(req, 200, orjson.dumps(self.state.kv_event_sources()), count=False)

    def reply_models(self, req: Req) -> None:
        cfg = self.state.config
        body = render.models_body(cfg.models, max_model_len=cfg.max_model_len,
                                  created=self.state.created,
                                  loras=tuple(self.state.loras.items()))  # fmt: skip
        self.reply(req, 200, body)

    def reply_config(self, req: Req) -> None:
        state = self.state
        try:
            changes = orjson.loads(req.body) if req.body else {}
            if not isinstance(changes, dict):
                raise ConfigError("the body must be a JSON object of knobs")
            state.configure(state.config.updated(changes))
        except (orjson.JSONDecodeError, ConfigError) as exc:
            self.reply(req, 400, render.error_body(str(exc), 400), count=False)
            return
        self.reply(req, 200, orjson.dumps(state.config.as_dict()), count=False)

    def reply_reset(self, req: Req) -> None:
        self.state.reset()
        self.reply(req, 200, orjson.dumps(self.state.stats()), count=False)

    # --- engine.Sink ------------------------------------------------------------------------------
    def head(self) -> None:
        self._write(render.stream_head())

    def events(self, events: list[bytes]) -> None:
        if len(events) == 1:
            self._write(render.frame(events[0]))
        else:
            self._write(b"".join([render.frame(e) for e in events]))

    def end_stream(self) -> None:
        self._active = None
        self._write(render.LAST_CHUNK)
        self._done_response(self._keep)

    def send(self, status: int, body: bytes, content_type: bytes | None) -> None:
        self._active = None
        self._send(status, body, content_type=content_type, keep=self._keep)

    def raw(self, data: bytes) -> None:
        self._write(data)

    def drop(self) -> None:
        self._active = None
        if self.transport is not None:
            self.transport.close()  # flushes what was sent, then FIN: no terminating chunk

    # --- store.Reader ----------------------------------------------------------------------------
    def replay_events(self, events: list[bytes]) -> None:
        self.events(events)

    def replay_end(self) -> None:
        self._reading = None
        self._write(render.LAST_CHUNK)
        self._done_response(self._keep)

    # --- writing --------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if not self._closed and self.transport is not None:
            self.transport.write(data)

    def _send(self, status: int, body: bytes, *, content_type: bytes | None = JSON,
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
