"""Mid-stream failover: when the member serving a stream dies, stalls or errs after the first byte,
the same generation goes on on another member, and the client sees one unbroken stream.

How it continues, exactly: the gateway asks the backend for token ids (``return_token_ids``; the
ids are taken out of what the client sees unless it asked for them itself, so its bytes are what
they would have been), keeps the prompt's ids and the ids generated so far, and on a failure sends
``/v1/completions`` with ``prompt`` = the prompt's ids + the ids generated up to the last chunk
that carried text, ``max_tokens`` reduced by as many, and the request's sampling and stop
parameters. With greedy decoding that continues token for token (measured on vLLM's CPU build: 100%
of cut points, on another replica too); text-based continuation (``continue_final_message``) does
not (it re-tokenizes the text, and diverged at about 8% of cut points). Ids after the last chunk
with text are left out: they are a character still being assembled, which the continuation writes
again (and a prompt ending inside a UTF-8 character makes vLLM echo the prompt).

Several choices (``n`` > 1) go on in one continuation: its ``prompt`` is a list with one prompt
per unfinished choice (the prompt's ids and that choice's own), each the continuation's choice of
its prompt, mapped back to its index. One request rather than one per choice: the relay reads one
upstream stream, and the member batches the prompts as it would the choices. ``max_tokens`` is
what the choice furthest behind may still write; a choice further along is ended here at its own
budget (its chunk that reaches it gets ``finish_reason`` ``length``, as vLLM's would) and the
rest of its prompt's output is dropped.

The continuation's chunks are rewritten into the original stream: its ``id``, ``created`` and
``model`` on every chunk, chat deltas for a chat request (no second role delta; a role chunk for
a choice the first part never opened), one ``finish_reason`` per choice, one ``[DONE]``, and
``usage`` (when asked) that adds the parts up: the original prompt's tokens, and every generated
token of every part. Logprobs are asked for again (completions' ``logprobs``; chat's
``top_logprobs`` as completions' ``logprobs``): completions' ``text_offset`` goes on from the
cut; chat's are rebuilt from the completions form (token, logprob, UTF-8 bytes, the first
``top_logprobs`` candidates in the step's order). Continuous usage statistics are the choice's
count so far in the whole stream.

What is not continued, and why (each a reason counted in the metrics; the stream ends with its
error event as before):
- Messages and Responses streams go on with ids from ``/tokenize`` (``failover_text``), each
  with reasons of its own;
- ``tools``: tool calls (a half-streamed call cannot be resumed by the completions route);
  ``structured``: structured output (its grammar state is lost); ``echo``/``suffix``/``best_of``
  on completions; ``prompts``: several prompts in one completions request;
- ``n``: several choices cut at different lengths with ``min_tokens`` (one ``min_tokens`` cannot
  hold for both); ``logprobs``: logprobs with ``return_tokens_as_token_ids`` or
  ``logprob_token_ids`` (not rebuilt from the completions form);
- ``no_token_ids``: the backend did not return ids (not a vLLM, or an old one);
- ``reasoning``, ``tool_call``: such a delta appeared in the stream;
- ``limit``: the request's failovers are spent; ``no_member``: no other healthy member serves the model; ``deadline``: the request's time is up.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from vllm_gateway.proxy.failover_text import (
    TextResumable,
    completions_body,
    data_object,
    part_choices,
)

__all__ = ["AnyResumable", "Resumable", "not_continuable"]

# Request fields the continuation keeps (the rest are chat-only, or routing).
_CARRIED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "length_penalty",
    "logit_bias",
    "bad_words",
    "allowed_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "priority",
)
_STRUCTURED = tuple(
    (field, "structured")
    for field in (
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    )
)
_CHAT_BLOCKERS = (
    ("tools", "tools"),
    ("functions", "tools"),
    *_STRUCTURED,
)
_COMPLETION_BLOCKERS = (
    ("echo", "echo"),
    ("suffix", "suffix"),
    ("best_of", "best_of"),
    *_STRUCTURED,
)
# vLLM renders these as null unless asked for: what the client sees when it did not ask.
_IDS = re.compile(rb'"(prompt_token_ids|token_ids)":\[[0-9,\s]*\]')


def not_continuable(body: dict[str, Any], chat: bool) -> str | None:
    """Why a request cannot be continued on another member, or None when it can."""
    for field, reason in _CHAT_BLOCKERS if chat else _COMPLETION_BLOCKERS:
        value = body.get(field)
        if value not in (None, False, [], {}):
            return reason
    if _top(body, chat) is not None and (
        body.get("return_tokens_as_token_ids") or body.get("logprob_token_ids")
    ):
        # Logprobs in those forms are not rebuilt from the completions form.
        return "logprobs"
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            return "prompts"  # several prompts: the continuation would need a prompt per choice
    return None


def _top(body: dict[str, Any], chat: bool) -> int | None:
    """How many top candidates each token's logprobs list (None: no logprobs asked for)."""
    if chat:
        if body.get("logprobs") is not True:
            return None
        top = body.get("top_logprobs")
        return top if isinstance(top, int) and not isinstance(top, bool) else 0
    value = body.get("logprobs")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _chat_logprobs(lp: Any, top: int) -> Any:
    """A completions chunk's logprobs in the chat format, as vLLM renders the same step for a chat
    request (``_create_chat_logprobs``): per token its text, logprob and UTF-8 bytes, and the first
    ``top`` candidates of the step (the completions dict holds them in the same order)."""
    if not isinstance(lp, dict):
        return None
    content = []
    tops = lp.get("top_logprobs") or []
    for i, (token, logprob) in enumerate(zip(lp["tokens"], lp["token_logprobs"], strict=True)):
        raw = token.encode("utf-8", errors="replace")
        step = tops[i] if i < len(tops) else None
        if logprob is None or not isinstance(step, dict):
            content.append({"token": token, "bytes": list(raw)})
            continue
        candidates = [
            {"token": t, "logprob": p, "bytes": list(t.encode("utf-8", errors="replace"))}
            for t, p in list(step.items())[:top]
        ]
        content.append(
            {"token": token, "logprob": logprob, "bytes": list(raw), "top_logprobs": candidates}
        )
    return {"content": content}


class _Choice:
    """What one choice of the stream has produced so far."""

    __slots__ = (
        "base",
        "cut",
        "cut_offset",
        "finish_reason",
        "generated",
        "offset",
        "opened",
        "seen",
        "stop_reason",
    )

    def __init__(self) -> None:
        self.generated: list[int] = []
        self.cut = 0  # ids up to the end of the last chunk that carried text
        self.offset = 0  # completions logprobs: the text offset of the next token
        self.cut_offset = 0  # ... at the cut
        self.base = 0  # ... where the current continuation started (its offsets count from 0)
        self.finish_reason: str | None = None
        self.stop_reason: Any = None
        self.opened = False  # chat: its role chunk was relayed
        self.seen = False  # a content chunk of it was relayed

    def note(self, ids: Any, text: Any, lp: Any) -> None:
        """Note one chunk: its token ids, whether it carried text, its logprobs' offsets."""
        if isinstance(lp, dict) and lp.get("tokens"):
            self.offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
        if isinstance(ids, list):
            self.generated.extend(ids)
            if text:
                self.cut = len(self.generated)
                self.cut_offset = self.offset

    def rewind(self) -> list[int]:
        """The ids kept (to the last chunk with text); what came after is written again."""
        del self.generated[self.cut :]
        self.offset = self.base = self.cut_offset
        return list(self.generated)


class Resumable:
    """What one streamed chat or completions request has produced so far, and how to go on."""

    __slots__ = (
        "_budget",
        "_choices",
        "_fingerprint",
        "_map",
        "_role",
        "_top",
        "_usage_sent",
        "blocked",
        "body",
        "chat",
        "client_ids",
        "continuous",
        "created",
        "ident",
        "include_usage",
        "model",
        "parts",
        "prompt_ids",
    )

    def __init__(self, body: dict[str, Any], chat: bool) -> None:
        self.body = body
        self.chat = chat
        self.client_ids = body.get("return_token_ids") is True  # the client wants them itself
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        # vLLM writes continuous usage only when the final usage is asked for too.
        self.continuous = (
            self.include_usage
            and isinstance(options, dict)
            and options.get("continuous_usage_stats") is True
        )
        n = body.get("n")
        self._choices = [_Choice() for _ in range(n if isinstance(n, int) and n > 1 else 1)]
        self._top = _top(body, chat)
        budget = body.get("max_completion_tokens") if chat else None
        if budget is None:
            budget = body.get("max_tokens")
        self._budget = budget if isinstance(budget, int) else None
        self._map: list[int] = []  # the continuation's choice j is the stream's _map[j]
        self._role: dict[str, Any] | None = None  # a role chunk, to open choices that had none
        self.ident: str | None = None
        self.created: int | None = None
        self.model: str | None = None
        self.prompt_ids: list[int] | None = None
        self.blocked: str | None = None  # a reason that appeared in the stream
        self._fingerprint: str | None = None
        self._usage_sent = False  # the stream's usage chunk was relayed (only [DONE] is left)
        self.parts = 1

    @property
    def finished(self) -> bool:
        """Every choice has its finish_reason: the generation is over."""
        return all(c.finish_reason is not None for c in self._choices)

    @property
    def generated(self) -> list[int]:
        """Every choice's token ids so far, in choice order."""
        return [t for c in self._choices for t in c.generated]

    # --- the request the first member gets --------------------------------------------------

    def upstream_body(self, raw: bytes) -> bytes:
        """The client's body with ``return_token_ids`` asked for (it is forwarded byte for byte
        otherwise; the field goes first, so a client's own value, later, wins)."""
        if "return_token_ids" in self.body:
            return raw
        start = raw.index(b"{") + 1
        rest = raw[start:].lstrip()
        sep = b"" if rest.startswith(b"}") else b","
        return raw[:start] + b'"return_token_ids":true' + sep + raw[start:]

    # --- what the stream shows ----------------------------------------------------------------

    def observe(self, event: bytes) -> bytes:
        """Note one content event of the stream being relayed; the event as the client sees it."""
        obj = data_object(event)
        if obj is None:
            return event
        if self.ident is None:
            self.ident = obj.get("id")
            self.created = obj.get("created")
            self.model = obj.get("model")
        if "usage" in obj and obj.get("system_fingerprint"):
            self._fingerprint = obj["system_fingerprint"]
        if obj.get("usage") and not obj.get("choices"):
            self._usage_sent = True
        top_prompt = obj.get("prompt_token_ids")
        if isinstance(top_prompt, list) and self.prompt_ids is None:
            self.prompt_ids = top_prompt
        shown = event if self.client_ids else _IDS.sub(rb'"\1":null', event)
        for choice in obj.get("choices") or ():
            self._note(choice, shown)
        return shown

    def _note(self, choice: dict[str, Any], shown: bytes) -> None:
        index = choice.get("index", 0)
        if not isinstance(index, int) or not 0 <= index < len(self._choices):
            self.blocked = self.blocked or "n"
            return
        mine = self._choices[index]
        ids = choice.get("token_ids")
        prompt = choice.get("prompt_token_ids")
        if isinstance(prompt, list) and self.prompt_ids is None:
            self.prompt_ids = prompt
        if self.chat:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if "role" in delta:
                mine.opened = True
                if self._role is None:
                    self._role = orjson.loads(shown[5:].strip())
                return
            if delta.get("tool_calls"):
                self.blocked = "tool_call"
            if delta.get("reasoning") or delta.get("reasoning_content"):
                self.blocked = "reasoning"
        else:
            text = choice.get("text")
        mine.seen = True
        mine.note(ids, text, None if self.chat else choice.get("logprobs"))
        if not isinstance(ids, list) and text:
            self.blocked = self.blocked or "no_token_ids"
        if choice.get("finish_reason") is not None:
            mine.finish_reason = choice["finish_reason"]
            mine.stop_reason = choice.get("stop_reason")

    # --- going on elsewhere -------------------------------------------------------------------

    def why_not(self) -> str | None:
        """Why this stream cannot be continued now, or None."""
        if self.blocked is not None:
            return self.blocked
        if self.prompt_ids is None or self.ident is None:
            return "no_token_ids"
        open_cuts = {c.cut for c in self._choices if c.finish_reason is None}
        if len(open_cuts) > 1 and isinstance(self.body.get("min_tokens"), int):
            return "n"  # one min_tokens cannot hold for choices cut at different lengths
        return None

    def continuation(self) -> tuple[bytes, dict[str, Any]]:
        """The ``/v1/completions`` body that goes on from the last chunk with text of every
        unfinished choice: one prompt per choice (the prompt's ids and the choice's own), so
        one request continues them all, each choice as the continuation's choice of its prompt."""
        assert self.prompt_ids is not None
        self._map = [i for i, c in enumerate(self._choices) if c.finish_reason is None]
        kept = [self._choices[i].rewind() for i in self._map]
        prompts = [[*self.prompt_ids, *ids] for ids in kept]
        prompt = prompts[0] if len(prompts) == 1 else prompts
        body = completions_body(self.body, self.model, prompt, _CARRIED)
        if self._top is not None:
            body["logprobs"] = self._top
        shortest = min(len(ids) for ids in kept)
        if self._budget is not None:
            # The choice furthest behind sets it; the others are ended at their own budget here.
            body["max_tokens"] = max(1, self._budget - shortest)
        min_tokens = self.body.get("min_tokens")
        if isinstance(min_tokens, int):
            body["min_tokens"] = max(0, min_tokens - shortest)
        self.parts += 1
        return orjson.dumps(body), body

    def rewrite(self, event: bytes) -> bytes | None:
        """A continuation's event as the original stream's (None: nothing to send for it)."""
        choices = part_choices(event)
        if not isinstance(choices, list):
            return choices  # None: nothing (the relay writes its own end and the whole usage)
        out = b""
        if self.chat and self._role is not None:
            out = self._open_choices()
        for choice in choices:
            out += self._rewrite_choice(choice)
        return out or None

    def _open_choices(self) -> bytes:
        """The role chunks of choices the first part never opened (it died among them)."""
        out = b""
        assert self._role is not None
        for index, mine in enumerate(self._choices):
            if not mine.opened:
                mine.opened = True
                role = {**self._role, "choices": [{**self._role["choices"][0], "index": index}]}
                out += b"data: " + orjson.dumps(role) + b"\n\n"
        return out

    def _rewrite_choice(self, choice: dict[str, Any]) -> bytes:
        j = choice.get("index", 0)
        if not isinstance(j, int) or not 0 <= j < len(self._map):
            return b""
        index = self._map[j]
        mine = self._choices[index]
        if mine.finish_reason is not None:
            return b""  # ended here at its own budget: the rest of its prompt is not its
        text = choice.get("text") or ""
        ids = choice.get("token_ids")
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and lp.get("text_offset") is not None:
            # The continuation counts offsets from its own start: from the cut in the stream.
            lp["text_offset"] = [o + mine.base for o in lp["text_offset"]]
        mine.note(ids, text, lp)
        finish = choice.get("finish_reason")
        stop_reason = choice.get("stop_reason")
        if finish is None and self._budget is not None and len(mine.generated) >= self._budget:
            finish, stop_reason = "length", None
        if finish is not None:
            mine.finish_reason, mine.stop_reason = finish, stop_reason
        if not text and not ids and finish is None:
            return b""
        shown_ids = ids if self.client_ids else None
        if self.chat:
            out_choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": text},
                "logprobs": _chat_logprobs(lp, self._top or 0) if self._top is not None else None,
                "finish_reason": finish,
            }
            if finish is not None:
                out_choice["stop_reason"] = stop_reason
            out_choice["token_ids"] = shown_ids
            obj_name = "chat.completion.chunk"
        else:
            out_choice = {
                "index": index,
                "text": text,
                "logprobs": lp,
                "finish_reason": finish,
                "stop_reason": stop_reason,
                "prompt_token_ids": self.prompt_ids if self.client_ids and not mine.seen else None,
                "token_ids": shown_ids,
            }
            obj_name = "text_completion"
        mine.seen = True
        out: dict[str, Any] = {
            "id": self.ident,
            "object": obj_name,
            "created": self.created,
            "model": self.model,
            "choices": [out_choice],
        }
        if self.continuous:
            out["usage"] = self._usage(len(mine.generated), chunk=True)
        return b"data: " + orjson.dumps(out) + b"\n\n"

    def _usage(self, completion: int, chunk: bool = False) -> dict[str, Any]:
        prompt = len(self.prompt_ids or ())
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
        }
        if chunk and self.chat:
            usage["completion_tokens_details"] = None  # chat sets it per chunk, completions not
        return usage

    def counts(self) -> tuple[int, int]:
        """(prompt, completion) tokens, as the stream's usage reports them: the original prompt's,
        and every token generated so far in every part (what the token limit charges too)."""
        return len(self.prompt_ids or ()), sum(len(c.generated) for c in self._choices)

    def closing(self) -> bytes:
        """The end of the stream after a continuation: the usage chunk when asked, ``[DONE]``."""
        out = b""
        if self.include_usage and not self._usage_sent:
            usage: dict[str, Any] = {
                "id": self.ident,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self._usage(self.counts()[1]),
            }
            if self._fingerprint:
                usage["system_fingerprint"] = self._fingerprint
            out += b"data: " + orjson.dumps(usage) + b"\n\n"
        return out + b"data: [DONE]\n\n"


# A stream that may go on on another member: a chat or completions one, or a Messages or
# Responses one (whose ids come from /tokenize).
AnyResumable = Resumable | TextResumable
