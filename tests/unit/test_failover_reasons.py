"""Which streams failover may continue, and the reason counted for those it may not."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_gateway.proxy.failover import not_continuable
from vllm_gateway.proxy.failover_messages import messages_not_continuable
from vllm_gateway.proxy.failover_responses import responses_not_continuable

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({}, None),
        ({"n": 3}, None),
        ({"logprobs": True, "top_logprobs": 2}, None),
        ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}}, None),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "structured"),
        ({"logprobs": True, "return_tokens_as_token_ids": True}, "logprobs"),
        ({"logprobs": True, "logprob_token_ids": [5]}, "logprobs"),
    ],
)
def test_chat(extra: dict[str, Any], why: str | None) -> None:
    assert not_continuable({**CHAT, **extra}, chat=True) == why


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"prompt": "say"}, None),
        ({"prompt": [1, 2, 3], "logprobs": 0}, None),
        ({"prompt": "say", "echo": True}, "echo"),
        ({"prompt": ["a", "b"]}, "prompts"),
        ({"prompt": [[1], [2]]}, "prompts"),
    ],
)
def test_completions(extra: dict[str, Any], why: str | None) -> None:
    assert not_continuable({"model": "m", **extra}, chat=False) == why


TEXT = [{"type": "text", "text": "hi"}]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "system": "s"}, None),
        ({"messages": [{"role": "user", "content": TEXT}], "system": TEXT}, None),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "x"}}, "reasoning"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "output_config": {"format": {}}},
            None,  # an empty format asks for nothing
        ),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "content"),
        ({"messages": [{"role": "system", "content": "inline"}]}, "content"),
    ],
)
def test_messages(body: dict[str, Any], why: str | None) -> None:
    assert messages_not_continuable(body) == why


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"input": "hi"}, None),
        (
            {"input": [{"role": "user", "content": "hi"}], "text": {"format": {"type": "text"}}},
            None,
        ),
        ({"input": "hi", "tools": [{"type": "function"}]}, "tools"),
        ({"input": "hi", "reasoning": {"effort": "low"}}, "reasoning"),
        ({"input": "hi", "text": {"format": {"type": "json_schema"}}}, "structured"),
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response"),
        ({"input": "hi", "background": True}, "background"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "content"),
    ],
)
def test_responses(body: dict[str, Any], why: str | None) -> None:
    assert responses_not_continuable(body) == why
