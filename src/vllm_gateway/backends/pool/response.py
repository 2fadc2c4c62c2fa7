"""A response the pool makes itself: ``BytesResponse``, a whole body in memory.

The merged model list and the admin fan-out's answer. Invariants: ``read`` honours its limit and
charges the body once per call; ``aclose`` has nothing to release.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from vllm_gateway.backends.base import Charge, UpstreamResponse
from vllm_gateway.errors import BadBackendResponse

__all__ = ["BytesResponse"]


class BytesResponse(UpstreamResponse):
    """A response the pool made itself (the merged model list, the admin fan-out's answer)."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        self.status = status
        self.content_type = content_type
        self._body = body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    async def read(self, limit: int, charge: Charge | None = None) -> bytes:
        if len(self._body) > limit:
            raise BadBackendResponse("The backend's response is too large.")
        if charge is not None:
            charge(len(self._body))
        return self._body

    async def aclose(self) -> None:
        pass
