"""``/v1/chat/completions``, ``/v1/completions`` and ``/v1/chat/completions/batch``.

Output length: ``max_tokens`` (or ``max_completion_tokens``) when given, finishing with
``"length"``; otherwise the ``tokens`` knob, finishing with ``"stop"``. With the prefix cache model
on, chat and completions prompts go through it (``simulator.prefix_cache``): the request's record
gets ``cached_tokens`` and its first token waits ``prefill_per_token`` per uncached token more.
"""

from __future__ import annotations

import time
from typing import Any, TypeGuard

from vllm_gateway_tools.simulator import render, render_openai
from vllm_gateway_tools.simulator.engine import Job
from vllm_gateway_tools.simulator.exchange import (
    Conn,
    Req,
    begin,
    reject,
    request_id,
    resolve_model,
    unknown_model,
)
from vllm_gateway_tools.simulator.prefix_cache import prompt_sequences
from vllm_gateway_tools.simulator.tokenizer import (
    IM_START,
    chat_messages,
    chat_tokens,
    output_lineage,
    output_start,
)
from vllm_gateway_tools.simulator.tokenizer import prompt_tokens as count_prompt_tokens

__all__ = ["batch", "chat", "completions"]

_NOT_OBJECT = render.error_body("Expected a JSON object in the request body.", 400)


def chat(conn: Conn, req: Req) -> None:
    _generate(conn, req, chat=True)


def completions(conn: Conn, req: Req) -> None:
    _generate(conn, req, chat=False)


# The most choices one request may ask for (vLLM bounds them by its scheduler; a simulator bound).
MAX_CHOICES = 16


def _is_ids(prompt: Any) -> TypeGuard[list[int]]:
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many top candidates each token's logprobs list (None: no logprobs asked). Chat asks
    with ``logprobs: true`` and ``top_logprobs``; completions with ``logprobs: <int>``."""
    if chat:
        if body.get("logprobs") is not True:
            return None
        top = body.get("top_logprobs")
        return top if isinstance(top, int) and not isinstance(top, bool) and top > 0 else 0
    value = body.get("logprobs")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _max_tokens(body: dict[str, Any], chat: bool) -> tuple[int | None, str | None]:
    """The request's output limit, or the message of a 400."""
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        return None, f"max_tokens must be at least 1, got {max_tokens}."
    return max_tokens, None


def _too_long(max_model_len: int, n: int, prompt_tokens: int) -> str:
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, you "
        f"requested {n} output tokens and your prompt contains at least {prompt_tokens} input "
        f"tokens, for a total of at least {prompt_tokens + n} tokens. Please reduce the length "
        "of the input prompt or the number of requested output tokens."
    )


def _generate(conn: Conn, req: Req, *, chat: bool) -> None:
    started = begin(conn, req, not_json=_NOT_OBJECT)
    if started is None:
        return
    record, body, cfg = started
    record["stream"] = body.get("stream") is True
    # vLLM's request priority (lower first under --scheduling-policy priority): checked and
    # recorded, so that a test can see what the gateway sent.
    priority = record["priority"] = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        reject(conn, req, record, 400, render.error_body(
            "priority: Input should be a valid integer", 400, param="priority"))  # fmt: skip
        return
    model = resolve_model(conn.state, body, record)
    if model is None:
        message = unknown_model(conn.state, record["model"])
        reject(conn, req, record, 404, render.error_body(message, 404, param="model",
                                                         err_type="NotFoundError"))  # fmt: skip
        return
    prompt_tokens = count_prompt_tokens(body, chat)
    if prompt_tokens is None:
        field = "messages" if chat else "prompt"
        reject(conn, req, record, 400, render.error_body(f"Field required: {field}", 400,
                                                         param=field))  # fmt: skip
        return
    max_tokens, problem = _max_tokens(body, chat)
    if problem is not None:
        reject(conn, req, record, 400, render.error_body(problem, 400, param="max_tokens"))
        return
    n = cfg.tokens if max_tokens is None else max_tokens
    if prompt_tokens + n > cfg.max_model_len:
        message = _too_long(cfg.max_model_len, n, prompt_tokens)
        reject(conn, req, record, 400, render.error_body(message, 400, param="max_tokens"))
        return
    choices_per_prompt = body.get("n", 1)
    if choices_per_prompt is None:
        choices_per_prompt = 1
    if (
        isinstance(choices_per_prompt, bool)
        or not isinstance(choices_per_prompt, int)
        or not 1 <= choices_per_prompt <= MAX_CHOICES
    ):
        message = f"n must be between 1 and {MAX_CHOICES}, got {choices_per_prompt}."
        reject(conn, req, record, 400, render.error_body(message, 400, param="n"))
        return
    temperature = body.get("temperature")
    if choices_per_prompt > 1 and isinstance(temperature, (int, float)) and temperature < 1e-5:
        # vLLM's SamplingParams: greedy decoding would write the same answer n times.
        message = f"n must be 1 when using greedy sampling, got {choices_per_prompt}."
        reject(conn, req, record, 400, render.error_body(message, 400))
        return
    top = _logprobs(body, chat)
    options = body.get("stream_options")
    make = render_openai.ChatScript if chat else render_openai.CompletionScript
    return_ids = body.get("return_token_ids") is True
    prompts: list[tuple[list[int] | None, int, Any]]  # (ids when asked, size, the prompt)
    if chat:
        ids = conn.state.vocab.encode_chat(chat_messages(body["messages"])) if return_ids else None
        prompts = [(ids, prompt_tokens, None)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
            prompts = [(list(p), len(p), p) for p in prompt]  # several prompts of token ids
        elif _is_ids(prompt):
            prompts = [(list(prompt), prompt_tokens, prompt)]
        else:
            ids = conn.state.vocab.encode(str(prompt)) if return_ids else None
            prompts = [(ids, prompt_tokens, prompt)]
    # Each sampled choice writes its own tokens (deterministically: `` c1tok0`` for the second).
    choices = []
    for p, (ids, size, prompt) in enumerate(prompts):
        lineage = output_lineage(prompt)
        for c in range(choices_per_prompt):
            choices.append(
                render_openai.Choice(
                    index=p * choices_per_prompt + c,
                    lineage=c if lineage is None else lineage,
                    start=output_start(prompt),
                    prompt_ids=ids if return_ids else None,
                    prompt_tokens=size,
                )
            )
    finish = "stop" if max_tokens is None else "length"
    continues = choices[0].start > 0 or (
        _is_ids(body.get("prompt")) and body["prompt"][0] == IM_START
    )
    if not chat and len(prompts) == 1 and continues:
        # A continuation of the model's own answer (or of a conversation rendered as ids) ends
        # where that answer ends (its EOS after ``tokens`` tokens in all) unless its max_tokens
        # comes first.
        natural = cfg.tokens - choices[0].start
        if max_tokens is None or natural < max_tokens:
            n, finish = max(1, natural), "stop"
    first_ids = prompts[0][0] if return_ids else None
    script = make(
        prompt_ids=first_ids,
        return_ids=return_ids,
        start=choices[0].start,
        choices=choices,
        logprobs=top,
        request_id=request_id(req, "chatcmpl-" if chat else "cmpl-"),
        model=model,
        n=n,
        finish=finish,
        prompt_tokens=prompt_tokens,
        created=int(time.time()),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        continuous_usage=isinstance(options, dict)
        and options.get("continuous_usage_stats") is True,
    )
    prompt_ids = first_ids
    # Continued past the answer's end: the EOS at once (one chunk without text).
    script.eos_only = (
        not chat
        and len(prompts) == 1
        and continues
        and n == 1
        and finish == "stop"
        and cfg.tokens <= choices[0].start
    )
    script.stream = record["stream"]
    prefill = 0.0
    if conn.state.prefix_cache is not None:
        chat_ids = [prompt_ids] if chat and prompt_ids is not None else None
        cached, computed = conn.state.prefix_lookup(
            chat_ids or prompt_sequences(conn.state.vocab, body, chat)
        )
        record["cached_tokens"] = cached
        prefill = cfg.prefill_per_token * computed
    conn.run(Job(state=conn.state, cfg=cfg, record=record, script=script, route=req.route,
                 sink=conn, loop=conn.loop, prefill=prefill))  # fmt: skip


def batch(conn: Conn, req: Req) -> None:
    """N conversations in one request: one ``chat.completion`` with a choice per conversation.
    Never streamed (vLLM ignores ``stream`` here); paced like one request of ``n`` tokens."""
    started = begin(conn, req)
    if started is None:
        return
    record, body, cfg = started
    model = resolve_model(conn.state, body, record)
    if model is None:
        message = unknown_model(conn.state, record["model"])
        reject(conn, req, record, 404, render.error_body(message, 404, param="model",
                                                         err_type="NotFoundError"))  # fmt: skip
        return
    conversations = body.get("messages")
    if (
        not isinstance(conversations, list)
        or not conversations
        or not all(isinstance(c, list) and c for c in conversations)
    ):
        error = (
            render.missing("body.messages", body)
            if conversations is None
            else {
                "type": "list_type",
                "loc": "body.messages",
                "msg": "Input should be a non-empty list of non-empty conversations",
                "input": conversations,
            }
        )
        reject(conn, req, record, 400, render.validation_body([error]))
        return
    max_tokens, problem = _max_tokens(body, True)
    if problem is not None:
        reject(conn, req, record, 400, render.error_body(problem, 400, param="max_tokens"))
        return
    sizes = [max(1, chat_tokens(chat_messages(c))) for c in conversations]
    n = cfg.tokens if max_tokens is None else max_tokens
    if max(sizes) + n > cfg.max_model_len:
        message = _too_long(cfg.max_model_len, n, max(sizes))
        reject(conn, req, record, 400, render.error_body(message, 400, param="max_tokens"))
        return
    script = render_openai.BatchScript(
        request_id=request_id(req, "chatcmpl-"),
        model=model,
        n=n,
        finish="stop" if max_tokens is None else "length",
        prompt_tokens=sum(sizes),
        created=int(time.time()),
        conversations=len(conversations),
    )
    conn.run(Job(state=conn.state, cfg=cfg, record=record, script=script, route=req.route,
                 sink=conn, loop=conn.loop))  # fmt: skip
