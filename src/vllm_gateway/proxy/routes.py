"""Every route the gateway serves for vLLM, and what it does with each: one table.

A ``Route`` says whether the request runs the engine (and so takes an admission permit and waits
in the queue), what its body is (JSON, a multipart upload, or nothing), which stream protocol its
streams speak (``protocols.py``), how its body is validated, and how a pool reaches it: routed to
one member, to the member that holds a stored response (``locate``), or to every member (admin
routes). docs/routes.md is the same table for readers, with each row's test.

Routes that only run vLLM's tokenizer (``/tokenize``, ``/detokenize``, ``count_tokens``) and the
Responses store's retrieve and cancel do not take a permit: they are cheap, and a client polling
a background response must not wait behind the generations it is polling. They keep every other
bound (the request timeout, body caps, rate limits, drain).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from vllm_gateway.proxy.protocols import ANTHROPIC, OPENAI, RESPONSES, StreamProtocol

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "OPEN_ROUTES",
    "PROXY_ROUTES",
    "ROUTE_NAMES",
    "Body",
    "Reach",
    "Route",
    "match",
    "target",
]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES_PATH = "/v1/responses"
MESSAGES = "/v1/messages"
# Probes must answer without a key: orchestrators do not carry one.
OPEN_ROUTES = frozenset({"/health/live", "/health/ready", "/v1/health", "/health", "/ping"})


class Body(Enum):
    JSON = "json"
    MULTIPART = "multipart"  # an upload: forwarded as it came, with its own cap
    ANY = "any"  # nothing the gateway reads (admin calls, the store's): forwarded as it came


class Reach(Enum):
    ONE = "one"  # routed to one backend
    HOLDER = "holder"  # the backend that holds the stored response the request names
    ALL = "all"  # every backend (admin): a pool answers with each member's result


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the path, or its template: the metrics label and the docs row
    methods: frozenset[str]
    kind: str  # "generate", "pooling", "utility", "store", "admin"
    admitted: bool = True
    body: Body = Body.JSON
    protocol: StreamProtocol = OPENAI  # its streams, and the shape of its errors
    json_answer: bool = True  # a 200 must be a JSON object (audio may answer text)
    reach: Reach = Reach.ONE


def _r(name: str, kind: str, *methods: str, **kw: object) -> Route:
    return Route(name, frozenset(methods or ("POST",)), kind, **kw)  # type: ignore[arg-type]


_GENERATE = [
    _r(CHAT, "generate"),
    _r(COMPLETIONS, "generate"),
    _r(RESPONSES_PATH, "generate", protocol=RESPONSES),
    _r(MESSAGES, "generate", protocol=ANTHROPIC),
    _r("/v1/chat/completions/batch", "generate"),
    _r("/generative_scoring", "generate"),
    _r("/v1/audio/transcriptions", "generate", body=Body.MULTIPART, json_answer=False),
    _r("/v1/audio/translations", "generate", body=Body.MULTIPART, json_answer=False),
]
_POOLING = [
    _r(path, "pooling")
    for path in (
        "/v1/embeddings",
        "/v2/embed",
        "/pooling",
        "/classify",
        "/score",
        "/v1/score",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
    )
]
_UTILITY = [
    _r("/tokenize", "utility", admitted=False),
    _r("/detokenize", "utility", admitted=False),
    _r("/v1/messages/count_tokens", "utility", admitted=False, protocol=ANTHROPIC),
]
_ADMIN_POST = (
    "/sleep",
    "/wake_up",
    "/pause",
    "/resume",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/reset_encoder_cache",
    "/release_kv_cache_memory",
    "/collective_rpc",
    "/abort_requests",
    "/start_profile",
    "/stop_profile",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/init_weight_transfer_engine",
    "/shutdown_weight_transfer_engine",
    "/start_weight_update",
    "/start_draft_weight_update",
    "/update_weights",
    "/finish_weight_update",
    "/update_weight_version",
    "/weight_checker",
    "/scale_elastic_ep",
)
_ADMIN_GET = (
    "/is_sleeping",
    "/is_paused",
    "/server_info",
    "/weight_info",
    "/get_world_size",
    "/is_scaling_elastic_ep",
    "/tokenizer_info",
)
_ADMIN = [
    *(
        _r(path, "admin", "POST", admitted=False, body=Body.ANY, reach=Reach.ALL)
        for path in _ADMIN_POST
    ),
    *(
        _r(path, "admin", "GET", admitted=False, body=Body.ANY, reach=Reach.ALL)
        for path in _ADMIN_GET
    ),
]

_EXACT: dict[str, Route] = {r.name: r for r in (*_GENERATE, *_POOLING, *_UTILITY, *_ADMIN)}

# Routes with a parameter in the path.
_STORED = _r(
    "/v1/responses/{id}",
    "store",
    "GET",
    admitted=False,
    body=Body.ANY,
    protocol=RESPONSES,
    reach=Reach.HOLDER,
)
_CANCEL = _r(
    "/v1/responses/{id}/cancel", "store", "POST", admitted=False, body=Body.ANY, reach=Reach.HOLDER
)
_ADAPTER = _r("/adapters/{name}", "admin", "DELETE", admitted=False, body=Body.ANY, reach=Reach.ALL)
_ADAPTERS = _r("/adapters", "admin", "POST", admitted=False, body=Body.ANY, reach=Reach.ALL)
_EXACT[_ADAPTERS.name] = _ADAPTERS
# Matched whole (``fullmatch``: a ``$`` would also match before a final newline, and the decoded
# path ``/v1/responses/x%0A`` would name ``x\n``).
_PATTERNS: list[tuple[re.Pattern[str], Route]] = [
    (re.compile(r"/v1/responses/([A-Za-z0-9_.:-]{1,200})"), _STORED),
    (re.compile(r"/v1/responses/([A-Za-z0-9_.:-]{1,200})/cancel"), _CANCEL),
    (re.compile(r"/adapters/([A-Za-z0-9_.:-]{1,200})"), _ADAPTER),
]

# The engine's own inference routes (the hot path's fast check, and the access log's routes).
PROXY_ROUTES = frozenset(r.name for r in (*_GENERATE, *_POOLING))
# Every label the metrics may carry for a route: bounded whatever clients send.
ROUTE_NAMES = frozenset([*_EXACT, _STORED.name, _CANCEL.name, _ADAPTER.name])


def match(path: str) -> tuple[Route, str | None] | None:
    """The route for ``path`` and its parameter (a response id, an adapter name), or None."""
    route = _EXACT.get(path)
    if route is not None:
        return route, None
    if path.startswith(("/v1/responses/", "/adapters/")):
        for pattern, candidate in _PATTERNS:
            m = pattern.fullmatch(path)
            if m:
                return candidate, m.group(1)
    return None


def target(route: Route, param: str | None) -> str:
    """The path the backend gets: the route's, its parameter (checked by ``match``) in place of
    the template's ``{...}``; never the client's own spelling of it."""
    if param is None:
        return route.name
    head, _, rest = route.name.partition("{")
    return head + param + rest.partition("}")[2]


def all_routes() -> list[Route]:
    """Every relayed route, for the docs and the OpenAPI document."""
    return [*_EXACT.values(), _STORED, _CANCEL, _ADAPTER]
