"""Log configuration: human-readable lines for a terminal, or one JSON object per line.

Called once by the CLI. Library code only uses ``logging.getLogger("vllm_gateway...")``.

Log lines carry values peers chose (a model name, a path, a header), so a line must not be able
to end early: the text formatter escapes every control character and Unicode line break in a
record's line (``\n`` becomes ``\x0a``), and JSON escapes them by itself. Only a traceback,
which follows the line, keeps its lines.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

from vllm_gateway.settings import Settings

__all__ = ["JSONFormatter", "TextFormatter", "configure_logging", "escape_line"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# C0 controls and DEL, C1 controls, and what some readers take for a line break (U+2028/9).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_line(text: str) -> str:
    """``text`` as one line: every control character and line break escaped."""
    return _UNSAFE.sub(_escaped, text)


class TextFormatter(logging.Formatter):
    """One readable line per record, whatever its values hold (a traceback follows it)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_line(super().formatMessage(record))


# Attributes every LogRecord has; anything else was passed with ``extra=`` and is kept.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = getattr(logging, settings.log_level.upper())
    for name in ("vllm_gateway", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
    root.setLevel(level)
