"""The routes the gateway proxies, and the ones that answer without a key."""

from __future__ import annotations

__all__ = ["CHAT", "COMPLETIONS", "OPEN_ROUTES", "PROXY_ROUTES"]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PROXY_ROUTES = frozenset({CHAT, COMPLETIONS})
# Probes must answer without a key: orchestrators do not carry one.
OPEN_ROUTES = frozenset({"/health/live", "/health/ready", "/v1/health"})
