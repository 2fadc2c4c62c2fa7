"""The pool's two responses: a member's (``PoolResponse``) and one the pool made (``BytesResponse``).

``PoolResponse`` wraps the response of the member that ``Retries.open`` found, and may swap it for
another member's until its first chunk has been handed over: a member that drops the connection or
is ejected before its first byte is retried on another (``_first``), and so is one that drops
anywhere in a non-streamed body (``read``: the relay forwards such a body only once it is whole).
The swapped-in answer must have the same status and content type, else ``BadBackendResponse``.
After the first chunk a failure ends the stream (a drop is counted against the member); a member
ejected mid-stream has its connection closed at once (``abandon``) so that the stream fails now
and may fail over.

Invariants: the response is in its member's ``streams`` set exactly while it holds that member's
slot, and the slot is given back exactly once: in ``_swap`` for a member left behind, else in
``aclose`` (``member`` is set to None first, so a second ``aclose`` does nothing). Per chunk it does
no more than read the member's chunk and note the member's progress.

``BytesResponse`` is a whole body in memory: the merged model list and the admin fan-out's answer.
Its ``read`` honours the limit like a member's; its ``aclose`` has nothing to release.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from vllm_gateway.backends.base import Charge, UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.retry import Ejected, Retries
from vllm_gateway.errors import BackendUnavailable, BadBackendResponse, UpstreamError

__all__ = ["BytesResponse", "PoolResponse"]


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


class PoolResponse(UpstreamResponse):
    """A member's response; before its first byte it may be swapped for another member's."""

    def __init__(
        self,
        retries: Retries,
        request: UpstreamRequest,
        member: Member,
        resp: UpstreamResponse,
        tried: list[Member],
    ) -> None:
        self._retries = retries
        self._request = request
        self._member: Member | None = member
        self.served_by = member.name
        self._resp = resp
        self._iter: AsyncIterator[bytes] = resp.chunks()
        self._tried = tried
        self._delivered = False
        self._closed = False
        self._ejected = False
        self.status = resp.status
        self.content_type = resp.content_type
        member.streams.add(self)

    def chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> PoolResponse:
        return self

    async def __anext__(self) -> bytes:
        member = self._member
        assert member is not None, "PoolResponse read after a failed retry"
        if not self._delivered:
            return await self._first()
        try:
            data = await anext(self._iter)
        except StopAsyncIteration:
            if self._ejected:
                raise BackendUnavailable("The backend was taken out of the pool.") from None
            self._ended(member)
            raise
        except UpstreamError:
            if self._ejected:
                raise BackendUnavailable("The backend was taken out of the pool.") from None
            self._retries.fleet.fail(member, "dropped")
            raise
        member.progress()
        return data

    def abandon(self) -> None:
        """The member was taken out of the pool mid-stream: drop its connection now, so that the
        stream fails at once (and may go on on another member) rather than when it stalls."""
        if self._closed or not self._delivered:
            return
        self._ejected = True
        asyncio.get_running_loop().create_task(self._resp.aclose())

    async def _first(self) -> bytes:
        retries = self._retries
        while True:
            member = self._member
            assert member is not None
            try:
                data = await retries.guarded(member, anext(self._iter))
            except StopAsyncIteration:
                self._ended(member)
                raise
            except (UpstreamError, Ejected) as exc:
                if isinstance(exc, UpstreamError):
                    retries.fleet.fail(member, "dropped")
                if not retries.may_retry(self._request, [*self._tried, member]):
                    if isinstance(exc, UpstreamError):
                        raise
                    raise BackendUnavailable("The backend was taken out of the pool.") from None
                self._tried.append(member)
                await self._swap()
                continue
            self._delivered = True
            member.progress()
            return data

    async def _swap(self) -> None:
        """Close this member's response and open the same request on another member."""
        old = self._member
        self._member = None
        await self._resp.aclose()
        if old is not None:
            old.streams.discard(self)
            self._retries.acquirer.release(old)
        member, resp = await self._retries.open(self._request, self._tried)
        self._member, self._resp, self._iter = member, resp, resp.chunks()
        member.streams.add(self)
        self.served_by = member.name
        if (
            resp.status != self.status
            or resp.content_type.split(";")[0] != self.content_type.split(";")[0]
        ):
            raise BadBackendResponse("The retried backend answered differently.")

    def _ended(self, member: Member) -> None:
        if self.status < 500:
            member.success()

    async def read(self, limit: int, charge: Charge | None = None) -> bytes:
        """The whole body. Nothing of it reaches the relay before it is complete, so a member that
        drops mid-body is retried on another one, like a drop before the first byte. (What a
        dropped attempt was charged stays charged until the request ends: bounded by the
        retries.)"""
        while True:
            parts: list[bytes] = []
            size = 0
            try:
                async for data in self:
                    size += len(data)
                    if size > limit:
                        break
                    if charge is not None:
                        charge(len(data))
                    parts.append(data)
                else:
                    return b"".join(parts)
            except UpstreamError:
                member = self._member
                if member is None or not self._retries.may_retry(
                    self._request, [*self._tried, member]
                ):
                    raise
                self._tried.append(member)
                await self._swap()
                self._delivered = False
                continue
            raise BadBackendResponse("The backend's response is too large.")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        member, self._member = self._member, None
        try:
            await self._resp.aclose()
        finally:
            if member is not None:
                member.streams.discard(self)
                self._retries.acquirer.release(member)
