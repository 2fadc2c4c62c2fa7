"""Turn a raw request body into a ``ValidRequest``, or a 400 that names the field.

Only what the gateway must know, or must refuse, is checked here: the fields that decide where a
request goes and what it costs (model, stream, token budgets, n, the sampling ranges, the shape of
the messages). Every other field is left for the backend to judge, and the body is forwarded byte
for byte unless a model alias rewrites it. Uploads and admin bodies are not parsed at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from vllm_gateway.errors import InvalidJSON, InvalidRequest
from vllm_gateway.proxy.routes import (
    CHAT,
    COMPLETIONS,
    MESSAGES,
    RESPONSES_PATH,
    Body,
    Route,
    match,
)

__all__ = [
    "ValidRequest",
    "is_json_media_type",
    "is_multipart",
    "set_response_id",
    "validate",
    "validate_body",
]

# Largest n the gateway forwards: each choice is a full generation on the engine.
MAX_N = 16

# vLLM's ``max_tokens`` for a completions request that sets none.
_COMPLETIONS_DEFAULT = 16

# The routes whose answer may be a stream, when the body asks for one.
_STREAMING = frozenset({CHAT, COMPLETIONS, RESPONSES_PATH, MESSAGES})


# Read-only by convention, not frozen: a frozen dataclass pays a call per field to build, on
# every request.
@dataclass(slots=True)
class ValidRequest:
    body: bytes
    json: dict[str, Any] | None  # None for bodies the gateway does not parse (or while dropped)
    model: str | None
    stream: bool
    # The output budget vLLM will use (the field it reads, times choices and prompts); 0 when the
    # request sets none and vLLM's default is the context left, which the gateway cannot know.
    requested_tokens: int = 0
    previous_response_id: str | None = None  # Responses: the stored response it continues
    dropped: bool = False  # ``json`` was dropped for a wait; ``parse_again`` restores it

    def drop_parsed(self) -> None:
        """Let go of the parsed body while the request waits holding no slot: it takes up to
        about 30 times the body's bytes, which the buffer budget counts (docs/reliability.md).
        ``body`` stays; it is the parsed form's source with every change made to it so far."""
        if self.json is not None:
            self.json = None
            self.dropped = True

    def parse_again(self) -> None:
        """The parsed body back, after a wait that dropped it."""
        if self.dropped:
            self.json = orjson.loads(self.body)
            self.dropped = False


def is_json_media_type(value: bytes) -> bool:
    """``application/json`` or a ``+json`` type, parameters aside (not any type containing
    "json")."""
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def is_multipart(value: bytes) -> bool:
    """``multipart/form-data`` with a boundary."""
    media, _, params = value.partition(b";")
    return media.strip().lower() == b"multipart/form-data" and b"boundary=" in params.lower()


def _number(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"'{key}' must be a number.", param=key)
    return float(value)


def _positive_int(obj: Mapping[str, Any], key: str, upper: int | None = None) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"'{key}' must be a positive integer.", param=key)
    if upper is not None and value > upper:
        raise InvalidRequest(f"'{key}' must be at most {upper}.", param=key)
    return value


def _bool(obj: Mapping[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be true or false.", param=key)
    return value


def _messages(obj: Mapping[str, Any], key: str = "messages") -> None:
    messages = obj.get(key)
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"'{key}' must be a non-empty list.", param=key)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"'{key}[{i}]' must be an object with a 'role'.", param=f"{key}[{i}]"
            )


def _sampling(obj: Mapping[str, Any]) -> None:
    _positive_int(obj, "n", MAX_N)
    temperature = _number(obj, "temperature")
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise InvalidRequest("'temperature' must be between 0 and 2.", param="temperature")
    top_p = _number(obj, "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidRequest("'top_p' must be greater than 0 and at most 1.", param="top_p")
    stream_options = obj.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")


def _requested(obj: Mapping[str, Any], *keys: str) -> int:
    """The first token budget given among ``keys`` (each checked), in the order vLLM reads them:
    chat's ``max_completion_tokens`` wins over ``max_tokens`` when both are given."""
    found = 0
    for key in keys:
        value = _positive_int(obj, key)
        if value is not None and not found:
            found = value
    return found


def _choices(obj: Mapping[str, Any]) -> int:
    """How many generations a request asks for: each choice of ``n`` has the whole budget (after
    ``_sampling`` checked ``n``)."""
    n = obj.get("n")
    return n if isinstance(n, int) else 1


def _prompts(prompt: Any) -> int:
    """How many prompts a completions ``prompt`` holds: a string or a list of token ids is one; a
    list of strings or of id lists is one each (vLLM runs each with the whole budget)."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def validate(route: Route, body: bytes, aliases: Mapping[str, str]) -> ValidRequest:
    """The request of ``route`` made of ``body``, or a 400 naming what is wrong."""
    if route.body is not Body.JSON:
        return ValidRequest(body=body, json=None, model=None, stream=False)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJSON() from None
    if not isinstance(obj, dict):
        raise InvalidRequest("The request body must be a JSON object.")

    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    path = route.name
    stream = _bool(obj, "stream") if path in _STREAMING else False
    requested = 0
    previous = None

    if path == CHAT:
        _messages(obj)
        requested = _requested(obj, "max_completion_tokens", "max_tokens")
        _sampling(obj)
        requested *= _choices(obj)
    elif path == COMPLETIONS:
        prompt = obj.get("prompt")
        if prompt is None or (isinstance(prompt, (str, list)) and not prompt):
            raise InvalidRequest("'prompt' must be a non-empty string or list.", param="prompt")
        if not isinstance(prompt, (str, list)):
            raise InvalidRequest("'prompt' must be a string or a list.", param="prompt")
        # Without one, vLLM's completions default to 16 tokens (its protocol's default).
        requested = _requested(obj, "max_tokens") or _COMPLETIONS_DEFAULT
        _sampling(obj)
        requested *= _choices(obj) * _prompts(prompt)
    elif path == RESPONSES_PATH:
        if obj.get("input") is None:
            raise InvalidRequest("'input' is required.", param="input")
        requested = _requested(obj, "max_output_tokens")
        _sampling(obj)
        _bool(obj, "background")
        _bool(obj, "store")
        previous = obj.get("previous_response_id")
        if previous is not None and (not isinstance(previous, str) or not previous):
            raise InvalidRequest(
                "'previous_response_id' must be a non-empty string.", param="previous_response_id"
            )
    elif path == MESSAGES:
        _messages(obj)
        requested = _requested(obj, "max_tokens")
        if not requested:
            raise InvalidRequest("'max_tokens' is required.", param="max_tokens")
        _sampling(obj)
    elif path == "/v1/messages/count_tokens":
        _messages(obj)
    elif path == "/v1/chat/completions/batch":
        conversations = obj.get("messages")
        if not isinstance(conversations, list) or not conversations:
            raise InvalidRequest(
                "'messages' must be a non-empty list of conversations.", param="messages"
            )
        for i, conversation in enumerate(conversations):
            if not isinstance(conversation, list) or not conversation:
                raise InvalidRequest(
                    f"'messages[{i}]' must be a non-empty list of messages.", param=f"messages[{i}]"
                )
        requested = _requested(obj, "max_completion_tokens", "max_tokens") * len(conversations)
        _sampling(obj)

    if isinstance(model, str) and model in aliases:
        model = aliases[model]
        obj["model"] = model
        body = orjson.dumps(obj)
    return ValidRequest(
        body=body,
        json=obj,
        model=model,
        stream=stream,
        requested_tokens=requested,
        previous_response_id=previous,
    )


def set_response_id(valid: ValidRequest, response_id: str) -> None:
    """Make ``response_id`` the id vLLM gives a Responses create (its ``request_id`` body field),
    in place of any the client sent. Without one sent, the field is put before the client's
    first one and the rest of the body stays as it came."""
    obj = valid.json
    assert obj is not None, "a Responses create has a JSON body"
    sent = "request_id" in obj
    obj["request_id"] = response_id
    if sent:
        valid.body = orjson.dumps(obj)
        return
    body = valid.body
    start = body.index(b"{") + 1  # only whitespace precedes it; ``input`` follows it
    valid.body = b'%s"request_id":"%s",%s' % (body[:start], response_id.encode(), body[start:])


def validate_body(path: str, body: bytes, aliases: Mapping[str, str]) -> ValidRequest:
    """``validate`` for the route at ``path`` (chat or completions, as tests and tools name them)."""
    found = match(path)
    if found is None:
        raise InvalidRequest(f"No route {path}.")
    return validate(found[0], body, aliases)
