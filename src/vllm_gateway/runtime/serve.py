"""``serve(settings)``: the gateway as configured, in this process or in N worker processes."""

from __future__ import annotations

from vllm_gateway.compose import create_app
from vllm_gateway.runtime.server import run
from vllm_gateway.runtime.workers import serve_workers
from vllm_gateway.settings import Settings

__all__ = ["serve"]


def serve(settings: Settings) -> int:
    """Run the gateway until a signal drains it; return the process exit code."""
    if settings.workers > 1:
        return serve_workers(settings)
    return run(create_app(settings))
