"""The gateway's shared state: settings, admission, backend, drain, and the requests in flight.

One ``Gateway`` per worker process, made by the app factory and started in its lifespan. Routes
read it; nothing else holds global state. ``drain()`` is the one shutdown path: stop admitting,
fail the queue, let in-flight requests finish until the deadline, then end the rest with an error.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

from .admission import Admission
from .backend import Backend
from .models import ModelCatalog
from .settings import Settings

if TYPE_CHECKING:
    from .observe import RejectedCall
    from .ratelimit import RateLimiter
    from .relay import ProxyCall

__all__ = ["Gateway", "RequestObserver", "build_backend"]

log = logging.getLogger("vllm_gateway")


class RequestObserver(Protocol):
    """Told about every proxied request when it ends (metrics, logs)."""

    def request_ended(self, call: ProxyCall | RejectedCall) -> None: ...


def build_backend(settings: Settings) -> Backend:
    if settings.use_embedded_engine:
        from .embedded import EmbeddedBackend  # vLLM is imported only when asked for

        model = settings.model or _default_model()
        return EmbeddedBackend(
            model=model, served_model_names=None, extra_args=settings.engine_args
        )
    from .http_backend import HTTPBackend

    if len(settings.backend_urls) > 1 or settings.backends_file:
        from .pool import PoolBackend

        return PoolBackend(settings)
    if settings.http_client == "fast":
        from .upstream import FastHTTPBackend

        return FastHTTPBackend(
            settings.backend_urls[0],
            connect_timeout=settings.connect_timeout,
            api_key=settings.backend_api_key,
            idle_timeout=settings.upstream_idle_timeout,
        )
    return HTTPBackend(
        settings.backend_urls[0],
        connect_timeout=settings.connect_timeout,
        api_key=settings.backend_api_key,
    )


def _default_model() -> str:
    from .model_prep import prepare_default_model  # converts the default model on first use

    return str(prepare_default_model())


class Gateway:
    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend if backend is not None else build_backend(settings)
        self.admission = Admission(
            settings.max_concurrent_requests,
            settings.max_queued_requests,
            settings.queue_wait_timeout,
        )
        self.ratelimiter: RateLimiter | None = None
        if settings.rate_limit_rpm or settings.rate_limit_tpm:
            from .ratelimit import RateLimiter

            self.ratelimiter = RateLimiter(
                settings.rate_limit_rpm, settings.rate_limit_tpm, redis_url=settings.redis_url
            )
        self.draining = False
        self.active: set[ProxyCall] = set()
        self.observers: list[RequestObserver] = []
        self.started_at = time.time()
        self.models = ModelCatalog(
            self.backend.model_ids,
            check_timeout=settings.model_check_timeout,
            fetch_timeout=max(settings.model_check_timeout, settings.connect_timeout),
        )

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.backend.start()
        if self.ratelimiter is not None:
            await self.ratelimiter.start()

    async def aclose(self) -> None:
        await self.models.aclose()
        await self.backend.aclose()
        if self.ratelimiter is not None:
            await self.ratelimiter.aclose()

    async def charge_tokens(self, call: ProxyCall) -> None:
        """Charge a finished request's real token count against its tenant's token limit
        (``acquire`` charged its max_tokens up front; this settles the difference)."""
        from .observe import parse_usage

        if self.ratelimiter is None or not self.settings.rate_limit_tpm or call.usage is None:
            return
        prompt, completion = parse_usage(call.usage)
        if prompt is None and completion is None:
            return
        used = (prompt or 0) + (completion or 0)
        try:
            await self.ratelimiter.record_tokens(call.rate_key, used - call.requested_tokens)
        except Exception:  # a limiter problem must never fail a finished request
            log.exception("charging tokens for request %s failed", call.request_id)

    async def drain(self, deadline: float | None = None) -> None:
        """Stop admitting, fail the queue, wait for in-flight requests, then end the rest."""
        timeout = self.settings.shutdown_timeout if deadline is None else deadline
        self.draining = True
        self.admission.close()
        log.info("draining: %d in flight, up to %.0f s", self.admission.in_flight, timeout)
        if await self.admission.wait_idle(timeout):
            log.info("drained: nothing in flight")
            return
        log.warning("drain deadline reached: ending %d request(s) with an error", len(self.active))
        for call in list(self.active):
            call.cancel("shutdown")
        await self.admission.wait_idle(2.0)

    # --- readiness and models --------------------------------------------------------------

    async def ready(self) -> bool:
        if self.draining:
            return False
        return await self.backend.check_health(min(2.0, self.settings.connect_timeout))

    # --- observation -----------------------------------------------------------------------

    def request_ended(self, call: ProxyCall | RejectedCall) -> None:
        for observer in self.observers:
            try:
                observer.request_ended(call)
            except Exception:  # an observer must never break a request
                log.exception("request observer failed")
