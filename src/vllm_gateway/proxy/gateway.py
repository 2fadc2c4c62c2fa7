"""The gateway's shared state: settings, admission, backend, drain, and the requests in flight.

One ``Gateway`` per worker process, made by the composition root (``compose.py``), whose lifecycle
also starts and stops the parts it holds (the backend, the rate limiter, the model list). Routes
read it; nothing else holds global state. ``drain()`` is the one shutdown path: stop admitting,
fail the queue, let in-flight requests finish until the deadline, then end the rest with an error.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from vllm_gateway.backends.base import Backend
from vllm_gateway.ids import ResponseIds
from vllm_gateway.proxy.admission import Admission
from vllm_gateway.proxy.catalog import ModelCatalog
from vllm_gateway.proxy.ratelimit import RateLimiter
from vllm_gateway.proxy.record import CallRecord
from vllm_gateway.proxy.resume.redis_store import RedisStore
from vllm_gateway.proxy.resume.store import LocalStore, Store
from vllm_gateway.proxy.shared_admission import RemoteAdmission
from vllm_gateway.settings import Settings

__all__ = ["Gateway", "InFlight", "RequestObserver"]

log = logging.getLogger("vllm_gateway")


class RequestObserver(Protocol):
    """Told about every request when it ends (metrics, logs, tracing)."""

    def request_ended(self, call: CallRecord) -> None: ...


class InFlight(Protocol):
    """A request in flight (``ProxyCall``): the drain can end it, the status page counts its
    events."""

    chunks: int

    def cancel(self, reason: str) -> None: ...


class Gateway:
    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        admission: Admission | RemoteAdmission | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        # One process: its own admission. A worker of several: the supervisor's, shared.
        self.admission: Admission | RemoteAdmission = admission or Admission(
            settings.max_concurrent_requests,
            settings.max_queued_requests,
            settings.queue_wait_timeout,
            shed=settings.shed_low_priority,
        )
        self.ratelimiter: RateLimiter | None = None
        if settings.rate_limit_rpm or settings.rate_limit_tpm:
            self.ratelimiter = RateLimiter(
                settings.rate_limit_rpm, settings.rate_limit_tpm, redis_url=settings.redis_url
            )
        # Who owns each stored response: its id says (ids.py).
        self.response_ids = ResponseIds(settings.api_keys, settings.response_id_secret)
        # Results kept for retries with an Idempotency-Key (proxy/resume/); None: turned off.
        self.resume: Store | None = None
        if settings.idempotency_budget_bytes and settings.redis_url:
            self.resume = RedisStore(
                settings.redis_url,
                settings.idempotency_budget_bytes,
                settings.idempotency_grace,
                settings.request_timeout + settings.first_token_timeout,
            )
        elif settings.idempotency_budget_bytes:
            self.resume = LocalStore(settings.idempotency_budget_bytes, settings.idempotency_grace)
        self.draining = False
        self.active: set[InFlight] = set()
        self.observers: list[RequestObserver] = []
        self.started_at = time.time()
        self.models = ModelCatalog(
            self.backend.model_ids,
            check_timeout=settings.model_check_timeout,
            fetch_timeout=max(settings.model_check_timeout, settings.connect_timeout),
        )

    # --- shutdown --------------------------------------------------------------------------

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

    # --- observation -----------------------------------------------------------------------

    def request_ended(self, call: CallRecord) -> None:
        for observer in self.observers:
            try:
                observer.request_ended(call)
            except Exception:  # an observer must never break a request
                log.exception("request observer failed")
