"""The one place a ``Backend`` is built from settings: a single vLLM server, a pool of them, or the
embedded engine."""

from __future__ import annotations

from vllm_gateway.backends.base import Backend
from vllm_gateway.backends.http.backend import HTTPBackend
from vllm_gateway.settings import Settings

__all__ = ["build_backend"]


def build_backend(settings: Settings) -> Backend:
    if settings.use_embedded_engine:
        # vLLM is imported only when asked for.
        from vllm_gateway.backends.embedded.engine import EmbeddedBackend
        from vllm_gateway.backends.embedded.model import prepare_default_model

        model = settings.model or str(prepare_default_model())
        return EmbeddedBackend(
            model=model, served_model_names=None, extra_args=settings.engine_args
        )
    if len(settings.backend_urls) > 1 or settings.backends_file or settings.backend_discovery:
        from vllm_gateway.backends.pool.backend import PoolBackend

        return PoolBackend(settings)
    return HTTPBackend.from_settings(settings, settings.backend_urls[0])
