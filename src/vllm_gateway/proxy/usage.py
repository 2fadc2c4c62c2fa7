"""Token counts from what the relay kept of a response, without parsing the whole body."""

from __future__ import annotations

from typing import Any

__all__ = ["parse_usage"]

_PROMPT_KEY = b'"prompt_tokens"'
_COMPLETION_KEY = b'"completion_tokens"'
# The Responses and Messages APIs name them so.
_INPUT_KEY = b'"input_tokens"'
_OUTPUT_KEY = b'"output_tokens"'
_WHITESPACE = b" \t\r\n"


def _int_after(data: bytes, key: bytes) -> int | None:
    """The integer value of the last ``key`` in ``data`` (a JSON fragment), if it has one."""
    at = data.rfind(key)
    if at < 0:
        return None
    rest = data[at + len(key) : at + len(key) + 32].lstrip(_WHITESPACE)
    if not rest.startswith(b":"):
        return None
    rest = rest[1:].lstrip(_WHITESPACE)
    n = 0
    while n < len(rest) and 48 <= rest[n] <= 57:
        n += 1
    return int(rest[:n]) if n else None


def parse_usage(usage: Any) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens from what the relay kept of the response, if it says.

    Accepts a ``usage`` dict, or bytes holding the last SSE event(s), a whole JSON body or a bare
    usage object: the last ``"prompt_tokens"`` and ``"completion_tokens"`` keys are read with
    ``rfind``, not a JSON parse of the whole body.
    """
    if usage is None:
        return None, None
    if isinstance(usage, dict):
        inner = usage.get("usage", usage)
        if not isinstance(inner, dict):
            return None, None
        p = inner.get("prompt_tokens", inner.get("input_tokens"))
        c = inner.get("completion_tokens", inner.get("output_tokens"))
        return (p if isinstance(p, int) else None, c if isinstance(c, int) else None)
    if not isinstance(usage, (bytes, bytearray, memoryview)):
        return None, None
    data = usage if isinstance(usage, bytes) else bytes(usage)
    # The last occurrence is the usage object: in a stream it is the final event, and in a body
    # it follows the choices (whose text cannot contain an unescaped quote-delimited key).
    prompt, completion = _int_after(data, _PROMPT_KEY), _int_after(data, _COMPLETION_KEY)
    if prompt is None and completion is None:
        prompt, completion = _int_after(data, _INPUT_KEY), _int_after(data, _OUTPUT_KEY)
    return prompt, completion
