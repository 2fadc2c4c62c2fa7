"""Turn a raw request body into a ``ValidRequest``, or a 400 that names the field.

Only what the gateway must know, or must refuse, is checked here; every other field is left for
the backend to judge, and the body is forwarded byte for byte unless a model alias rewrites it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from vllm_gateway.errors import InvalidJSON, InvalidRequest
from vllm_gateway.proxy.routes import CHAT, COMPLETIONS

__all__ = ["ValidRequest", "is_json_media_type", "validate_body"]

# Largest n the gateway forwards: each choice is a full generation on the engine.
MAX_N = 16


@dataclass(frozen=True, slots=True)
class ValidRequest:
    body: bytes
    json: dict[str, Any]
    model: str | None
    stream: bool
    requested_tokens: int = 0  # max_tokens (or max_completion_tokens) when given


def is_json_media_type(value: bytes) -> bool:
    """``application/json`` or a ``+json`` type, parameters aside (not any type containing
    "json")."""
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


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


def validate_body(path: str, body: bytes, aliases: Mapping[str, str]) -> ValidRequest:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJSON() from None
    if not isinstance(obj, dict):
        raise InvalidRequest("The request body must be a JSON object.")

    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("'model' must be a non-empty string.", param="model")

    stream = obj.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false.", param="stream")

    if path == CHAT:
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty list.", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(
                    f"'messages[{i}]' must be an object with a 'role'.", param=f"messages[{i}]"
                )
    elif path == COMPLETIONS:
        prompt = obj.get("prompt")
        if prompt is None or (isinstance(prompt, (str, list)) and not prompt):
            raise InvalidRequest("'prompt' must be a non-empty string or list.", param="prompt")
        if not isinstance(prompt, (str, list)):
            raise InvalidRequest("'prompt' must be a string or a list.", param="prompt")

    requested = _positive_int(obj, "max_tokens") or _positive_int(obj, "max_completion_tokens") or 0
    if requested == 0:
        _positive_int(obj, "max_completion_tokens")
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

    if isinstance(model, str) and model in aliases:
        model = aliases[model]
        obj["model"] = model
        body = orjson.dumps(obj)
    return ValidRequest(body=body, json=obj, model=model, stream=stream, requested_tokens=requested)
