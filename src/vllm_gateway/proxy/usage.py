"""Token counts: from what the relay kept of a response, without parsing the whole body; and, for
a chat or completions stream whose client did not ask for them, from a usage chunk the gateway asks
vLLM for and takes out of the stream again.

Why the taking out is more than dropping one event: vLLM stamps its ``system_fingerprint`` on each
choice's last chunk (the one with a ``finish_reason``) only when no usage chunk follows; with one,
the fingerprint moves to the usage chunk. ``UsageTaker`` therefore holds the events from the first
chunk with a ``finish_reason`` on until the usage chunk (the last event before ``[DONE]``) comes,
gives those chunks the fingerprint back, and lets them go: the client's bytes are what vLLM would
have sent it without the ask. The hold lasts from a stream's last token to its end (vLLM writes the
two back to back); an ``n`` > 1 stream's other choices wait from the first choice's end.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["UsageTaker", "ask_for_usage", "asks_for_usage", "parse_usage"]

_PROMPT_KEY = b'"prompt_tokens"'
_COMPLETION_KEY = b'"completion_tokens"'
# The Responses and Messages APIs name them so.
_INPUT_KEY = b'"input_tokens"'
_OUTPUT_KEY = b'"output_tokens"'
# The Messages API counts a cached prompt's tokens apart from ``input_tokens`` (vLLM with prompt
# token details on); the prompt is the three together.
_CACHE_KEYS = (b'"cache_read_input_tokens"', b'"cache_creation_input_tokens"')
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
        p = inner.get("prompt_tokens")
        if p is None:
            p = inner.get("input_tokens")
            if isinstance(p, int):
                for key in ("cache_read_input_tokens", "cache_creation_input_tokens"):
                    cached = inner.get(key)
                    p += cached if isinstance(cached, int) else 0
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
        if prompt is not None:
            prompt += sum(_int_after(data, key) or 0 for key in _CACHE_KEYS)
    return prompt, completion


# Values of ``include_usage`` that vLLM (pydantic, lax) reads as false. Anything else the client
# sends counts as asking: the gateway never takes out a usage chunk the client would have had.
_FALSE_STRINGS = frozenset({"0", "off", "f", "false", "n", "no"})


def asks_for_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed chat or completions request asks for the usage chunk itself."""
    options = body.get("stream_options")
    if not isinstance(options, dict) or "include_usage" not in options:
        return False
    value = options["include_usage"]
    if isinstance(value, str):
        return value.lower() not in _FALSE_STRINGS
    return value not in (None, False, 0)


def ask_for_usage(raw: bytes, body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The request (raw and parsed) with ``stream_options.include_usage`` on, for a client that
    did not ask: a body without ``stream_options`` gets the field inserted first (forwarded byte
    for byte otherwise); one with its own is re-serialised with ``include_usage`` on and
    ``continuous_usage_stats`` off (else every chunk would carry usage). ``body`` is not changed."""
    options = body.get("stream_options")
    if "stream_options" not in body:
        start = raw.index(b"{") + 1
        sep = b"" if raw[start:].lstrip().startswith(b"}") else b","
        ours = b'"stream_options":{"include_usage":true}'
        return raw[:start] + ours + sep + raw[start:], {
            "stream_options": {"include_usage": True},
            **body,
        }
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    if "continuous_usage_stats" in merged:
        merged["continuous_usage_stats"] = False
    asked = {**body, "stream_options": merged}
    return orjson.dumps(asked), asked


_FINISH_KEY = b'"finish_reason":'  # a key: never inside a JSON string, whose quotes are escaped
_FINISHED = _FINISH_KEY + b'"'  # a finish reason that is not null: a choice's last chunk
_QUOTE = ord('"')
_USAGE = b'"usage"'
_FINGERPRINT = b'"system_fingerprint"'


def _usage_chunk(event: bytes) -> dict[str, Any] | None:
    """The chunk's object when ``event`` is the usage chunk (no choices, a usage object)."""
    if _USAGE not in event or not event.startswith(b"data:"):
        return None
    try:
        obj = orjson.loads(event[5:])
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
        return obj
    return None


class UsageTaker:
    """Takes the usage chunk out of one stream (see the module's docstring). ``take`` is given
    each read's events (whole events, as ``split_events`` gives them) and returns those to send
    now; ``release`` gives back whatever it still holds (the stream failed: they go out before
    its error, as they would have). ``usage`` is the chunk taken, once it came."""

    __slots__ = ("held", "usage")

    def __init__(self) -> None:
        self.held: list[bytes] | None = None  # events from the first finished chunk on
        self.usage: bytes | None = None

    def concerns(self, block: bytes, events: list[bytes], done: bool) -> bool:
        """Whether ``take`` may change ``events`` (the events of ``block``), else they pass as they
        are: one search from the end of the read per read, nothing per event, until a choice has
        finished. A chunk's ``finish_reason`` is among its last fields, so the search back finds
        the last event's at once; a read of several events (``n`` > 1, or reads run together)
        is searched whole. The usage chunk comes after the finished chunks (or in the read that
        ends the stream), so it needs no search of its own."""
        if done or self.held is not None:
            return True
        at = block.rfind(_FINISH_KEY)
        if at < 0:
            return False
        return block[at + len(_FINISH_KEY)] == _QUOTE or (len(events) > 1 and _FINISHED in block)

    def take(self, events: list[bytes], done: bool) -> list[bytes]:
        """``done``: the last of ``events`` ends the stream (everything held goes out)."""
        held = self.held
        out: list[bytes] = []
        for event in events:
            if held is None:
                if _FINISHED in event:
                    held = [event]
                elif self.usage is None and (obj := _usage_chunk(event)) is not None:
                    self.usage = event  # a usage chunk with no finished chunk before it
                else:
                    out.append(event)
                continue
            if self.usage is None and (obj := _usage_chunk(event)) is not None:
                self.usage = event
                out += _stamped(held, obj.get("system_fingerprint"))
                held = None
                continue
            held.append(event)
        if done and held is not None:
            out += held
            held = None
        self.held = held
        return out

    def release(self) -> list[bytes]:
        held, self.held = self.held, None
        return held or []


def _stamped(events: list[bytes], fingerprint: Any) -> list[bytes]:
    """``events`` with ``fingerprint`` on each finished chunk, where vLLM puts it without a usage
    chunk: the chunk's last field (``..."choices":[...],"system_fingerprint":"..."}``)."""
    if not isinstance(fingerprint, str):
        return events
    field = b',"system_fingerprint":' + orjson.dumps(fingerprint) + b"}"
    return [
        e[:-1] + field
        if _FINISHED in e and e.endswith(b"}") and _FINGERPRINT not in e and e.startswith(b"data:")
        else e
        for e in events
    ]
