"""The responses of the embedded engine: vLLM's own serving results adapted to ``UpstreamResponse``.

vLLM's serving layer returns either a pydantic model (a completion, or an ``ErrorResponse``) or an
async generator of SSE strings. ``JSONUpstreamResponse`` carries the first as the exact bytes vLLM's
server would send (Starlette's ``JSONResponse`` rendering of ``model_dump()``); ``SSEUpstreamResponse``
relays the second string by string, encoded, without parsing.

Invariants:
- ``aclose()`` is idempotent. On a stream that has not ended it closes vLLM's generator (vLLM's own
  abort path: ``AsyncLLM.generate`` aborts on ``GeneratorExit``) and then aborts the request id in
  the engine explicitly, which is a no-op when the first step already did it. The explicit abort
  covers the case where the generator cannot be closed because another task is inside it.
- Failures of the engine itself become ``errors.UpstreamError`` here; request errors stay what vLLM
  made of them (an SSE ``error`` event inside the stream, or an ``ErrorResponse`` body).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from vllm_gateway import errors
from vllm_gateway.backends.base import Charge, UpstreamResponse, read_capped

__all__ = ["JSONUpstreamResponse", "SSEUpstreamResponse", "is_engine_dead"]

log = logging.getLogger(__name__)

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"  # what Starlette sends for vLLM's streams
JSON_CONTENT_TYPE = "application/json"


def is_engine_dead(exc: BaseException) -> bool:
    """True for vLLM's ``EngineDeadError`` (checked by name: vLLM is imported lazily)."""
    return any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__)


class JSONUpstreamResponse(UpstreamResponse):
    """A whole JSON body, already rendered; nothing to abort."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.content_type = JSON_CONTENT_TYPE
        self._body = body
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        if not self._closed:
            yield self._body

    async def read(self, limit: int, charge: Charge | None = None) -> bytes:
        if len(self._body) > limit:
            raise errors.BadBackendResponse(f"The backend response is larger than {limit} bytes.")
        if charge is not None:
            charge(len(self._body))
        return self._body

    async def aclose(self) -> None:
        self._closed = True


class SSEUpstreamResponse(UpstreamResponse):
    """A stream of SSE strings from vLLM's serving layer, relayed as bytes in vLLM's framing."""

    def __init__(
        self,
        generator: AsyncGenerator[str, None],
        request_id: str | None,
        abort: Callable[[str], Awaitable[Any]],
    ) -> None:
        self.status = 200
        self.content_type = SSE_CONTENT_TYPE
        self._generator = generator
        self._request_id = request_id
        self._abort: Callable[[str], Awaitable[Any]] | None = abort
        self._ended = False
        self._closed = False

    @property
    def ended(self) -> bool:
        """True once vLLM's generator has run to its end (``data: [DONE]`` or an error event)."""
        return self._ended

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._closed:
            return
        try:
            async for piece in self._generator:
                yield piece.encode()
        except Exception as exc:
            # vLLM's generators turn request errors into SSE error events themselves; what escapes
            # is the engine failing under us.
            self._ended = True
            if is_engine_dead(exc):
                raise errors.BackendUnavailable("The embedded engine has stopped.") from exc
            log.exception("embedded engine stream failed (request %s)", self._request_id)
            raise errors.BadBackendResponse(
                "The embedded engine failed during the stream."
            ) from exc
        self._ended = True

    async def read(self, limit: int, charge: Charge | None = None) -> bytes:
        return await read_capped(self.chunks(), limit, charge=charge)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        abort, self._abort = self._abort, None  # hold no reference to the engine once closed
        if self._ended:
            return
        # vLLM's own abort path first: GeneratorExit inside AsyncLLM.generate aborts the request.
        # A generator another task is still inside cannot be closed (RuntimeError); the explicit
        # abort below covers it.
        try:
            await self._generator.aclose()
        except RuntimeError:
            pass
        except Exception as exc:
            log.warning("closing the stream of request %s failed: %r", self._request_id, exc)
        if self._request_id is not None and abort is not None:
            try:
                await abort(self._request_id)
            except Exception as exc:
                if not is_engine_dead(exc):
                    log.warning("abort of request %s failed: %r", self._request_id, exc)
