"""The gateway's configuration: one frozen object, built once from the environment and the CLI.

Every setting is declared once in ``FIELDS`` with its environment variable, its command-line flag,
its parser and its default; ``load_settings`` applies defaults, then the environment, then the
flags, and validates the result. Nothing else in the package reads ``os.environ``: the settings
object is passed explicitly to whatever needs it. An invalid value raises ``SettingsError`` naming
the variable; only the CLI turns that into an exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FIELDS", "Settings", "SettingsError", "add_arguments", "load_settings"]


class SettingsError(ValueError):
    """A setting has an invalid value; ``str()`` is one line naming the variable."""

    def __init__(self, variable: str, value: object, reason: str) -> None:
        self.variable = variable
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {variable}={value!r}: {reason}")


@dataclass(frozen=True, slots=True)
class Settings:
    # Where requests go.
    backend_urls: tuple[str, ...] = ("http://127.0.0.1:8001",)
    use_embedded_engine: bool = False
    model: str | None = None
    engine_args: tuple[str, ...] = ()
    model_aliases: Mapping[str, str] = field(default_factory=dict)
    # Secrets stay out of repr (and so out of every log line that prints the settings).
    backend_api_key: str | None = field(default=None, repr=False)
    backend_ca_file: str | None = None
    backend_client_cert: str | None = None
    backend_client_key: str | None = None
    backend_tls_verify: bool = True
    # Admission.
    max_concurrent_requests: int = 100
    max_queued_requests: int = 1000
    queue_wait_timeout: float = 60.0
    # Timeouts of one request.
    request_timeout: float = 120.0
    first_token_timeout: float = 60.0
    stream_idle_timeout: float = 30.0
    connect_timeout: float = 5.0
    upstream_idle_timeout: float = 4.0
    # Process.
    host: str = "0.0.0.0"
    port: int = 7000
    shutdown_timeout: float = 30.0
    workers: int = 1
    # Client-facing protection.
    api_keys: frozenset[str] = field(default=frozenset(), repr=False)
    admin_api_keys: frozenset[str] = field(default=frozenset(), repr=False)
    response_id_secret: str | None = field(default=None, repr=False)
    max_upload_bytes: int = 25 * 1024 * 1024
    rate_limit_rpm: float | None = None
    rate_limit_tpm: float | None = None
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    # A pool of backends (several VLLM_BACKEND_URLs, or a backends file); see docs/pool.md.
    backends_file: str | None = None
    pool_routing: str = "least_outstanding"
    pool_affinity_prefix_chars: int = 512
    pool_affinity_yield_factor: float = 2.0
    pool_max_outstanding: int | None = None
    pool_admission_wait: float = 1.0
    pool_health_interval: float = 2.0
    pool_health_timeout: float = 1.0
    pool_health_fail_threshold: int = 2
    pool_models_refresh_interval: float = 30.0
    pool_watchdog_stall: float = 15.0
    pool_canary_timeout: float = 5.0
    pool_eject_after_failures: int = 3
    pool_readmit_backoff: float = 1.0
    pool_readmit_backoff_max: float = 60.0
    pool_retry_budget_ratio: float = 0.2
    pool_max_retries: int = 2
    pool_failover_max: int = 2
    pool_cache_balance_abs: int = 8
    pool_cache_balance_rel: float = 1.5
    pool_cache_min_share: float = 0.2
    pool_cache_balance_share: float = 1.1
    pool_cache_balance_window: int = 4096
    pool_cache_tokens: int = 65536
    pool_cache_index_blocks: int = 65536
    pool_cache_links_kept: int = 100_000
    max_body_bytes: int = 4 * 1024 * 1024
    cors_origins: tuple[str, ...] = ()
    # What a client or backend may make the gateway wait for or hold (docs/reliability.md).
    client_header_timeout: float = 10.0
    client_body_timeout: float = 30.0
    client_idle_timeout: float = 30.0
    client_send_timeout: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100
    max_connections: int = 4096
    buffer_budget_bytes: int = 256 * 1024 * 1024
    max_backend_body_bytes: int = 16 * 1024 * 1024
    model_check_timeout: float = 2.0
    trusted_proxies: tuple[str, ...] = ()
    # Logs.
    log_level: str = "info"
    log_format: str = "text"

    @property
    def backend_url(self) -> str | None:
        """The first backend, for the single-backend setups of the seed."""
        return self.backend_urls[0] if self.backend_urls else None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# --- parsers: each takes the raw string and the variable name, returns a value or raises ------


def _positive_float(raw: str, var: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(var, raw, "must be a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(var, raw, "must be a positive number of seconds")
    return value


def _int_range(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(raw: str, var: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(var, raw, f"must be an integer between {lo} and {hi}") from None
        if not lo <= value <= hi:
            raise SettingsError(var, raw, f"must be an integer between {lo} and {hi}")
        return value

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(raw: str, var: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(var, raw, "must be true or false")


def _url(raw: str, var: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(var, raw, "must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise SettingsError(var, raw, "must not carry a query or fragment")
    try:
        parts.port  # noqa: B018 - raises on an out-of-range port
    except ValueError:
        raise SettingsError(var, raw, "has an invalid port") from None
    return raw.rstrip("/")


def _url_list(raw: str, var: str) -> tuple[str, ...]:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    return tuple(_url(item, var) for item in items)


def _str_list(raw: str, var: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _key_set(raw: str, var: str) -> frozenset[str]:
    entries = frozenset(_str_list(raw, var))
    _check_key_entries(entries, var)
    return entries


def _check_key_entries(entries: frozenset[str], var: str) -> None:
    from vllm_gateway.identity import parse_key_entry

    for entry in entries:
        try:
            parse_key_entry(entry)
        except ValueError as exc:
            raise SettingsError(
                var, "<hidden>", f"has an entry KEY:TENANT:PRIORITY where {exc}"
            ) from None


def _optional_rate(raw: str, var: str) -> float | None:
    if not raw.strip():
        return None
    return _positive_float(raw, var)


def _optional_int(raw: str, var: str) -> int | None:
    return _int_range(1, 1_000_000)(raw, var) if raw.strip() else None


def _ratio(raw: str, var: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(var, raw, "must be a number between 0 and 1") from None
    if not 0.0 <= value <= 1.0:
        raise SettingsError(var, raw, "must be a number between 0 and 1")
    return value


def _redis_url(raw: str, var: str) -> str | None:
    raw = raw.strip()
    if not raw:
        return None
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(var, raw, "must be a redis://, rediss:// or unix:// URL")
    return raw


def _aliases(raw: str, var: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in _str_list(raw, var):
        alias, sep, target = item.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise SettingsError(var, raw, "must be a comma-separated list of alias=model")
        out[alias.strip()] = target.strip()
    return out


def _optional_str(raw: str, var: str) -> str | None:
    return raw.strip() or None


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(raw: str, var: str) -> str:
        low = raw.strip().lower()
        if low not in choices:
            raise SettingsError(var, raw, f"must be one of {', '.join(choices)}")
        return low

    return parse


def _shell_words(raw: str, var: str) -> tuple[str, ...]:
    import shlex

    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise SettingsError(var, raw, f"is not a valid argument list ({exc})") from None


def _networks(raw: str, var: str) -> tuple[str, ...]:
    import ipaddress

    items = _str_list(raw, var)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SettingsError(var, raw, f"{item!r} is not an address or CIDR network") from None
    return items


def _readable_file(raw: str, var: str) -> str | None:
    import os

    path = raw.strip()
    if not path:
        return None
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise SettingsError(var, raw, "is not a readable file")
    return path


def _host(raw: str, var: str) -> str:
    if not raw.strip() or any(c.isspace() for c in raw.strip()):
        raise SettingsError(var, raw, "must be a host name or address")
    return raw.strip()


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    env: str
    flag: str
    parse: Callable[[str, str], Any]
    help: str


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "backend_urls",
        "VLLM_BACKEND_URL",
        "--backend-url",
        _url_list,
        "vLLM OpenAI server URL; several, comma-separated, form a pool; empty with --embedded",
    ),
    FieldSpec(
        "use_embedded_engine",
        "VLLM_USE_EMBEDDED_ENGINE",
        "--embedded",
        _bool,
        "run an in-process vLLM AsyncLLM engine instead of calling a server",
    ),
    FieldSpec(
        "model",
        "VLLM_MODEL",
        "--model",
        _optional_str,
        "model for the embedded engine (a folder or a model name)",
    ),
    FieldSpec(
        "engine_args",
        "VLLM_ENGINE_ARGS",
        "--engine-args",
        _shell_words,
        "extra 'vllm serve' arguments for the embedded engine, e.g. '--max-model-len 4096'",
    ),
    FieldSpec(
        "model_aliases",
        "VLLM_MODEL_ALIASES",
        "--model-aliases",
        _aliases,
        "comma-separated alias=model pairs, e.g. gpt-oss-20b=openai/gpt-oss-20b",
    ),
    FieldSpec(
        "backend_api_key",
        "VLLM_BACKEND_API_KEY",
        "--backend-api-key",
        _optional_str,
        "key the gateway sends to a backend started with --api-key",
    ),
    FieldSpec(
        "backend_ca_file",
        "VLLM_BACKEND_CA_FILE",
        "--backend-ca-file",
        _readable_file,
        "PEM bundle of CAs to trust for https:// backends (default: the system's)",
    ),
    FieldSpec(
        "backend_client_cert",
        "VLLM_BACKEND_CLIENT_CERT",
        "--backend-client-cert",
        _readable_file,
        "client certificate (PEM) the gateway presents to https:// backends that ask for one",
    ),
    FieldSpec(
        "backend_client_key",
        "VLLM_BACKEND_CLIENT_KEY",
        "--backend-client-key",
        _readable_file,
        "the client certificate's key, when it is not in the certificate file",
    ),
    FieldSpec(
        "backend_tls_verify",
        "VLLM_BACKEND_TLS_VERIFY",
        "--backend-tls-verify",
        _bool,
        "verify https:// backends' certificates and names (turn off only for a self-signed "
        "backend on a private network)",
    ),
    FieldSpec(
        "max_concurrent_requests",
        "VLLM_MAX_CONCURRENT_REQUESTS",
        "--max-concurrent-requests",
        _int_range(1, 1_000_000),
        "in-flight requests (the semaphore)",
    ),
    FieldSpec(
        "max_queued_requests",
        "VLLM_MAX_QUEUED_REQUESTS",
        "--max-queued-requests",
        _int_range(0, 10_000_000),
        "requests that may wait for a slot; beyond it, 503 at once",
    ),
    FieldSpec(
        "queue_wait_timeout",
        "VLLM_QUEUE_WAIT_TIMEOUT_SECONDS",
        "--queue-wait-timeout",
        _positive_float,
        "max wait for a slot, then 503",
    ),
    FieldSpec(
        "request_timeout",
        "VLLM_REQUEST_TIMEOUT_SECONDS",
        "--request-timeout",
        _positive_float,
        "bound on one inference, first byte to last",
    ),
    FieldSpec(
        "first_token_timeout",
        "VLLM_FIRST_TOKEN_TIMEOUT_SECONDS",
        "--first-token-timeout",
        _positive_float,
        "bound on the wait for the backend's first byte",
    ),
    FieldSpec(
        "stream_idle_timeout",
        "VLLM_STREAM_IDLE_TIMEOUT_SECONDS",
        "--stream-idle-timeout",
        _positive_float,
        "bound on the gap between two chunks of a stream",
    ),
    FieldSpec(
        "connect_timeout",
        "VLLM_CONNECT_TIMEOUT_SECONDS",
        "--connect-timeout",
        _positive_float,
        "bound on opening a connection to the backend",
    ),
    FieldSpec(
        "upstream_idle_timeout",
        "VLLM_UPSTREAM_IDLE_TIMEOUT_SECONDS",
        "--upstream-idle-timeout",
        _positive_float,
        "how long an idle connection to the backend is kept; keep it below the backend's "
        "own keep-alive (vLLM: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default)",
    ),
    FieldSpec("host", "VLLM_HOST", "--host", _host, "gateway bind address"),
    FieldSpec("port", "VLLM_PORT", "--port", _int_range(1, 65535), "gateway bind port"),
    FieldSpec(
        "shutdown_timeout",
        "VLLM_SHUTDOWN_TIMEOUT_SECONDS",
        "--shutdown-timeout",
        _positive_float,
        "drain deadline for in-flight requests on SIGTERM/SIGINT",
    ),
    FieldSpec(
        "workers", "VLLM_WORKERS", "--workers", _int_range(1, 256), "gateway worker processes"
    ),
    FieldSpec(
        "api_keys",
        "VLLM_API_KEYS",
        "--api-keys",
        _key_set,
        "comma-separated client API keys, each KEY[:TENANT[:PRIORITY]]; empty: no key needed",
    ),
    FieldSpec(
        "admin_api_keys",
        "VLLM_ADMIN_API_KEYS",
        "--admin-api-keys",
        _key_set,
        "comma-separated keys that open vLLM's admin routes (/sleep, /wake_up, LoRA loading...); "
        "empty: those routes are closed. A client key never opens them",
    ),
    FieldSpec(
        "response_id_secret",
        "VLLM_RESPONSE_ID_SECRET",
        "--response-id-secret",
        _optional_str,
        "key of the MAC in stored Responses' ids that names their tenant (the same on every "
        "replica); empty: one per tenant, derived from its API keys",
    ),
    FieldSpec(
        "max_upload_bytes",
        "VLLM_MAX_UPLOAD_BYTES",
        "--max-upload-bytes",
        _int_range(1024, 1 << 32),
        "largest multipart upload (audio transcriptions and translations)",
    ),
    FieldSpec(
        "rate_limit_rpm",
        "VLLM_RATE_LIMIT_RPM",
        "--rate-limit-rpm",
        _optional_rate,
        "requests per minute allowed to each tenant (429 beyond); empty means no limit",
    ),
    FieldSpec(
        "rate_limit_tpm",
        "VLLM_RATE_LIMIT_TPM",
        "--rate-limit-tpm",
        _optional_rate,
        "tokens per minute allowed to each tenant (429 beyond); empty means no limit",
    ),
    FieldSpec(
        "redis_url",
        "VLLM_REDIS_URL",
        "--redis-url",
        _redis_url,
        "Redis shared by gateway replicas for rate limits; per-replica limits without it",
    ),
    FieldSpec(
        "backends_file",
        "VLLM_BACKENDS_FILE",
        "--backends-file",
        _optional_str,
        "YAML or JSON file listing backends with weights and models (a pool)",
    ),
    FieldSpec(
        "pool_routing",
        "VLLM_POOL_ROUTING",
        "--pool-routing",
        _choice("least_outstanding", "round_robin", "session", "prefix", "cache_aware"),
        "how a pool picks a backend (docs/pool.md)",
    ),
    FieldSpec(
        "pool_affinity_prefix_chars",
        "VLLM_POOL_AFFINITY_PREFIX_CHARS",
        "--pool-affinity-prefix-chars",
        _int_range(1, 1_000_000),
        "prompt characters hashed for prefix affinity",
    ),
    FieldSpec(
        "pool_affinity_yield_factor",
        "VLLM_POOL_AFFINITY_YIELD_FACTOR",
        "--pool-affinity-yield-factor",
        _positive_float,
        "affinity yields when its backend is this many times busier than the least busy",
    ),
    FieldSpec(
        "pool_max_outstanding",
        "VLLM_POOL_MAX_OUTSTANDING",
        "--pool-max-outstanding",
        _optional_int,
        "in-flight limit per backend of a pool; empty means none",
    ),
    FieldSpec(
        "pool_admission_wait",
        "VLLM_POOL_ADMISSION_WAIT_SECONDS",
        "--pool-admission-wait",
        _positive_float,
        "wait for a pool backend with room, then 503",
    ),
    FieldSpec(
        "pool_health_interval",
        "VLLM_POOL_HEALTH_INTERVAL_SECONDS",
        "--pool-health-interval",
        _positive_float,
        "seconds between active health checks",
    ),
    FieldSpec(
        "pool_health_timeout",
        "VLLM_POOL_HEALTH_TIMEOUT_SECONDS",
        "--pool-health-timeout",
        _positive_float,
        "bound on one health check",
    ),
    FieldSpec(
        "pool_health_fail_threshold",
        "VLLM_POOL_HEALTH_FAIL_THRESHOLD",
        "--pool-health-fail-threshold",
        _int_range(1, 1000),
        "failed health checks before a backend is taken out",
    ),
    FieldSpec(
        "pool_models_refresh_interval",
        "VLLM_POOL_MODELS_REFRESH_SECONDS",
        "--pool-models-refresh-interval",
        _positive_float,
        "seconds between refreshes of each backend's model list",
    ),
    FieldSpec(
        "pool_watchdog_stall",
        "VLLM_POOL_WATCHDOG_STALL_SECONDS",
        "--pool-watchdog-stall",
        _positive_float,
        "a busy backend silent this long gets a canary generation",
    ),
    FieldSpec(
        "pool_canary_timeout",
        "VLLM_POOL_CANARY_TIMEOUT_SECONDS",
        "--pool-canary-timeout",
        _positive_float,
        "bound on the watchdog's canary generation",
    ),
    FieldSpec(
        "pool_eject_after_failures",
        "VLLM_POOL_EJECT_AFTER_FAILURES",
        "--pool-eject-after-failures",
        _int_range(1, 1000),
        "consecutive request failures before a backend is ejected",
    ),
    FieldSpec(
        "pool_readmit_backoff",
        "VLLM_POOL_READMIT_BACKOFF_SECONDS",
        "--pool-readmit-backoff",
        _positive_float,
        "first wait before re-admitting",
    ),
    FieldSpec(
        "pool_readmit_backoff_max",
        "VLLM_POOL_READMIT_BACKOFF_MAX_SECONDS",
        "--pool-readmit-backoff-max",
        _positive_float,
        "longest wait before re-admitting",
    ),
    FieldSpec(
        "pool_retry_budget_ratio",
        "VLLM_POOL_RETRY_BUDGET_RATIO",
        "--pool-retry-budget-ratio",
        _ratio,
        "retries allowed as a share of recent requests",
    ),
    FieldSpec(
        "pool_max_retries",
        "VLLM_POOL_MAX_RETRIES",
        "--pool-max-retries",
        _int_range(0, 10),
        "retries of one request on other backends, before its first byte",
    ),
    FieldSpec(
        "pool_failover_max",
        "VLLM_POOL_FAILOVER_MAX",
        "--pool-failover-max",
        _int_range(0, 10),
        "continuations of one stream on another member after its member failed mid-stream "
        "(0: the stream ends with an error event)",
    ),
    FieldSpec(
        "pool_cache_balance_abs",
        "VLLM_POOL_CACHE_BALANCE_ABS",
        "--pool-cache-balance-abs",
        _int_range(0, 1_000_000),
        "cache_aware: a cached member this many requests busier than the least busy yields",
    ),
    FieldSpec(
        "pool_cache_balance_rel",
        "VLLM_POOL_CACHE_BALANCE_REL",
        "--pool-cache-balance-rel",
        _positive_float,
        "cache_aware: ... and busier than this many times (least busy + 1)",
    ),
    FieldSpec(
        "pool_cache_balance_share",
        "VLLM_POOL_CACHE_BALANCE_SHARE",
        "--pool-cache-balance-share",
        _positive_float,
        "cache_aware: a cached member given more than this times the mean share of recent "
        "requests (plus the balance's abs) yields to a member under the mean",
    ),
    FieldSpec(
        "pool_cache_balance_window",
        "VLLM_POOL_CACHE_BALANCE_WINDOW",
        "--pool-cache-balance-window",
        _int_range(1, 1_000_000),
        "cache_aware: the pool's last requests counted for that share",
    ),
    FieldSpec(
        "pool_cache_min_share",
        "VLLM_POOL_CACHE_MIN_SHARE",
        "--pool-cache-min-share",
        _ratio,
        "cache_aware: a cached prefix under this share of the prompt goes to the least busy",
    ),
    FieldSpec(
        "pool_cache_tokens",
        "VLLM_POOL_CACHE_TOKENS",
        "--pool-cache-tokens",
        _int_range(1, 1 << 31),
        "cache_aware: a member's cache size in tokens until its metrics say",
    ),
    FieldSpec(
        "pool_cache_index_blocks",
        "VLLM_POOL_CACHE_INDEX_BLOCKS",
        "--pool-cache-index-blocks",
        _int_range(1, 1 << 26),
        "cache_aware: blocks indexed per member from its KV-cache events (at least twice its "
        "block count)",
    ),
    FieldSpec(
        "pool_cache_links_kept",
        "VLLM_POOL_CACHE_LINKS_KEPT",
        "--pool-cache-links-kept",
        _int_range(1, 1 << 26),
        "cache_aware: prompt-text pieces linked to token blocks (LRU)",
    ),
    FieldSpec(
        "max_body_bytes",
        "VLLM_MAX_BODY_BYTES",
        "--max-body-bytes",
        _int_range(1024, 1 << 30),
        "largest request body accepted",
    ),
    FieldSpec(
        "cors_origins",
        "VLLM_CORS_ORIGINS",
        "--cors-origins",
        _str_list,
        "comma-separated origins allowed by CORS; empty means CORS is off",
    ),
    FieldSpec(
        "client_header_timeout",
        "VLLM_CLIENT_HEADER_TIMEOUT_SECONDS",
        "--client-header-timeout",
        _positive_float,
        "bound on receiving a request's line and headers (from the connection's open or the "
        "request's first byte); then 408",
    ),
    FieldSpec(
        "client_body_timeout",
        "VLLM_CLIENT_BODY_TIMEOUT_SECONDS",
        "--client-body-timeout",
        _positive_float,
        "bound on receiving a request's body after its headers; then 408",
    ),
    FieldSpec(
        "client_idle_timeout",
        "VLLM_CLIENT_IDLE_TIMEOUT_SECONDS",
        "--client-idle-timeout",
        _positive_float,
        "how long an idle keep-alive client connection is kept",
    ),
    FieldSpec(
        "client_send_timeout",
        "VLLM_CLIENT_SEND_TIMEOUT_SECONDS",
        "--client-send-timeout",
        _positive_float,
        "a client that takes nothing of what it is sent for this long is dropped, its request "
        "ended and its slot freed",
    ),
    FieldSpec(
        "max_header_bytes",
        "VLLM_MAX_HEADER_BYTES",
        "--max-header-bytes",
        _int_range(1024, 1 << 20),
        "largest request line plus headers, and largest trailer section (431 beyond)",
    ),
    FieldSpec(
        "max_header_count",
        "VLLM_MAX_HEADER_COUNT",
        "--max-header-count",
        _int_range(8, 10_000),
        "most header fields in a request, and most trailer fields (431 beyond)",
    ),
    FieldSpec(
        "max_connections",
        "VLLM_MAX_CONNECTIONS",
        "--max-connections",
        _int_range(1, 1_000_000),
        "open client connections; one more is answered 503 and closed at once",
    ),
    FieldSpec(
        "buffer_budget_bytes",
        "VLLM_BUFFER_BUDGET_BYTES",
        "--buffer-budget-bytes",
        _int_range(1 << 20, 1 << 40),
        "bytes of request bodies and non-streamed backend bodies held at once, over all "
        "requests (503 beyond)",
    ),
    FieldSpec(
        "max_backend_body_bytes",
        "VLLM_MAX_BACKEND_BODY_BYTES",
        "--max-backend-body-bytes",
        _int_range(1024, 1 << 32),
        "largest non-streamed backend answer (502 beyond)",
    ),
    FieldSpec(
        "model_check_timeout",
        "VLLM_MODEL_CHECK_TIMEOUT_SECONDS",
        "--model-check-timeout",
        _positive_float,
        "longest a request waits for the backend's model list; after it the request goes on "
        "and the backend judges the model",
    ),
    FieldSpec(
        "trusted_proxies",
        "VLLM_TRUSTED_PROXIES",
        "--trusted-proxies",
        _networks,
        "comma-separated addresses or CIDR networks whose X-Forwarded-For is believed; "
        "empty: the peer's own address is the client's",
    ),
    FieldSpec(
        "log_level",
        "VLLM_LOG_LEVEL",
        "--log-level",
        _choice("debug", "info", "warning", "error"),
        "log level",
    ),
    FieldSpec(
        "log_format", "VLLM_LOG_FORMAT", "--log-format", _choice("text", "json"), "log format"
    ),
)

_BY_NAME = {spec.name: spec for spec in FIELDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; every flag defaults to None so that 'not given' is visible."""
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for spec in FIELDS:
        parser.add_argument(
            spec.flag,
            dest=spec.name,
            default=None,
            metavar=spec.env,
            help=f"{spec.help} (env {spec.env}; default {_shown(defaults.get(spec.name))})",
        )
    parser.add_argument(
        "--api-keys-file",
        dest="api_keys_file",
        default=None,
        metavar="VLLM_API_KEYS_FILE",
        help="file of client API keys, one per line (env VLLM_API_KEYS_FILE; default none)",
    )


def _shown(value: Any) -> str:
    """A default as ``--help`` shows it."""
    if value is None or value is dataclasses.MISSING or value in ((), frozenset(), ""):
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | frozenset):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def load_settings(
    env: Mapping[str, str],
    flags: Mapping[str, str | None] | None = None,
) -> Settings:
    """Build settings from defaults, then ``env``, then ``flags`` (raw strings, None = not given)."""
    values: dict[str, Any] = {}
    for spec in FIELDS:
        raw = env.get(spec.env)
        where = spec.env
        if flags is not None and flags.get(spec.name) is not None:
            raw, where = flags[spec.name], spec.flag
        if raw is None:
            continue
        values[spec.name] = spec.parse(str(raw), where)

    keys_file = (flags or {}).get("api_keys_file") or env.get("VLLM_API_KEYS_FILE")
    if keys_file:
        values["api_keys"] = frozenset(values.get("api_keys", frozenset())) | _read_keys_file(
            keys_file
        )

    if values.get("use_embedded_engine") and "backend_urls" not in values:
        values["backend_urls"] = ()
    settings = Settings(**values)
    _validate(settings, env, flags or {})
    return settings


def _read_keys_file(path: str) -> frozenset[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise SettingsError(
            "VLLM_API_KEYS_FILE", path, f"cannot be read ({exc.strerror})"
        ) from None
    entries = frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    _check_key_entries(entries, "VLLM_API_KEYS_FILE")
    return entries


def _validate(s: Settings, env: Mapping[str, str], flags: Mapping[str, str | None]) -> None:
    if s.use_embedded_engine:
        if s.workers > 1:
            raise SettingsError(
                _name_of("workers", flags),
                s.workers,
                "must be 1 with the embedded engine (each worker would load the model)",
            )
        if s.backend_urls:
            raise SettingsError(
                _name_of("backend_urls", flags),
                ",".join(s.backend_urls),
                "must be empty when the embedded engine is on",
            )
    elif not s.backend_urls:
        raise SettingsError(
            "VLLM_BACKEND_URL", "", "is empty; set it, or set VLLM_USE_EMBEDDED_ENGINE=true"
        )
    if s.first_token_timeout > s.request_timeout:
        raise SettingsError(
            _name_of("first_token_timeout", flags),
            s.first_token_timeout,
            f"must not exceed VLLM_REQUEST_TIMEOUT_SECONDS ({s.request_timeout:g})",
        )
    if not s.use_embedded_engine:
        _check_port_clash(s, flags)


_LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "::1", "::", ""}


def _check_port_clash(s: Settings, flags: Mapping[str, str | None]) -> None:
    """The seed's start script reads VLLM_PORT as vLLM's port, and so does the gateway for its own.

    In one shell that makes the gateway try to bind the backend's port: say so, naming both.
    """
    for url in s.backend_urls:
        parts = urlsplit(url)
        backend_port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or ""
        if backend_port == s.port and (host in _LOCAL_HOSTS or host == s.host):
            var = "--port" if flags.get("port") else "VLLM_PORT"
            raise SettingsError(
                var,
                s.port,
                f"the gateway would bind the backend's own port ({url}). VLLM_PORT is read both by "
                "scripts/start_vllm_h100.sh (vLLM's port) and by the gateway (its bind port): unset it "
                "for the gateway or pass 'vllm-gateway serve --port 7000'",
            )


def _name_of(name: str, flags: Mapping[str, str | None]) -> str:
    spec = _BY_NAME[name]
    return spec.flag if flags.get(name) is not None else spec.env


def env_names() -> Sequence[str]:
    """Every environment variable the gateway reads."""
    return [spec.env for spec in FIELDS] + ["VLLM_API_KEYS_FILE"]
