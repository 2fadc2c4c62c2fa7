"""Every setting, declared once: a field of ``Settings`` (or of its ``PoolSettings`` group) that
carries its --help group, default, environment variable, flag, parser and help.

``setting(group, default, env, flag, parser, help)`` makes such a field; ``FIELDS`` is the flat
view of them all (in --help's order within each group) that ``loading`` reads. The pool's settings
are a nested group, ``settings.pool``, whose flags' keys keep the ``pool_`` prefix
(``VLLM_POOL_ROUTING``, ``--pool-routing``, key ``pool_routing``): the names users know.

The two classes are the gateway's configuration as the code reads it: frozen, built once at start
(``loading.load_settings``), never read per request beyond an attribute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, cast

import vllm_gateway.settings.parsers as parse
from vllm_gateway.settings.parsers import Parser

__all__ = ["FIELDS", "GROUPS", "ROUTINGS", "Group", "PoolSettings", "Setting", "Settings"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Group:
    """A heading of ``vllm-gateway serve --help``."""

    title: str
    description: str | None = None


WHERE = Group("where requests go")
LISTEN = Group("the gateway's process")
ADMISSION = Group("admission and the queue")
TIMEOUTS = Group("timeouts of one request", "in seconds (docs/ARCHITECTURE.md#timeouts)")
CLIENTS = Group("clients: keys, tenants, rate limits")
BOUNDS = Group(
    "bounds on clients and backends",
    "what a slow or hostile client or backend can make the gateway wait for or hold\n"
    "(docs/reliability.md)",
)
TLS = Group("TLS to https:// backends")
POOL = Group("a pool of backends", "several backend URLs, or a backends file (docs/pool.md)")
LOGS = Group("logs")

# The order of --help. A description is printed as it is: lines under 80 columns.
GROUPS = (WHERE, LISTEN, ADMISSION, TIMEOUTS, CLIENTS, BOUNDS, TLS, POOL, LOGS)


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting as declared, and (in ``FIELDS``) where it sits.

    ``name`` is its key in ``load_settings``' flags (the field's name, ``pool_`` + it in the pool
    group), ``path`` the attributes that reach it from ``Settings``, ``default`` its default.
    """

    group: Group
    env: str
    flag: str
    parse: Parser
    help: str
    name: str = ""
    path: tuple[str, ...] = ()
    default: Any = None


_SETTING = "vllm_gateway.setting"  # a field's metadata key: its Setting
_NESTED = "vllm_gateway.settings_group"  # a nested group's: its keys' prefix


def setting(
    group: Group,
    default: T,
    env: str,
    flag: str,
    parser: Parser,
    help: str,
    *,
    secret: bool = False,
) -> T:
    """A field that is a setting; ``secret`` keeps its value out of ``repr`` (and so of logs)."""
    metadata = {_SETTING: Setting(group, env, flag, parser, help)}
    if isinstance(default, dict):  # mutable: each instance gets its own copy
        made = dict(default)
        return cast(T, field(default_factory=made.copy, repr=not secret, metadata=metadata))
    return field(default=default, repr=not secret, metadata=metadata)


def nested(prefix: str) -> dict[str, str]:
    """The metadata of a field holding a group of settings (its ``default_factory``, a class like
    ``Settings``) whose keys are ``prefix`` + the group's field names."""
    return {_NESTED: prefix}


ROUTINGS = ("least_outstanding", "round_robin", "session", "prefix", "cache_aware")

# fmt: off
# Laid out by hand, as a table: the formatter would give each argument of setting() its line.


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """A pool's knobs (docs/pool.md): ``settings.pool``, which the pool takes as its config."""

    routing: str = setting(
        POOL, "least_outstanding", "VLLM_POOL_ROUTING", "--pool-routing", parse.choice(*ROUTINGS),
        "how a pool picks a backend (docs/pool.md)")
    affinity_prefix_chars: int = setting(
        POOL, 512, "VLLM_POOL_AFFINITY_PREFIX_CHARS", "--pool-affinity-prefix-chars",
        parse.int_range(1, 1_000_000), "prompt characters hashed for prefix affinity")
    affinity_yield_factor: float = setting(
        POOL, 2.0, "VLLM_POOL_AFFINITY_YIELD_FACTOR", "--pool-affinity-yield-factor",
        parse.positive_float,
        "affinity yields when its backend is this many times busier than the least busy")
    max_outstanding: int | None = setting(
        POOL, None, "VLLM_POOL_MAX_OUTSTANDING", "--pool-max-outstanding", parse.optional_int,
        "in-flight limit per backend of a pool; empty means none")
    admission_wait: float = setting(
        POOL, 1.0, "VLLM_POOL_ADMISSION_WAIT_SECONDS", "--pool-admission-wait",
        parse.positive_float, "wait for a pool backend with room, then 503")
    health_interval: float = setting(
        POOL, 2.0, "VLLM_POOL_HEALTH_INTERVAL_SECONDS", "--pool-health-interval",
        parse.positive_float, "seconds between active health checks")
    health_timeout: float = setting(
        POOL, 1.0, "VLLM_POOL_HEALTH_TIMEOUT_SECONDS", "--pool-health-timeout",
        parse.positive_float, "bound on one health check")
    health_fail_threshold: int = setting(
        POOL, 2, "VLLM_POOL_HEALTH_FAIL_THRESHOLD", "--pool-health-fail-threshold",
        parse.int_range(1, 1000), "failed health checks before a backend is taken out")
    models_refresh_interval: float = setting(
        POOL, 30.0, "VLLM_POOL_MODELS_REFRESH_SECONDS", "--pool-models-refresh-interval",
        parse.positive_float, "seconds between refreshes of each backend's model list")
    watchdog_stall: float = setting(
        POOL, 15.0, "VLLM_POOL_WATCHDOG_STALL_SECONDS", "--pool-watchdog-stall",
        parse.positive_float, "a busy backend silent this long gets a canary generation")
    canary_timeout: float = setting(
        POOL, 5.0, "VLLM_POOL_CANARY_TIMEOUT_SECONDS", "--pool-canary-timeout",
        parse.positive_float, "bound on the watchdog's canary generation")
    eject_after_failures: int = setting(
        POOL, 3, "VLLM_POOL_EJECT_AFTER_FAILURES", "--pool-eject-after-failures",
        parse.int_range(1, 1000), "consecutive request failures before a backend is ejected")
    readmit_backoff: float = setting(
        POOL, 1.0, "VLLM_POOL_READMIT_BACKOFF_SECONDS", "--pool-readmit-backoff",
        parse.positive_float, "first wait before re-admitting")
    readmit_backoff_max: float = setting(
        POOL, 60.0, "VLLM_POOL_READMIT_BACKOFF_MAX_SECONDS", "--pool-readmit-backoff-max",
        parse.positive_float, "longest wait before re-admitting")
    retry_budget_ratio: float = setting(
        POOL, 0.2, "VLLM_POOL_RETRY_BUDGET_RATIO", "--pool-retry-budget-ratio", parse.ratio,
        "retries allowed as a share of recent requests")
    max_retries: int = setting(
        POOL, 2, "VLLM_POOL_MAX_RETRIES", "--pool-max-retries", parse.int_range(0, 10),
        "retries of one request on other backends, before its first byte")
    failover_max: int = setting(
        POOL, 2, "VLLM_POOL_FAILOVER_MAX", "--pool-failover-max", parse.int_range(0, 10),
        "continuations of one stream on another member after its member failed mid-stream "
        "(0: the stream ends with an error event)")
    # Membership at run time (backends/pool/fleet.py)
    slow_start: float = setting(
        POOL, 10.0, "VLLM_POOL_SLOW_START_SECONDS", "--pool-slow-start", parse.seconds,
        "a member that joins or comes back ramps its weight from a tenth to whole over this "
        "many seconds (0: at once)")
    drain_timeout: float = setting(
        POOL, 30.0, "VLLM_POOL_DRAIN_TIMEOUT_SECONDS", "--pool-drain-timeout",
        parse.positive_float,
        "a draining or removed member's in-flight requests may finish there this long; then its "
        "streams go on elsewhere")
    max_members: int = setting(
        POOL, 256, "VLLM_POOL_MAX_MEMBERS", "--pool-max-members", parse.int_range(1, 4096),
        "members a pool holds at most, draining ones included; more are refused")
    # cache_aware routing (backends/pool/cache_index.py)
    cache_balance_abs: int = setting(
        POOL, 8, "VLLM_POOL_CACHE_BALANCE_ABS", "--pool-cache-balance-abs",
        parse.int_range(0, 1_000_000),
        "cache_aware: a cached member this many requests busier than the least busy yields")
    cache_balance_rel: float = setting(
        POOL, 1.5, "VLLM_POOL_CACHE_BALANCE_REL", "--pool-cache-balance-rel", parse.positive_float,
        "cache_aware: ... and busier than this many times (least busy + 1)")
    cache_balance_share: float = setting(
        POOL, 1.1, "VLLM_POOL_CACHE_BALANCE_SHARE", "--pool-cache-balance-share",
        parse.positive_float,
        "cache_aware: a cached member given more than this times the mean share of recent "
        "requests (plus the balance's abs) yields to a member under the mean")
    cache_balance_window: int = setting(
        POOL, 4096, "VLLM_POOL_CACHE_BALANCE_WINDOW", "--pool-cache-balance-window",
        parse.int_range(1, 1_000_000), "cache_aware: the pool's last requests counted for that share")
    cache_min_share: float = setting(
        POOL, 0.2, "VLLM_POOL_CACHE_MIN_SHARE", "--pool-cache-min-share", parse.ratio,
        "cache_aware: a cached prefix under this share of the prompt goes to the least busy")
    cache_tokens: int = setting(
        POOL, 65536, "VLLM_POOL_CACHE_TOKENS", "--pool-cache-tokens", parse.int_range(1, 1 << 31),
        "cache_aware: a member's cache size in tokens until its metrics say")
    cache_index_blocks: int = setting(
        POOL, 65536, "VLLM_POOL_CACHE_INDEX_BLOCKS", "--pool-cache-index-blocks",
        parse.int_range(1, 1 << 26),
        "cache_aware: blocks indexed per member from its KV-cache events (at least twice its "
        "block count)")
    cache_links_kept: int = setting(
        POOL, 100_000, "VLLM_POOL_CACHE_LINKS_KEPT", "--pool-cache-links-kept",
        parse.int_range(1, 1 << 26), "cache_aware: prompt-text pieces linked to token blocks (LRU)")
    # Admission from the engines' state (backends/pool/saturation.py; docs/pool.md#saturation)
    saturation_max_waiting: int | None = setting(
        POOL, None, "VLLM_POOL_SATURATION_MAX_WAITING", "--pool-saturation-max-waiting",
        parse.optional_int,
        "a member takes a request only while its vLLM's waiting requests, plus those this "
        "gateway sent it since its last reading, are below this; empty: off (docs/pool.md)")
    saturation_max_kv_cache_usage: float | None = setting(
        POOL, None, "VLLM_POOL_SATURATION_MAX_KV_CACHE_USAGE",
        "--pool-saturation-max-kv-cache-usage", parse.optional_fraction,
        "... and while its vllm:kv_cache_usage_perc (0-1) is below this; empty: not checked")
    saturation_scrape_interval: float = setting(
        POOL, 0.5, "VLLM_POOL_SATURATION_SCRAPE_SECONDS", "--pool-saturation-scrape-interval",
        parse.positive_float, "seconds between readings of each member's /metrics for that rule")
    saturation_stale_after: float = setting(
        POOL, 2.0, "VLLM_POOL_SATURATION_STALE_SECONDS", "--pool-saturation-stale-after",
        parse.positive_float,
        "a reading older than this is unknown: the member then takes at most "
        "saturation_unknown_limit requests in flight from this gateway; must exceed 1.25 x "
        "the scrape interval (readings come up to that far apart)")
    saturation_unknown_limit: int = setting(
        POOL, 1, "VLLM_POOL_SATURATION_UNKNOWN_LIMIT", "--pool-saturation-unknown-limit",
        parse.int_range(0, 1_000_000),
        "requests in flight from this gateway to a member whose engine state is unknown")
    # Not settings: fixed, and turned only by tests. Retries may be at most retry_budget_ratio of
    # the requests of the last retry_budget_window seconds, but retry_budget_min are always allowed.
    retry_budget_min: int = 3
    retry_budget_window: float = 10.0

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(
                f"pool routing must be one of {', '.join(ROUTINGS)}, not {self.routing!r}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or f.name == "routing" or value is None:
                continue
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"pool {f.name} must be a non-negative number, not {value!r}")
        if self.saturation_max_kv_cache_usage is not None and self.saturation_max_waiting is None:
            raise ValueError(
                "pool saturation_max_kv_cache_usage needs saturation_max_waiting: the waiting "
                "bound also bounds what is sent between two readings"
            )
        if self.max_outstanding is not None and self.max_outstanding < 1:
            raise ValueError("pool max_outstanding must be at least 1")
        if (
            self.health_interval <= 0
            or self.health_fail_threshold < 1
            or self.eject_after_failures < 1
        ):
            raise ValueError(
                "pool health_interval, health_fail_threshold and eject_after_failures "
                "must be positive"
            )

    def replace(self, **changes: Any) -> PoolSettings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Settings:
    """The gateway's configuration (``loading.load_settings`` builds it from the environment and
    the flags). Secrets stay out of ``repr``, and so out of every log line that prints it."""

    # Where requests go.
    backend_urls: tuple[str, ...] = setting(
        WHERE, ("http://127.0.0.1:8001",), "VLLM_BACKEND_URL", "--backend-url", parse.url_list,
        "vLLM OpenAI server URL; several, comma-separated, form a pool; empty with --embedded")
    use_embedded_engine: bool = setting(
        WHERE, False, "VLLM_USE_EMBEDDED_ENGINE", "--embedded", parse.boolean,
        "run an in-process vLLM AsyncLLM engine instead of calling a server")
    model: str | None = setting(
        WHERE, None, "VLLM_MODEL", "--model", parse.optional_str,
        "model for the embedded engine (a folder or a model name)")
    engine_args: tuple[str, ...] = setting(
        WHERE, (), "VLLM_ENGINE_ARGS", "--engine-args", parse.shell_words,
        "extra 'vllm serve' arguments for the embedded engine, e.g. '--max-model-len 4096'")
    model_aliases: Mapping[str, str] = setting(
        WHERE, {}, "VLLM_MODEL_ALIASES", "--model-aliases", parse.aliases,
        "comma-separated alias=model pairs, e.g. gpt-oss-20b=openai/gpt-oss-20b")
    backend_api_key: str | None = setting(
        WHERE, None, "VLLM_BACKEND_API_KEY", "--backend-api-key", parse.optional_str,
        "key the gateway sends to a backend started with --api-key", secret=True)
    # The gateway's process.
    host: str = setting(
        LISTEN, "0.0.0.0", "VLLM_HOST", "--host", parse.host, "gateway bind address")
    port: int = setting(
        LISTEN, 7000, "VLLM_PORT", "--port", parse.int_range(1, 65535), "gateway bind port")
    workers: int = setting(
        LISTEN, 1, "VLLM_WORKERS", "--workers", parse.int_range(1, 256), "gateway worker processes")
    shutdown_timeout: float = setting(
        LISTEN, 30.0, "VLLM_SHUTDOWN_TIMEOUT_SECONDS", "--shutdown-timeout", parse.positive_float,
        "drain deadline for in-flight requests on SIGTERM/SIGINT")
    # Admission.
    max_concurrent_requests: int = setting(
        ADMISSION, 100, "VLLM_MAX_CONCURRENT_REQUESTS", "--max-concurrent-requests",
        parse.int_range(1, 1_000_000), "in-flight requests (the semaphore)")
    max_queued_requests: int = setting(
        ADMISSION, 1000, "VLLM_MAX_QUEUED_REQUESTS", "--max-queued-requests",
        parse.int_range(0, 10_000_000), "requests that may wait for a slot; beyond it, 503 at once")
    queue_wait_timeout: float = setting(
        ADMISSION, 60.0, "VLLM_QUEUE_WAIT_TIMEOUT_SECONDS", "--queue-wait-timeout",
        parse.positive_float, "max wait for a slot, then 503")
    priority_scheduling: bool = setting(
        ADMISSION, False, "VLLM_PRIORITY_SCHEDULING", "--priority-scheduling", parse.boolean,
        "the backends run with --scheduling-policy priority: send each tenant's priority class "
        "as vLLM's request priority (docs/admission.md)")
    shed_low_priority: bool = setting(
        ADMISSION, False, "VLLM_SHED_LOW_PRIORITY", "--shed-low-priority", parse.boolean,
        "a full queue refuses its newest lowest-class waiter (503 shed) to take a higher class")
    queue_update_interval: float = setting(
        ADMISSION, 2.0, "VLLM_QUEUE_UPDATE_INTERVAL_SECONDS", "--queue-update-interval",
        parse.seconds_range(0.1, 60.0),
        "gap between queue comments to a stream that asked with X-Queue-Updates: 1")
    # Timeouts of one request.
    request_timeout: float = setting(
        TIMEOUTS, 120.0, "VLLM_REQUEST_TIMEOUT_SECONDS", "--request-timeout", parse.positive_float,
        "bound on one inference, first byte to last")
    first_token_timeout: float = setting(
        TIMEOUTS, 60.0, "VLLM_FIRST_TOKEN_TIMEOUT_SECONDS", "--first-token-timeout",
        parse.positive_float, "bound on the wait for the backend's first byte")
    stream_idle_timeout: float = setting(
        TIMEOUTS, 30.0, "VLLM_STREAM_IDLE_TIMEOUT_SECONDS", "--stream-idle-timeout",
        parse.positive_float, "bound on the gap between two chunks of a stream")
    connect_timeout: float = setting(
        TIMEOUTS, 5.0, "VLLM_CONNECT_TIMEOUT_SECONDS", "--connect-timeout", parse.positive_float,
        "bound on opening a connection to the backend")
    upstream_idle_timeout: float = setting(
        TIMEOUTS, 4.0, "VLLM_UPSTREAM_IDLE_TIMEOUT_SECONDS", "--upstream-idle-timeout",
        parse.positive_float,
        "how long an idle connection to the backend is kept; keep it below the backend's "
        "own keep-alive (vLLM: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default)")
    # Clients: who they are, what they may do.
    api_keys: frozenset[str] = setting(
        CLIENTS, frozenset(), "VLLM_API_KEYS", "--api-keys", parse.key_set,
        "comma-separated client API keys, each KEY[:TENANT[:PRIORITY]]; empty: no key needed",
        secret=True)
    admin_api_keys: frozenset[str] = setting(
        CLIENTS, frozenset(), "VLLM_ADMIN_API_KEYS", "--admin-api-keys", parse.key_set,
        "comma-separated keys that open vLLM's admin routes (/sleep, /wake_up, LoRA loading...); "
        "empty: those routes are closed. A client key never opens them", secret=True)
    response_id_secret: str | None = setting(
        CLIENTS, None, "VLLM_RESPONSE_ID_SECRET", "--response-id-secret", parse.optional_str,
        "key of the MAC in stored Responses' ids that names their tenant (the same on every "
        "replica); empty: one per tenant, derived from its API keys", secret=True)
    rate_limit_rpm: float | None = setting(
        CLIENTS, None, "VLLM_RATE_LIMIT_RPM", "--rate-limit-rpm", parse.optional_rate,
        "requests per minute allowed to each tenant (429 beyond); empty means no limit")
    rate_limit_tpm: float | None = setting(
        CLIENTS, None, "VLLM_RATE_LIMIT_TPM", "--rate-limit-tpm", parse.optional_rate,
        "tokens per minute allowed to each tenant (429 beyond); empty means no limit")
    redis_url: str | None = setting(  # may carry a password
        CLIENTS, None, "VLLM_REDIS_URL", "--redis-url", parse.redis_url,
        "Redis shared by gateway replicas for rate limits and results kept for an "
        "Idempotency-Key; per-replica without it",
        secret=True)
    idempotency_grace: float = setting(
        CLIENTS, 60.0, "VLLM_IDEMPOTENCY_GRACE_SECONDS", "--idempotency-grace",
        parse.positive_float,
        "how long a request's result stays for a retry with its Idempotency-Key, and how long "
        "a generation whose client left goes on with nobody reading it")
    idempotency_budget_bytes: int = setting(
        CLIENTS, 64 * 1024 * 1024, "VLLM_IDEMPOTENCY_BUDGET_BYTES",
        "--idempotency-budget-bytes", parse.int_range(0, 1 << 40),
        "bytes of kept results (stream events, answers) held at once; past it the oldest "
        "finished are evicted first; 0 turns Idempotency-Key off")
    idempotency_per_client_address: bool = setting(
        CLIENTS, False, "VLLM_IDEMPOTENCY_PER_CLIENT_ADDRESS",
        "--idempotency-per-client-address", parse.boolean,
        "without API keys, scope Idempotency-Keys per client address (default: one scope)")
    cors_origins: tuple[str, ...] = setting(
        CLIENTS, (), "VLLM_CORS_ORIGINS", "--cors-origins", parse.str_list,
        "comma-separated origins allowed by CORS; empty means CORS is off")
    trusted_proxies: tuple[str, ...] = setting(
        CLIENTS, (), "VLLM_TRUSTED_PROXIES", "--trusted-proxies", parse.networks,
        "comma-separated addresses or CIDR networks whose X-Forwarded-For is believed; "
        "empty: the peer's own address is the client's")
    # What a client or backend may make the gateway wait for or hold (docs/reliability.md).
    client_header_timeout: float = setting(
        BOUNDS, 10.0, "VLLM_CLIENT_HEADER_TIMEOUT_SECONDS", "--client-header-timeout",
        parse.positive_float,
        "bound on receiving a request's line and headers (from the connection's open or the "
        "request's first byte); then 408")
    client_body_timeout: float = setting(
        BOUNDS, 30.0, "VLLM_CLIENT_BODY_TIMEOUT_SECONDS", "--client-body-timeout",
        parse.positive_float, "bound on receiving a request's body after its headers; then 408")
    client_idle_timeout: float = setting(
        BOUNDS, 30.0, "VLLM_CLIENT_IDLE_TIMEOUT_SECONDS", "--client-idle-timeout",
        parse.positive_float, "how long an idle keep-alive client connection is kept")
    client_send_timeout: float = setting(
        BOUNDS, 30.0, "VLLM_CLIENT_SEND_TIMEOUT_SECONDS", "--client-send-timeout",
        parse.positive_float,
        "a client that takes nothing of what it is sent for this long is dropped, its request "
        "ended and its slot freed")
    max_connections: int = setting(
        BOUNDS, 4096, "VLLM_MAX_CONNECTIONS", "--max-connections", parse.int_range(1, 1_000_000),
        "open client connections; one more is answered 503 and closed at once")
    max_header_bytes: int = setting(
        BOUNDS, 32 * 1024, "VLLM_MAX_HEADER_BYTES", "--max-header-bytes",
        parse.int_range(1024, 1 << 20),
        "largest request line plus headers, and largest trailer section (431 beyond)")
    max_header_count: int = setting(
        BOUNDS, 100, "VLLM_MAX_HEADER_COUNT", "--max-header-count", parse.int_range(8, 10_000),
        "most header fields in a request, and most trailer fields (431 beyond)")
    max_body_bytes: int = setting(
        BOUNDS, 4 * 1024 * 1024, "VLLM_MAX_BODY_BYTES", "--max-body-bytes",
        parse.int_range(1024, 1 << 30), "largest request body accepted")
    max_upload_bytes: int = setting(
        BOUNDS, 25 * 1024 * 1024, "VLLM_MAX_UPLOAD_BYTES", "--max-upload-bytes",
        parse.int_range(1024, 1 << 32),
        "largest multipart upload (audio transcriptions and translations)")
    buffer_budget_bytes: int = setting(
        BOUNDS, 256 * 1024 * 1024, "VLLM_BUFFER_BUDGET_BYTES", "--buffer-budget-bytes",
        parse.int_range(1 << 20, 1 << 40),
        "bytes of request bodies and non-streamed backend bodies held at once, over all "
        "requests (503 beyond)")
    max_backend_body_bytes: int = setting(
        BOUNDS, 16 * 1024 * 1024, "VLLM_MAX_BACKEND_BODY_BYTES", "--max-backend-body-bytes",
        parse.int_range(1024, 1 << 32), "largest non-streamed backend answer (502 beyond)")
    model_check_timeout: float = setting(
        BOUNDS, 2.0, "VLLM_MODEL_CHECK_TIMEOUT_SECONDS", "--model-check-timeout",
        parse.positive_float,
        "longest a request waits for the backend's model list; after it the request goes on "
        "and the backend judges the model")
    # TLS to https:// backends.
    backend_ca_file: str | None = setting(
        TLS, None, "VLLM_BACKEND_CA_FILE", "--backend-ca-file", parse.readable_file,
        "PEM bundle of CAs to trust for https:// backends (default: the system's)")
    backend_client_cert: str | None = setting(
        TLS, None, "VLLM_BACKEND_CLIENT_CERT", "--backend-client-cert", parse.readable_file,
        "client certificate (PEM) the gateway presents to https:// backends that ask for one")
    backend_client_key: str | None = setting(
        TLS, None, "VLLM_BACKEND_CLIENT_KEY", "--backend-client-key", parse.readable_file,
        "the client certificate's key, when it is not in the certificate file")
    backend_tls_verify: bool = setting(
        TLS, True, "VLLM_BACKEND_TLS_VERIFY", "--backend-tls-verify", parse.boolean,
        "verify https:// backends' certificates and names (turn off only for a self-signed "
        "backend on a private network)")
    # A pool of backends (several VLLM_BACKEND_URLs, or a backends file); see docs/pool.md.
    backends_file: str | None = setting(
        POOL, None, "VLLM_BACKENDS_FILE", "--backends-file", parse.optional_str,
        "YAML or JSON file listing backends with weights and models (a pool); re-read when it "
        "changes and on SIGHUP")
    backends_file_poll: float = setting(
        POOL, 2.0, "VLLM_BACKENDS_FILE_POLL_SECONDS", "--backends-file-poll",
        parse.positive_float, "how often the backends file is checked for a change")
    backend_discovery: str | None = setting(
        POOL, None, "VLLM_BACKEND_DISCOVERY", "--backend-discovery", parse.discovery,
        "dns://NAME:PORT: the pool's members are NAME's A and AAAA records, re-resolved as "
        "their TTL says (docs/pool.md#members-from-dns)")
    backend_discovery_min_interval: float = setting(
        POOL, 1.0, "VLLM_BACKEND_DISCOVERY_MIN_INTERVAL_SECONDS", "--backend-discovery-min-interval",
        parse.positive_float, "shortest wait between two resolutions (a TTL below it is raised)")
    backend_discovery_max_interval: float = setting(
        POOL, 30.0, "VLLM_BACKEND_DISCOVERY_MAX_INTERVAL_SECONDS",
        "--backend-discovery-max-interval", parse.positive_float,
        "longest wait between two resolutions (a TTL above it is lowered)")
    backend_discovery_timeout: float = setting(
        POOL, 5.0, "VLLM_BACKEND_DISCOVERY_TIMEOUT_SECONDS", "--backend-discovery-timeout",
        parse.positive_float, "bound on one resolution; a failure keeps the last good members")
    backend_discovery_nameservers: tuple[str, ...] | None = setting(
        POOL, None, "VLLM_BACKEND_DISCOVERY_NAMESERVERS", "--backend-discovery-nameservers",
        parse.nameservers,
        "comma-separated ADDRESS[:PORT] of DNS servers to ask; empty: /etc/resolv.conf's")
    pool: PoolSettings = field(default_factory=PoolSettings, metadata=nested("pool_"))
    # Logs.
    log_level: str = setting(
        LOGS, "info", "VLLM_LOG_LEVEL", "--log-level",
        parse.choice("debug", "info", "warning", "error"), "log level")
    log_format: str = setting(
        LOGS, "text", "VLLM_LOG_FORMAT", "--log-format", parse.choice("text", "json"), "log format")

    @property
    def backend_url(self) -> str | None:
        """The first backend, for the single-backend setups of the seed."""
        return self.backend_urls[0] if self.backend_urls else None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# fmt: on


def _group_class(f: dataclasses.Field[Any]) -> type:
    group = f.default_factory
    assert isinstance(group, type), f"{f.name}: a group of settings is made by its class"
    return group


def _declared(cls: type, prefix: str = "", path: tuple[str, ...] = ()) -> Iterator[Setting]:
    defaults = cls()
    for f in fields(cls):
        if _NESTED in f.metadata:
            yield from _declared(_group_class(f), prefix + f.metadata[_NESTED], (*path, f.name))
        elif _SETTING in f.metadata:
            yield dataclasses.replace(
                f.metadata[_SETTING],
                name=prefix + f.name,
                path=(*path, f.name),
                default=getattr(defaults, f.name),
            )


# Every setting, in declaration order: what loading and --help read.
FIELDS: tuple[Setting, ...] = tuple(_declared(Settings))


def build(cls: type[T], values: Mapping[tuple[str, ...], Any], path: tuple[str, ...] = ()) -> T:
    """``cls`` (``Settings`` or a nested group) from parsed values keyed by path; absent: default."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        here = (*path, f.name)
        if _NESTED in f.metadata:
            kwargs[f.name] = build(_group_class(f), values, here)
        elif here in values:
            kwargs[f.name] = values[here]
    return cls(**kwargs)
