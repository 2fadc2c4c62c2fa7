"""The backend's model list, cached, so that a request naming an unknown model gets 404 without
reaching the backend, and a request naming a known one pays nothing for the check.

- ``known(model)`` answers from the cache with no await (the hot path); a stale list still counts
  and is refreshed in the background.
- ``check(model)`` is for a model the cache does not have: it joins the one fetch in flight
  (single flight: however many requests ask, the backend gets one ``/v1/models`` at a time) and
  waits for it at most ``check_timeout``. It answers True or False when the list says, and None
  when the list cannot be had in time: the request then goes on and the backend judges the model.
  Nothing here ever makes one request wait for another.
- ``prefetch()`` starts the first fetch when the gateway starts, without waiting for it.
- A fetch is bounded by ``fetch_timeout``; a list that failed to come is asked for again at most
  once a second, and a model missing from a fresh list is not asked about again for a second.
- ``served()`` names the models served, for a 404's message: bounded (at most ``NAMED`` names,
  each cut to ``NAME_CHARS``), so a backend with a long list does not make long answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

__all__ = ["ModelCatalog"]

log = logging.getLogger("vllm_gateway.proxy.catalog")

# How long a model list stays fresh.
TTL = 10.0
# The least time between two fetches.
MIN_INTERVAL = 1.0
# A 404's message names at most this many served models, each cut to this many characters.
NAMED = 20
NAME_CHARS = 64


def _clip(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


class ModelCatalog:
    def __init__(
        self,
        fetch: Callable[[float], Awaitable[list[str] | None]],
        check_timeout: float,
        fetch_timeout: float,
    ) -> None:
        self._fetch = fetch
        self.check_timeout = check_timeout
        self.fetch_timeout = fetch_timeout
        self.ids: frozenset[str] | None = None
        self.listed: list[str] | None = None
        self._fetched_at = -1e9  # when the last fetch ended (monotonic), answered or not
        self._inflight: asyncio.Task[None] | None = None
        # Outcomes of ``check`` for the metrics: found, unknown (404), timeout (forwarded
        # unchecked), unavailable (no list: forwarded unchecked).
        self.checks: dict[str, int] = {"found": 0, "unknown": 0, "timeout": 0, "unavailable": 0}

    def known(self, model: str) -> bool:
        """True when the cached list has ``model`` (no await). False means "ask ``check``"."""
        ids = self.ids
        if ids is None or model not in ids:
            return False
        if time.monotonic() - self._fetched_at >= TTL:
            self._refresh()
        return True

    async def check(self, model: str) -> bool | None:
        """Whether the backend serves ``model``: True, False, or None when it cannot tell in time."""
        if self.known(model):
            return True
        task: asyncio.Task[None] | None = self._inflight
        if time.monotonic() - self._fetched_at >= MIN_INTERVAL:
            task = self._refresh()
        if task is not None:
            try:
                async with asyncio.timeout(self.check_timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                self.checks["timeout"] += 1
                return None
        ids = self.ids
        if ids is None:
            self.checks["unavailable"] += 1
            return None
        found = model in ids
        self.checks["found" if found else "unknown"] += 1
        return found

    def served(self, aliases: Mapping[str, str] | None = None) -> str:
        """What the backend serves, as a sentence for a model_not_found answer: the listed names
        in the backend's order, then the aliases that name one of them; "" without a list."""
        listed, ids = self.listed, self.ids
        if not listed or ids is None:
            return ""
        names = list(listed)
        if aliases:
            names += [
                alias for alias, target in aliases.items() if target in ids and alias not in ids
            ]
        shown = ", ".join(f"'{_clip(name)}'" for name in names[:NAMED])
        more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
        return f"Served: {shown}{more} (GET /v1/models lists them)."

    def prefetch(self) -> None:
        """Ask for the list now, in the background (at start): the first requests then find their
        model known instead of waiting for the list, and keep the admission place they took."""
        self._refresh()

    def _refresh(self) -> asyncio.Task[None]:
        """The fetch in flight, or a new one."""
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.get_running_loop().create_task(
                self._run_fetch(), name="models-refresh"
            )
        return task

    async def _run_fetch(self) -> None:
        try:
            ids = await self._fetch(self.fetch_timeout)
        except Exception:
            log.exception("fetching the backend's model list failed")
            ids = None
        finally:
            self._fetched_at = time.monotonic()
            self._inflight = None
        if ids is not None:
            self.listed = ids
            self.ids = frozenset(ids)

    async def aclose(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
