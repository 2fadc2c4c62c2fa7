"""What a pool of backends is made of: its members (``BackendSpec``) and its knobs (``PoolConfig``).

Members come either from ``Settings.backend_urls`` (weight 1, models learned from each member's
``/v1/models``) or from a backends file (``load_backends_file``), YAML or JSON, that may give each
member a weight, the models it serves and its own limit on outstanding requests::

    backends:
      - url: http://10.0.0.1:8000
        weight: 2            # relative capacity (default 1)
        models: [llama-70b]  # declared: never asked; absent: learned from /v1/models
        max_outstanding: 64  # optional per-member admission limit
        kv_events: auto      # cache_aware routing: auto (default), off, or tcp://host:port
      - url: http://10.0.0.2:8000

A bare list of such entries (or of URL strings) is accepted too. Every value is checked here and a
bad file raises ``ValueError`` naming the entry, so the pool can trust what it is handed.

The knobs, ``PoolConfig``, are the pool's settings group itself (``PoolSettings``, read as
``settings.pool``): each maps to a variable ``VLLM_POOL_*`` and a flag ``--pool-*`` (docs/pool.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vllm_gateway.settings import ROUTINGS, PoolSettings

__all__ = [
    "ROUTINGS",
    "BackendSpec",
    "PoolConfig",
    "load_backends_file",
    "parse_backends_text",
    "specs_from_urls",
]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    url: str
    weight: float = 1.0
    models: tuple[str, ...] | None = None  # None: learn them from the member's /v1/models
    name: str | None = None
    max_outstanding: int | None = None  # None: the pool's default (which may be None: no limit)
    kv_events: str = "auto"  # cache_aware: "auto" (ask /kv_event_sources), "off", or tcp://...


# The pool's knobs are its settings group, declared once with their variables and flags
# (settings/declaration.py); ``settings.pool`` is the config a pool built from settings takes.
PoolConfig = PoolSettings


def specs_from_urls(urls: tuple[str, ...] | list[str]) -> list[BackendSpec]:
    return [BackendSpec(url=u.rstrip("/")) for u in urls]


def load_backends_file(path: str | Path) -> list[BackendSpec]:
    """Parse a backends file (JSON if it parses as JSON or ends in .json, else YAML)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"backends file {p}: cannot be read ({exc.strerror})") from None
    return parse_backends_text(text, str(p))


def parse_backends_text(text: str, path: str) -> list[BackendSpec]:
    """A backends file's contents, parsed and checked (``ValueError`` naming the entry)."""
    p = Path(path)
    data: Any
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"backends file {p}: invalid JSON ({exc})") from None
    else:
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is a dependency of the pool
            raise ValueError(f"backends file {p}: YAML needs the pyyaml package") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"backends file {p}: invalid YAML ({exc})") from None
    return parse_backends(data, str(p))


def parse_backends(data: Any, where: str = "backends") -> list[BackendSpec]:
    if isinstance(data, Mapping):
        data = data.get("backends")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where}: expected a non-empty list of backends (or {{backends: [...]}})")
    specs = [_parse_entry(entry, f"{where}: backend #{i + 1}") for i, entry in enumerate(data)]
    names = [s.name or s.url for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: backend names/urls must be unique")
    return specs


def _parse_entry(entry: Any, where: str) -> BackendSpec:
    if isinstance(entry, str):
        entry = {"url": entry}
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a URL or a mapping with 'url'")
    unknown = set(entry) - {"url", "weight", "models", "name", "max_outstanding", "kv_events"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    url = entry.get("url")
    if not isinstance(url, str):
        raise ValueError(f"{where}: 'url' must be an http:// or https:// URL with a host")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: 'url' must be an http:// or https:// URL with a host")
    weight = entry.get("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not (math.isfinite(weight) and weight > 0)
    ):
        raise ValueError(f"{where}: 'weight' must be a positive number")
    models = entry.get("models")
    if models is not None:
        if isinstance(models, str):
            models = [models]
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and m for m in models)
        ):
            raise ValueError(f"{where}: 'models' must be a non-empty list of model names")
        models = tuple(models)
    limit = entry.get("max_outstanding")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{where}: 'max_outstanding' must be a positive integer")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"{where}: 'name' must be a non-empty string")
    kv_events = entry.get("kv_events", "auto")
    if kv_events is False:
        kv_events = "off"
    if not isinstance(kv_events, str) or not (
        kv_events in ("auto", "off") or re.fullmatch(r"tcp://[^\s/]+:\d+", kv_events)
    ):
        raise ValueError(f"{where}: 'kv_events' must be auto, off or tcp://HOST:PORT")
    return BackendSpec(
        url=url.rstrip("/"),
        weight=float(weight),
        models=models,
        name=name,
        max_outstanding=limit,
        kv_events=kv_events,
    )
