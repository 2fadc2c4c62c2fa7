"""The bytes of vLLM 0.32's ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/chat/completions/batch``. No I/O.

The shapes are copied from vLLM's serving code: a stream chunk is
``ChatCompletionStreamResponse.model_dump_json(exclude_unset=True)`` with the fields the serving code
sets explicitly (hence ``"logprobs":null`` and ``"token_ids":null`` but no ``usage``), the final usage
chunk is dumped with ``exclude_none=True``, and a whole response is ``model_dump()`` (every field,
``null`` included).

Per stream, ``StreamTemplate`` renders the invariant parts of a chunk once (id, model, created); a
content chunk is then two byte concatenations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_gateway_tools.simulator.render import DONE, Script, dumps, output_text
from vllm_gateway_tools.simulator.tokenizer import output_id, output_piece

__all__ = [
    "BATCH_FINGERPRINT",
    "BatchScript",
    "ChatScript",
    "Choice",
    "CompletionScript",
    "StreamTemplate",
    "batch_response",
    "chat_logprobs",
    "chat_response",
    "completion_logprobs",
    "completion_response",
    "logprob",
]


class StreamTemplate:
    """The SSE events of one streamed response (chat or completions), with its fixed parts pre-rendered."""

    __slots__ = ("_head", "chat", "created", "model", "prompt_ids", "request_id", "return_ids")

    def __init__(
        self,
        *,
        chat: bool,
        request_id: str,
        model: str,
        created: int,
        prompt_ids: list[int] | None = None,
        return_ids: bool | None = None,
    ) -> None:
        self.chat = chat
        # ``return_token_ids``: the prompt's ids on the first chunk, each chunk's own ids.
        self.prompt_ids = prompt_ids
        self.return_ids = prompt_ids is not None if return_ids is None else return_ids
        self.request_id = request_id
        self.model = model
        self.created = created
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self._head = b'data: {"id":%b,"object":"%b","created":%d,"model":%b,"choices":[' % (
            dumps(request_id),
            obj,
            created,
            dumps(model),
        )

    def first(
        self, index: int = 0, usage: bytes = b"", prompt_ids: list[int] | None = None
    ) -> bytes | None:
        """The role chunk that opens a chat stream (one per choice); completions streams have
        none. ``usage``: a rendered ``,"usage":{...}`` (continuous usage statistics)."""
        if not self.chat:
            return None
        ids = self.prompt_ids if prompt_ids is None else prompt_ids
        prompt = dumps(ids) if ids is not None and self.return_ids else b"null"
        return self._head + (
            b'{"index":%d,"delta":{"role":"assistant","content":""},"logprobs":null,'
            b'"finish_reason":null}]%b,"prompt_token_ids":%b,"prompt_text":null}\n\n'
            % (index, usage, prompt)
        )

    def token(
        self, text: str, finish_reason: str | None = None, token_id: int | None = None,
        first: bool = False, *, index: int = 0, logprobs: bytes = b"null", usage: bytes = b"",
        prompt_ids: list[int] | None = None,
    ) -> bytes:  # fmt: skip
        """A content chunk; the last one of a choice carries ``finish_reason``. ``logprobs``:
        the choice's rendered logprobs; ``usage``: a rendered ``,"usage":{...}``."""
        body = dumps(text)
        ids = b"[%d]" % token_id if self.return_ids and token_id is not None else b"null"
        if self.chat:
            if finish_reason is None:
                tail = b'},"logprobs":%b,"finish_reason":null,"token_ids":%b}]%b}\n\n' % (
                    logprobs, ids, usage)  # fmt: skip
            else:
                tail = (
                    b'},"logprobs":%b,"finish_reason":"%b","stop_reason":null,"token_ids":%b}]'
                    b"%b}\n\n" % (logprobs, finish_reason.encode(), ids, usage)
                )
            return self._head + b'{"index":%d,"delta":{"content":' % index + body + tail
        reason = b"null" if finish_reason is None else b'"%b"' % finish_reason.encode()
        prompt = b"null"
        own = self.prompt_ids if prompt_ids is None else prompt_ids
        if first and self.return_ids and own is not None:
            prompt = dumps(own)
        return (
            self._head
            + b'{"index":%d,"text":' % index
            + body
            + b',"logprobs":'
            + logprobs
            + b',"finish_reason":'
            + reason
            + b',"stop_reason":null,"prompt_token_ids":%b,"token_ids":%b}]%b}\n\n'
            % (prompt, ids, usage)
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The final usage chunk that ``stream_options.include_usage`` asks for."""
        return (
            self._head
            + b'],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
            % (
                prompt_tokens,
                prompt_tokens + completion_tokens,
                completion_tokens,
            )
        )

    def chunk_usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The ``usage`` of one chunk with ``continuous_usage_stats``: the choice's tokens so far
        (chat sets ``completion_tokens_details``, to null; completions leaves it unset)."""
        details = b',"completion_tokens_details":null' if self.chat else b""
        return b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d%b}' % (
            prompt_tokens,
            prompt_tokens + completion_tokens,
            completion_tokens,
            details,
        )


def logprob(index: int, rank: int) -> float:
    """The simulator's logprob of the candidate of ``rank`` (0: the greedy token) at output token
    ``index``: exact in binary, so it prints the same everywhere."""
    return -0.0625 - 0.5 * rank - 0.125 * (index % 4)


def _candidates(index: int, choice: int, top: int) -> list[tuple[str, float]]:
    """The step's logprobs dict as vLLM fills it for a greedy token: the sampled token (also the
    most likely) and the other top candidates, ``max(top, 1)`` in all."""
    out = [(output_piece(index, choice), logprob(index, 0))]
    out += [(f" alt{rank}", logprob(index, rank)) for rank in range(1, top)]
    return out


def chat_logprobs(index: int, choice: int, top: int) -> bytes:
    """``ChatCompletionLogProbs`` of one token: the token, its logprob and bytes, and the first
    ``top`` candidates (``_create_chat_logprobs``)."""
    cands = _candidates(index, choice, top)
    token, lp = cands[0]
    tops = [{"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in cands[:top]]
    return dumps(
        {
            "content": [
                {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": tops}
            ]
        }
    )


def completion_logprobs(index: int, choice: int, top: int, offset: int) -> bytes:
    """``CompletionLogProbs`` of one token at text offset ``offset`` (``_create_completion_logprobs``:
    every candidate of rank up to ``top``)."""
    cands = _candidates(index, choice, top)
    token, lp = cands[0]
    return dumps(
        {
            "text_offset": [offset],
            "token_logprobs": [lp],
            "tokens": [token],
            "top_logprobs": [dict(cands)],
        }
    )


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice of a stream: its ``index`` in the response, the choice whose tokens it writes
    (``lineage``: a continuation's is the one its prompt ends in), the index of its first output
    token, and its prompt (ids, when asked for; size)."""

    index: int
    lineage: int
    start: int
    prompt_ids: list[int] | None
    prompt_tokens: int


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def _chat_choice(index: int, text: str, finish_reason: str) -> dict[str, Any]:
    return {
        "index": index,
        "message": {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        },
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": None,
        "token_ids": None,
        "routed_experts": None,
    }


def _chat_body(
    request_id: str, model: str, created: int, choices: list[dict[str, Any]],
    prompt_tokens: int, completion_tokens: int, fingerprint: str | None,
) -> bytes:  # fmt: skip
    return dumps(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": fingerprint,
            "usage": _usage(prompt_tokens, completion_tokens),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    )


def chat_response(
    *,
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    """A non-streamed ``/v1/chat/completions`` body (``ChatCompletionResponse.model_dump()``)."""
    choice = _chat_choice(0, text, finish_reason)
    return _chat_body(request_id, model, created, [choice], prompt_tokens, completion_tokens, None)


# vLLM's batch handler fills system_fingerprint (its version and build), the plain one does not.
BATCH_FINGERPRINT = "vllm-0.32.0-00000000"


def batch_response(
    *,
    request_id: str,
    model: str,
    created: int,
    choices: list[tuple[str, str]],
    prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    """A ``/v1/chat/completions/batch`` body: one choice (text, finish_reason) per conversation,
    usage summed over all of them."""
    rendered = [_chat_choice(i, text, finish) for i, (text, finish) in enumerate(choices)]
    return _chat_body(
        request_id, model, created, rendered, prompt_tokens, completion_tokens, BATCH_FINGERPRINT
    )


def completion_response(
    *,
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    """A non-streamed ``/v1/completions`` body (``CompletionResponse.model_dump()``)."""
    return dumps(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": _usage(prompt_tokens, completion_tokens),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    )


class ChatScript(Script):
    """``/v1/chat/completions``: a role chunk per choice, then per step one content chunk per
    choice (each choice's last one carries ``finish_reason``), the usage chunk when asked,
    ``[DONE]``. ``logprobs``: the number of top candidates asked for (None: none asked);
    ``continuous_usage``: every chunk carries its choice's usage so far."""

    def __init__(
        self,
        *,
        include_usage: bool = False,
        continuous_usage: bool = False,
        prompt_ids: list[int] | None = None,
        start: int = 0,
        choices: list[Choice] | None = None,
        logprobs: int | None = None,
        return_ids: bool | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.include_usage = include_usage
        self.continuous = include_usage and continuous_usage
        self.logprobs = logprobs
        self.eos_only = False  # the answer had ended: one chunk without text, then the end
        self.start = start  # the index of the first output token (a continuation's is later)
        self.choices = choices or [Choice(0, 0, start, prompt_ids, self.prompt_tokens)]
        self._offsets = [0] * len(self.choices)  # completions' text offset, per choice
        self.tmpl = StreamTemplate(
            chat=self._chat,
            request_id=self.request_id,
            model=self.model,
            created=self.created,
            prompt_ids=prompt_ids,
            return_ids=return_ids,
        )

    _chat = True

    def first(self) -> list[bytes]:
        out = []
        for c in self.choices:
            usage = self.tmpl.chunk_usage(c.prompt_tokens, 0) if self.continuous else b""
            event = self.tmpl.first(c.index, usage, c.prompt_ids)
            if event is not None:
                out.append(event)
        return out

    def _chunk(self, c: Choice, n: int, text: str, finish: str | None, token_id: int | None,
               k: int, first: bool) -> bytes:  # fmt: skip
        lp = b"null"
        if self.logprobs is not None and token_id is not None:
            if self._chat:
                lp = chat_logprobs(k, c.lineage, self.logprobs)
            else:
                lp = completion_logprobs(k, c.lineage, self.logprobs, self._offsets[c.index])
                self._offsets[c.index] += len(output_piece(k, c.lineage))
        usage = self.tmpl.chunk_usage(c.prompt_tokens, n) if self.continuous else b""
        return self.tmpl.token(text, finish, token_id, first, index=c.index, logprobs=lp,
                               usage=usage, prompt_ids=c.prompt_ids)  # fmt: skip

    def tokens(self, i: int, last: bool) -> list[bytes]:
        if self.eos_only:
            return self.cut_short()
        out = []
        for c in self.choices:
            k = c.start + i
            finish = self.finish if last else None
            text, token_id = output_piece(k, c.lineage), output_id(k, c.lineage)
            out.append(self._chunk(c, i + 1, text, finish, token_id, k, i == 0))
        return out

    def token(self, i: int, last: bool) -> bytes:
        return self.tokens(i, last)[0]

    def cut_short(self) -> list[bytes]:
        return [self._chunk(c, self.n, "", self.finish, None, 0, False) for c in self.choices]

    def closing(self) -> list[bytes]:
        if self.include_usage:
            prompt = self.prompt_tokens
            return [self.tmpl.usage(prompt, self.n * len(self.choices)), DONE]
        return [DONE]

    def whole(self) -> bytes:
        make = chat_response if self._chat else completion_response
        text = "".join(output_piece(self.start + i) for i in range(self.n))
        return make(request_id=self.request_id, model=self.model, created=self.created,
                    text=text, finish_reason=self.finish,
                    prompt_tokens=self.prompt_tokens, completion_tokens=self.n)  # fmt: skip


class CompletionScript(ChatScript):
    """``/v1/completions``: like chat, without the role chunk."""

    _chat = False


class BatchScript(Script):
    """``/v1/chat/completions/batch``: never streamed; one choice per conversation, each ``n``
    tokens long (``n`` and ``finish`` are per conversation alike)."""

    stream = False

    def __init__(self, *, conversations: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.conversations = conversations

    def whole(self) -> bytes:
        text = output_text(self.n)
        return batch_response(request_id=self.request_id, model=self.model, created=self.created,
                              choices=[(text, self.finish)] * self.conversations,
                              prompt_tokens=self.prompt_tokens,
                              completion_tokens=self.n * self.conversations)  # fmt: skip
