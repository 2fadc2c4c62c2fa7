"""The bytes of vLLM 0.32's ``/v1/audio/transcriptions`` and ``/v1/audio/translations``. No I/O.

From vLLM's speech-to-text serving code (no speech model could be run here, so the shapes were
produced by its own pydantic models): a stream is chat-like ``data:`` chunks,
``TranscriptionStreamResponse.model_dump_json(exclude_unset=True)`` (``object``
``transcription.chunk`` or ``translation.chunk``; ``choices[0]`` holds only ``delta`` until the last
one, which adds ``finish_reason`` and ``stop_reason``), the usage chunk when
``stream_include_usage`` is set, then ``data: [DONE]``. The whole answer is JSON for both
``json`` and ``text`` formats: ``{"text", "usage": {"type": "duration", "seconds"}}`` for a
transcription, ``{"text"}`` for a translation.
"""

from __future__ import annotations

from typing import Any

import orjson

from vllm_gateway_tools.simulator.render import DONE, Script, output_text, token_text

__all__ = ["AudioScript"]


class AudioScript(Script):
    """One transcription (``translate`` false) or translation request."""

    def __init__(self, *, stream: bool, translate: bool, include_usage: bool, seconds: int,
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(**kw)
        self.stream = stream
        self.translate = translate
        self.include_usage = include_usage
        self.seconds = seconds
        obj = b"translation.chunk" if translate else b"transcription.chunk"
        self._head = b'data: {"id":%b,"object":"%b","created":%d,"model":%b,"choices":[' % (
            orjson.dumps(self.request_id),
            obj,
            self.created,
            orjson.dumps(self.model),
        )

    def token(self, i: int, last: bool) -> bytes:
        return self._chunk(token_text(i), last)

    def _chunk(self, text: str, last: bool) -> bytes:
        tail = (
            b"}"
            if not last
            else b',"finish_reason":"%b","stop_reason":null}' % self.finish.encode()
        )
        return self._head + b'{"delta":{"content":' + orjson.dumps(text) + b"}" + tail + b"]}\n\n"

    def cut_short(self) -> list[bytes]:
        return [self._chunk("", True)]

    def closing(self) -> list[bytes]:
        if not self.include_usage:
            return [DONE]
        usage = b'],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n' % (
            self.prompt_tokens,
            self.prompt_tokens + self.n,
            self.n,
        )
        return [self._head + usage, DONE]

    def whole(self) -> bytes:
        body: dict[str, Any] = {"text": output_text(self.n)}
        if not self.translate:
            body["usage"] = {"type": "duration", "seconds": self.seconds}
        return orjson.dumps(body)
