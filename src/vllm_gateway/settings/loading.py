"""Settings from the environment and the command line: the flags (``add_arguments``, grouped as
--help shows them), ``load_settings`` (defaults, then the environment, then the flags, then the
checks that span several settings) and ``env_names``.

Besides the declared settings there is one more input, ``VLLM_API_KEYS_FILE`` (``--api-keys-file``):
a file whose keys join ``api_keys``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from vllm_gateway.settings.declaration import CLIENTS, FIELDS, GROUPS, Settings, build
from vllm_gateway.settings.parsers import SettingsError, check_key_entries

__all__ = ["add_arguments", "env_names", "load_settings"]

_BY_NAME = {s.name: s for s in FIELDS}

# The keys file: an input of api_keys, not a setting of its own.
_KEYS_FILE_ENV = "VLLM_API_KEYS_FILE"
_KEYS_FILE_FLAG = "--api-keys-file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting, under its group's heading; every flag defaults to None so that
    'not given' is visible."""
    groups = {g: parser.add_argument_group(g.title, g.description) for g in GROUPS}
    for s in FIELDS:
        groups[s.group].add_argument(
            s.flag,
            dest=s.name,
            default=None,
            metavar=s.env,
            help=f"{s.help} (env {s.env}; default {_shown(s.default)})",
        )
        if s.name == "api_keys":
            groups[CLIENTS].add_argument(
                _KEYS_FILE_FLAG,
                dest="api_keys_file",
                default=None,
                metavar=_KEYS_FILE_ENV,
                help=f"file of client API keys, one per line (env {_KEYS_FILE_ENV}; default none)",
            )


def _shown(value: Any) -> str:
    """A default as ``--help`` shows it."""
    if value is None or (isinstance(value, tuple | frozenset | dict | str) and not value):
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
    values: dict[tuple[str, ...], Any] = {}
    for s in FIELDS:
        raw = env.get(s.env)
        where = s.env
        if flags is not None and flags.get(s.name) is not None:
            raw, where = flags[s.name], s.flag
        if raw is None:
            continue
        values[s.path] = s.parse(str(raw), where)

    keys_file = (flags or {}).get("api_keys_file") or env.get(_KEYS_FILE_ENV)
    if keys_file:
        given = frozenset(values.get(("api_keys",), frozenset()))
        values[("api_keys",)] = given | _read_keys_file(keys_file)

    if values.get(("use_embedded_engine",)) and ("backend_urls",) not in values:
        values[("backend_urls",)] = ()
    if ("pool", "saturation_max_kv_cache_usage") in values and (
        "pool",
        "saturation_max_waiting",
    ) not in values:
        raise SettingsError(
            _name_of("pool_saturation_max_kv_cache_usage", flags or {}),
            values[("pool", "saturation_max_kv_cache_usage")],
            "needs VLLM_POOL_SATURATION_MAX_WAITING too (it also bounds what is sent between "
            "two readings of a member's metrics)",
        )
    settings = build(Settings, values)
    _validate(settings, env, flags or {})
    return settings


def _read_keys_file(path: str) -> frozenset[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise SettingsError(_KEYS_FILE_ENV, path, f"cannot be read ({exc.strerror})") from None
    entries = frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    check_key_entries(entries, _KEYS_FILE_ENV)
    return entries


def _validate(s: Settings, env: Mapping[str, str], flags: Mapping[str, str | None]) -> None:
    if s.use_embedded_engine:
        if s.workers > 1:
            raise SettingsError(
                _name_of("workers", flags),
                s.workers,
                "must be 1 with the embedded engine (each worker would load the model)",
            )
        if s.backend_discovery is not None:
            raise SettingsError(
                _name_of("backend_discovery", flags),
                s.backend_discovery,
                "must be empty when the embedded engine is on",
            )
        if s.backend_urls:
            raise SettingsError(
                _name_of("backend_urls", flags),
                ",".join(s.backend_urls),
                "must be empty when the embedded engine is on",
            )
    elif s.backend_discovery is not None:
        _check_discovery(s, env, flags)
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
    pool = s.pool
    if pool.saturation_max_waiting is not None and (
        pool.saturation_stale_after <= _SCRAPE_JITTER * pool.saturation_scrape_interval
    ):
        # Readings come up to 1.25 intervals apart: a shorter bound would make every member
        # unknown between two readings.
        raise SettingsError(
            _name_of("pool_saturation_stale_after", flags),
            pool.saturation_stale_after,
            f"must exceed {_SCRAPE_JITTER:g} x VLLM_POOL_SATURATION_SCRAPE_SECONDS "
            f"({pool.saturation_scrape_interval:g}): readings come up to that far apart",
        )
    if not s.use_embedded_engine and s.backend_discovery is None:
        _check_port_clash(s, flags)


def _check_discovery(s: Settings, env: Mapping[str, str], flags: Mapping[str, str | None]) -> None:
    """Discovery is the pool's one source of members: a URL list or a file beside it is a mistake."""
    where = _name_of("backend_discovery", flags)
    for other in ("backend_urls", "backends_file"):
        if flags.get(other) is not None or env.get(_BY_NAME[other].env):
            raise SettingsError(
                where,
                s.backend_discovery,
                f"names the pool's members; unset {_name_of(other, flags)}, which names them too",
            )
    if s.backend_discovery_min_interval > s.backend_discovery_max_interval:
        raise SettingsError(
            _name_of("backend_discovery_min_interval", flags),
            s.backend_discovery_min_interval,
            "must not exceed VLLM_BACKEND_DISCOVERY_MAX_INTERVAL_SECONDS "
            f"({s.backend_discovery_max_interval:g})",
        )


_SCRAPE_JITTER = 1.25  # the saturation readings' spread (backends/pool/saturation.py)

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
    s = _BY_NAME[name]
    return s.flag if flags.get(name) is not None else s.env


def env_names() -> Sequence[str]:
    """Every environment variable the gateway reads."""
    return [s.env for s in FIELDS] + [_KEYS_FILE_ENV]
