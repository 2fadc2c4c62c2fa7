"""Going on on another member: a stream whose member failed after its first byte continues on
another one, and the client sees one unbroken stream.

``Continuing`` is the layer of ``ProxyCall`` between the relay (relay.py, which calls its two
hooks) and the request's life (call.py). How the continuation's request is made and its events
rewritten is ``failover.Resumable``'s (``failover_text.TextResumable``'s for Messages and
Responses, whose ids this module asks a member's ``/tokenize`` for); when a stream goes on, where,
and what the call records of it, is this module's.

Invariants:
- only a stream that has started goes on (before its first byte a failure is still a status);
- a stream goes on only when ``Resumable`` says it can, the request's deadline has not passed and
  the backend allows another failover (``Backend.can_fail_over``: the request's limit, a healthy
  member not yet used); otherwise the part's error stands;
- the failed part's response is closed before the next is asked for, and the next one is the
  call's ``upstream`` from the moment it exists (the call closes it at its end whatever happens);
- every failure after the first byte is counted once in ``failovers``, with why it went on or
  why not; ``members`` lists every member the stream used, in order.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from vllm_gateway.backends.base import UpstreamRequest, UpstreamResponse
from vllm_gateway.errors import (
    BackendUnavailable,
    BadBackendResponse,
    GatewayError,
    StreamIdleTimeout,
    Unavailable,
    UpstreamError,
)
from vllm_gateway.proxy.failover import AnyResumable, Resumable
from vllm_gateway.proxy.failover_text import TextResumable
from vllm_gateway.proxy.relay import Relay
from vllm_gateway.proxy.routes import COMPLETIONS

# The most a /tokenize answer may be (a prompt's ids as JSON): what a broken member can make the
# failover hold.
_TOKENIZE_MAX_BYTES = 16 << 20

__all__ = ["Continuing", "failure_reason"]

log = logging.getLogger("vllm_gateway.proxy.call")


def failure_reason(exc: GatewayError) -> str:
    """Why a member's stream failed, as the failover metrics name it."""
    if isinstance(exc, StreamIdleTimeout):
        return "stream_idle_timeout"
    if isinstance(exc, BackendUnavailable):
        return "ejected" if "taken out" in exc.message else "connection_lost"
    return "backend_error"


class Continuing(Relay):
    """A relay whose stream may go on on another member (when the call set ``_resumable``, or
    ``_not_resumable`` to say why it may not)."""

    __slots__ = ()

    def _follow(self, resumable: AnyResumable, events: list[bytes], first: bool) -> list[bytes]:
        """The events as the client sees them: the first part's noted (and its ids taken out
        unless asked for); a continuation's rewritten into the original stream, its end replaced
        by the stream's own (the usage of every part, then [DONE])."""
        out = []
        for event in events:
            if first:
                if not isinstance(resumable, Resumable):
                    out.append(resumable.observe(event))  # typed events: event: ... data: ...
                    continue
                if not event.startswith(b"data: {"):
                    out.append(event)
                    continue
                known = resumable.prompt_ids is not None
                out.append(resumable.observe(event))
                if not known and resumable.prompt_ids is not None:
                    self._gw.backend.note_prompt_ids(self.upstream_id, resumable.prompt_ids)
                continue
            if event.startswith(b"data: [DONE]"):
                out.append(resumable.closing().rstrip(b"\n"))  # split_events form
                continue
            rewritten = resumable.rewrite(event)
            if rewritten is not None:
                out.append(rewritten.rstrip(b"\n"))
        # ``closing`` may hold two events (usage, [DONE]): split them again.
        return [e for joined in out for e in joined.split(b"\n\n") if e]

    async def _go_on(self, exc: GatewayError, deadline: float) -> UpstreamResponse | None:
        """Go on with the generation on another member (its response), end the stream here when
        the generation had already ended (None), or re-raise ``exc`` saying why not."""
        resumable = self._resumable
        if resumable is None:
            if self._not_resumable is not None:
                self.failovers.append((failure_reason(exc), f"not_continued:{self._not_resumable}"))
            raise exc
        gw = self._gw
        loop = asyncio.get_running_loop()
        reason = failure_reason(exc)
        failed = self.served_by
        if failed is not None and failed not in self.members:
            self.members.append(failed)
        why = resumable.why_not()
        text = resumable if isinstance(resumable, TextResumable) else None
        # A Messages or Responses stream whose text was whole only needs its ids to be ended here.
        if why is None and not resumable.finished and not (text is not None and text.whole):
            if loop.time() >= deadline:
                why = "deadline"
            else:
                why = gw.backend.can_fail_over(
                    self.model, frozenset(self.members), len(self.failovers)
                )
        if why is None and text is not None and text.prompt_ids is None and not text.stopped:
            why = await self._fetch_ids(text, deadline)
        if why is not None:
            self.failovers.append((reason, f"not_continued:{why}"))
            raise exc
        if self.upstream is not None:
            await self.upstream.aclose()
            self.upstream = None
        if resumable.finished:
            # The last token came and the backend died before its end of stream: end it here.
            self.failovers.append((reason, "completed_here"))
            self._ex.end(resumable.closing())
            self.events += 1
            return None
        raw, body = resumable.continuation()
        request = UpstreamRequest(
            "POST",
            COMPLETIONS,
            raw,
            body,
            True,
            self.upstream_id,
            self.model,
            avoid=frozenset(self.members),
        )
        log.warning(
            "request %s: %s on %s; continuing on another member (part %d)",
            self.request_id,
            reason,
            failed,
            resumable.parts,
        )
        try:
            async with asyncio.timeout_at(
                min(deadline, loop.time() + gw.settings.first_token_timeout)
            ):
                upstream = await gw.backend.send(request)
        except (TimeoutError, UpstreamError, Unavailable) as err:
            self.failovers.append((reason, "failed"))
            raise exc from err
        self.upstream = upstream
        if upstream.status != 200 or not upstream.content_type.startswith("text/event-stream"):
            self.failovers.append((reason, "failed"))
            raise exc
        self.failovers.append((reason, "resumed"))
        if upstream.served_by is not None and upstream.served_by not in self.members:
            self.members.append(upstream.served_by)
        return upstream

    async def _tokenize(self, body: dict[str, object], deadline: float) -> list[int]:
        """The ids a member's ``/tokenize`` gives for ``body`` (a member this stream did not use)."""
        gw = self._gw
        loop = asyncio.get_running_loop()
        raw = orjson.dumps(body)
        request = UpstreamRequest(
            "POST",
            "/tokenize",
            raw,
            body,
            False,
            self.upstream_id,
            self.model,
            avoid=frozenset(self.members),
        )
        # The answer is counted in the buffer budget while it is held (``_charge``), and given
        # back once its ids are out of it.
        before = self._charged
        try:
            async with asyncio.timeout_at(
                min(deadline, loop.time() + gw.settings.first_token_timeout)
            ):
                response = await gw.backend.send(request)
                try:
                    answer = await response.read(_TOKENIZE_MAX_BYTES, self._charge)
                finally:
                    await response.aclose()
            tokens = orjson.loads(answer).get("tokens") if response.status == 200 else None
        finally:
            self._ex.budget.give(self._charged - before)
            self._charged = before
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise BadBackendResponse("The backend's /tokenize answer has no token ids.")
        return tokens

    async def _fetch_ids(self, resumable: TextResumable, deadline: float) -> str | None:
        """Ask a member for the ids of a Messages or Responses stream's prompt and answer so far
        (vLLM takes none there); None when they came, else why the stream cannot go on."""
        prompt, answer = resumable.tokenize_requests()
        try:
            prompt_ids = await self._tokenize(prompt, deadline)
            answer_ids = await self._tokenize(answer, deadline) if answer is not None else []
        except (TimeoutError, GatewayError, orjson.JSONDecodeError, AttributeError) as err:
            log.warning("request %s: no token ids for failover: %r", self.request_id, err)
            return "no_token_ids"
        resumable.take_ids(prompt_ids, answer_ids)
        return None
