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

from typing import Any

from vllm_gateway_tools.simulator.render import DONE, Script, dumps, output_text, token_text
from vllm_gateway_tools.simulator.tokenizer import OUTPUT_BASE

__all__ = [
    "BATCH_FINGERPRINT",
    "BatchScript",
    "ChatScript",
    "CompletionScript",
    "StreamTemplate",
    "batch_response",
    "chat_response",
    "completion_response",
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
    ) -> None:
        self.chat = chat
        # ``return_token_ids``: the prompt's ids on the first chunk, each chunk's own ids.
        self.prompt_ids = prompt_ids
        self.return_ids = prompt_ids is not None
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

    def first(self) -> bytes | None:
        """The role chunk that opens a chat stream; completions streams have none."""
        if not self.chat:
            return None
        prompt = dumps(self.prompt_ids) if self.prompt_ids is not None else b"null"
        return self._head + (
            b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
            b'"finish_reason":null}],"prompt_token_ids":%b,"prompt_text":null}\n\n' % prompt
        )

    def token(
        self, text: str, finish_reason: str | None = None, token_id: int | None = None,
        first: bool = False,
    ) -> bytes:  # fmt: skip
        """A content chunk; the last one of a stream carries ``finish_reason``."""
        body = dumps(text)
        ids = b"[%d]" % token_id if self.return_ids and token_id is not None else b"null"
        if self.chat:
            if finish_reason is None:
                tail = b'},"logprobs":null,"finish_reason":null,"token_ids":%b}]}\n\n' % ids
            else:
                tail = (
                    b'},"logprobs":null,"finish_reason":"%b","stop_reason":null,"token_ids":%b}]}\n\n'
                    % (finish_reason.encode(), ids)
                )
            return self._head + b'{"index":0,"delta":{"content":' + body + tail
        reason = b"null" if finish_reason is None else b'"%b"' % finish_reason.encode()
        prompt = b"null"
        if first and self.prompt_ids is not None:
            prompt = dumps(self.prompt_ids)
        return (
            self._head
            + b'{"index":0,"text":'
            + body
            + b',"logprobs":null,"finish_reason":'
            + reason
            + b',"stop_reason":null,"prompt_token_ids":%b,"token_ids":%b}]}\n\n' % (prompt, ids)
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
    """``/v1/chat/completions``: the role chunk, content chunks (the last one carries
    ``finish_reason``), the usage chunk when asked, ``[DONE]``."""

    def __init__(
        self,
        *,
        include_usage: bool = False,
        prompt_ids: list[int] | None = None,
        start: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.include_usage = include_usage
        self.start = start  # the index of the first output token (a continuation's is later)
        self.tmpl = StreamTemplate(
            chat=self._chat,
            request_id=self.request_id,
            model=self.model,
            created=self.created,
            prompt_ids=prompt_ids,
        )

    _chat = True

    def first(self) -> list[bytes]:
        first = self.tmpl.first()
        return [] if first is None else [first]

    def token(self, i: int, last: bool) -> bytes:
        k = self.start + i
        return self.tmpl.token(
            token_text(k), self.finish if last else None, OUTPUT_BASE + k, first=i == 0
        )

    def cut_short(self) -> list[bytes]:
        return [self.tmpl.token("", self.finish)]

    def closing(self) -> list[bytes]:
        if self.include_usage:
            return [self.tmpl.usage(self.prompt_tokens, self.n), DONE]
        return [DONE]

    def whole(self) -> bytes:
        make = chat_response if self._chat else completion_response
        text = "".join(token_text(self.start + i) for i in range(self.n))
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
