"""The simulator's knobs: one frozen ``SimulatorConfig`` and the rules for changing it.

A config is never mutated. ``POST /sim/config`` and ``Simulator.configure`` build a new one with
``SimulatorConfig.updated``; a request's ``"vllm_sim": {...}`` body field builds a per-request copy
with ``SimulatorConfig.overridden``, which accepts only the pace and fault knobs (the served models,
the API key, the context length, the runner and the optional features belong to the server, not to
one request). Every value is checked here, so the server code can trust the config it is handed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MALFORMED_KINDS",
    "PER_REQUEST_KNOBS",
    "RUNNERS",
    "ConfigError",
    "SimulatorConfig",
]

MALFORMED_KINDS = ("html", "bad_json", "no_done", "huge_line")
# What a vLLM server is started as: a generate model or a pooling one; never both.
RUNNERS = ("generate", "pooling")

# The knobs a single request may override through its "vllm_sim" body field.
PER_REQUEST_KNOBS = frozenset(
    {
        "ttft",
        "itl",
        "tokens",
        "status",
        "error_traceback",
        "hang",
        "stall_after",
        "drop_after",
        "malformed",
        "huge_line_bytes",
    }
)


class ConfigError(ValueError):
    """A knob has an unknown name or a value of the wrong kind."""


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Everything that decides how the simulator answers.

    Pace: the first content chunk goes out ``ttft`` seconds after the request, then one chunk per
    token every ``itl`` seconds; a request without ``max_tokens`` gets ``tokens`` tokens.
    Faults (all off by default): see docs/simulator.md for what each one sends.
    Server shape: ``runner`` picks the route family (generate or pooling), ``dev_mode`` stands for
    ``VLLM_SERVER_DEV_MODE=1`` (plus runtime LoRA updating), ``responses_store`` for
    ``VLLM_ENABLE_RESPONSES_API_STORE=1``.
    Prefix cache (off while ``prefix_cache_blocks`` is 0; see ``simulator.prefix_cache``): an LRU
    cache of ``prefix_cache_blocks`` blocks of ``block_size`` prompt tokens; a chat or completions
    request's TTFT grows by ``prefill_per_token`` seconds per prompt token it does not find cached.
    ``kv_events_port`` (None: off; 0: any free port) publishes vLLM's KV-cache events on a ZMQ PUB
    socket bound on 127.0.0.1, under ``kv_events_topic`` (``simulator.kv_events``).
    Capacity (off while ``max_num_seqs`` is 0): at most ``max_num_seqs`` engine requests run at
    once, as vLLM's ``--max-num-seqs``; the others wait in arrival order (``engine.py``).
    """

    models: tuple[str, ...] = ("sim-model",)
    max_model_len: int = 4096
    api_key: str | None = None
    ttft: float = 0.05
    itl: float = 0.02
    tokens: int = 16
    status: int | None = None
    error_traceback: bool = False
    hang: bool = False
    stall_after: int | None = None
    drop_after: int | None = None
    malformed: str | None = None
    huge_line_bytes: int = 4 * 1024 * 1024
    unhealthy: bool = False
    runner: str = "generate"
    dev_mode: bool = False
    responses_store: bool = True
    prefix_cache_blocks: int = 0
    block_size: int = 16
    prefill_per_token: float = 0.0
    kv_events_port: int | None = None
    kv_events_topic: str = ""
    max_num_seqs: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.models, str):
            object.__setattr__(self, "models", _split_models(self.models))
        else:
            object.__setattr__(self, "models", _split_models(",".join(self.models)))
        if not self.models:
            raise ConfigError("models: at least one model name is needed")
        _check_number("ttft", self.ttft)
        _check_number("itl", self.itl)
        _check_int("tokens", self.tokens, minimum=1)
        _check_int("max_model_len", self.max_model_len, minimum=1)
        _check_int("huge_line_bytes", self.huge_line_bytes, minimum=1)
        if self.status is not None:
            _check_int("status", self.status, minimum=100)
            if self.status > 599:
                raise ConfigError("status: must be an HTTP status between 100 and 599")
        for name in ("stall_after", "drop_after"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=0)
        for name in ("error_traceback", "hang", "unhealthy", "dev_mode", "responses_store"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false")
        if self.malformed is not None and self.malformed not in MALFORMED_KINDS:
            raise ConfigError(f"malformed: must be one of {', '.join(MALFORMED_KINDS)} or null")
        if self.runner not in RUNNERS:
            raise ConfigError(f"runner: must be one of {', '.join(RUNNERS)}")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise ConfigError("api_key: must be a string or null")
        _check_int("prefix_cache_blocks", self.prefix_cache_blocks, minimum=0)
        _check_int("block_size", self.block_size, minimum=1)
        _check_number("prefill_per_token", self.prefill_per_token)
        _check_int("max_num_seqs", self.max_num_seqs, minimum=0)
        if self.kv_events_port is not None:
            _check_int("kv_events_port", self.kv_events_port, minimum=0)
            if self.kv_events_port > 65535:
                raise ConfigError("kv_events_port: must be a TCP port (0 picks a free one)")
        if not isinstance(self.kv_events_topic, str):
            raise ConfigError("kv_events_topic: must be a string")

    def updated(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """A copy with ``changes`` applied; any knob may change. Raises ``ConfigError``."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown knob(s): {', '.join(sorted(unknown))}")
        try:
            return dataclasses.replace(self, **dict(changes))
        except TypeError as exc:  # pragma: no cover - replace() only raises this for bad names
            raise ConfigError(str(exc)) from None

    def overridden(self, changes: Any) -> SimulatorConfig:
        """A copy for one request, from its ``vllm_sim`` field. Raises ``ConfigError``."""
        if not isinstance(changes, Mapping):
            raise ConfigError("vllm_sim: must be a JSON object")
        unknown = set(changes) - PER_REQUEST_KNOBS
        if unknown:
            raise ConfigError(
                f"vllm_sim: unknown or server-only knob(s): {', '.join(sorted(unknown))}"
            )
        return self.updated(changes) if changes else self

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["models"] = list(self.models)
        return out


def _split_models(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _check_number(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"{name}: must be a finite number of seconds >= 0")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}")
