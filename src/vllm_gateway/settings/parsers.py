"""The parsers of settings' values, and the one error they raise.

A parser takes the raw string and the name the user gave it by (a variable or a flag), and returns
the value or raises ``SettingsError`` naming that variable, in one line.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "Parser",
    "SettingsError",
    "aliases",
    "boolean",
    "check_key_entries",
    "choice",
    "discovery",
    "host",
    "int_range",
    "key_set",
    "nameservers",
    "networks",
    "optional_int",
    "optional_rate",
    "optional_str",
    "positive_float",
    "ratio",
    "readable_file",
    "redis_url",
    "shell_words",
    "str_list",
    "url",
    "url_list",
]

# A parser: (raw string, the variable or flag it came from) -> the value.
Parser = Callable[[str, str], Any]


class SettingsError(ValueError):
    """A setting has an invalid value; ``str()`` is one line naming the variable."""

    def __init__(self, variable: str, value: object, reason: str) -> None:
        self.variable = variable
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {variable}={value!r}: {reason}")


def positive_float(raw: str, var: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(var, raw, "must be a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(var, raw, "must be a positive number of seconds")
    return value


def seconds_range(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(raw: str, var: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(var, raw, f"must be seconds between {lo:g} and {hi:g}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise SettingsError(var, raw, f"must be seconds between {lo:g} and {hi:g}")
        return value

    return parse


def seconds(raw: str, var: str) -> float:
    """A number of seconds that may be 0 (0: off)."""
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(var, raw, "must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise SettingsError(var, raw, "must be 0 or a positive number of seconds")
    return value


def int_range(lo: int, hi: int) -> Callable[[str, str], int]:
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


def boolean(raw: str, var: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(var, raw, "must be true or false")


def url(raw: str, var: str) -> str:
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


def url_list(raw: str, var: str) -> tuple[str, ...]:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    return tuple(url(item, var) for item in items)


def str_list(raw: str, var: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def key_set(raw: str, var: str) -> frozenset[str]:
    entries = frozenset(str_list(raw, var))
    check_key_entries(entries, var)
    return entries


def check_key_entries(entries: frozenset[str], var: str) -> None:
    from vllm_gateway.identity import parse_key_entry

    for entry in entries:
        try:
            parse_key_entry(entry)
        except ValueError as exc:
            raise SettingsError(
                var, "<hidden>", f"has an entry KEY:TENANT:PRIORITY[:DEADLINE_MS] where {exc}"
            ) from None


def optional_rate(raw: str, var: str) -> float | None:
    if not raw.strip():
        return None
    return positive_float(raw, var)


def optional_int(raw: str, var: str) -> int | None:
    return int_range(1, 1_000_000)(raw, var) if raw.strip() else None


def ratio(raw: str, var: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(var, raw, "must be a number between 0 and 1") from None
    if not 0.0 <= value <= 1.0:
        raise SettingsError(var, raw, "must be a number between 0 and 1")
    return value


def optional_fraction(raw: str, var: str) -> float | None:
    """Empty: None; else a number in (0, 1]."""
    if not raw.strip():
        return None
    value = ratio(raw, var)
    if value <= 0.0:
        raise SettingsError(var, raw, "must be a number above 0 and at most 1, or empty")
    return value


def redis_url(raw: str, var: str) -> str | None:
    raw = raw.strip()
    if not raw:
        return None
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(var, raw, "must be a redis://, rediss:// or unix:// URL")
    return raw


def aliases(raw: str, var: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in str_list(raw, var):
        alias, sep, target = item.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise SettingsError(var, raw, "must be a comma-separated list of alias=model")
        out[alias.strip()] = target.strip()
    return out


def optional_str(raw: str, var: str) -> str | None:
    return raw.strip() or None


def choice(*choices: str) -> Callable[[str, str], str]:
    def parse(raw: str, var: str) -> str:
        low = raw.strip().lower()
        if low not in choices:
            raise SettingsError(var, raw, f"must be one of {', '.join(choices)}")
        return low

    return parse


def shell_words(raw: str, var: str) -> tuple[str, ...]:
    import shlex

    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise SettingsError(var, raw, f"is not a valid argument list ({exc})") from None


def networks(raw: str, var: str) -> tuple[str, ...]:
    import ipaddress

    items = str_list(raw, var)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SettingsError(var, raw, f"{item!r} is not an address or CIDR network") from None
    return items


def readable_file(raw: str, var: str) -> str | None:
    import os

    path = raw.strip()
    if not path:
        return None
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise SettingsError(var, raw, "is not a readable file")
    return path


def host(raw: str, var: str) -> str:
    if not raw.strip() or any(c.isspace() for c in raw.strip()):
        raise SettingsError(var, raw, "must be a host name or address")
    return raw.strip()


# A DNS name: labels of letters, digits, '-' and '_' (SRV-style and Kubernetes names), dot-separated.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def discovery(raw: str, var: str) -> str | None:
    """``dns://NAME:PORT``: the members are NAME's A and AAAA records, each at PORT. Empty: none."""
    text = raw.strip()
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme != "dns":
        raise SettingsError(var, raw, "must be dns://NAME:PORT (the only source is dns)")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise SettingsError(var, raw, "must be dns://NAME:PORT, with nothing after the port")
    name = (parts.hostname or "").rstrip(".")
    if len(name) > 253 or not name or not all(_LABEL.fullmatch(x) for x in name.split(".")):
        raise SettingsError(var, raw, "must name a DNS name: dns://NAME:PORT")
    try:
        port = parts.port
    except ValueError:
        raise SettingsError(var, raw, "has an invalid port") from None
    if port is None:
        raise SettingsError(var, raw, "must give the members' port: dns://NAME:PORT")
    return f"dns://{name}:{port}"


_SERVER = "ADDRESS[:PORT] (an IPv6 address in brackets: [fd00::a]:53)"


def nameservers(raw: str, var: str) -> tuple[str, ...] | None:
    """Comma-separated ``ADDRESS[:PORT]`` (an IPv6 address in brackets); empty: None."""
    out = []
    for item in str_list(raw, var):
        try:
            parts = urlsplit(f"//{item}")
            address = ipaddress.ip_address(parts.hostname or "")
            port = parts.port or 53
        except ValueError:
            raise SettingsError(var, raw, f"{item!r} is not {_SERVER}") from None
        if parts.path or parts.username or (address.version == 6 and not item.startswith("[")):
            raise SettingsError(var, raw, f"{item!r} is not {_SERVER}")
        out.append(f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}")
    return tuple(out) or None
