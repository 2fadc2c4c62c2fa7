"""The composition root: the one place the parts are wired together.

``create_app(settings)`` builds the backend (``backends.factory``), the per-process ``Gateway``
state, the FastAPI app of the routes off the hot path with observability installed on it, and the
front door the HTTP server calls. The runtime (``runtime.server``) serves what it returns.
"""

from __future__ import annotations

from vllm_gateway.backends.base import Backend
from vllm_gateway.backends.factory import build_backend
from vllm_gateway.edge.api import create_api
from vllm_gateway.edge.frontdoor import GatewayApp
from vllm_gateway.edge.openapi import install_openapi
from vllm_gateway.observability.observer import install_observability
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.shared_admission import RemoteAdmission
from vllm_gateway.settings import Settings

__all__ = ["create_app"]


def create_app(
    settings: Settings,
    backend: Backend | None = None,
    admission: RemoteAdmission | None = None,
) -> GatewayApp:
    """The gateway; ``admission`` is the supervisor's shared one when this process is a worker."""
    gateway = Gateway(
        settings, backend if backend is not None else build_backend(settings), admission
    )
    api = create_api(gateway)
    app = GatewayApp(gateway, api)
    install_observability(api, gateway, app.server_stats, app.budget)
    install_openapi(api)
    return app
