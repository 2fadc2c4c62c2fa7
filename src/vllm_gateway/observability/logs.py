"""Log configuration: human-readable lines for a terminal, or one JSON object per line.

Called once by the CLI. Library code only uses ``logging.getLogger("vllm_gateway...")``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from vllm_gateway.settings import Settings

__all__ = ["JSONFormatter", "configure_logging"]

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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = getattr(logging, settings.log_level.upper())
    for name in ("vllm_gateway", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
    root.setLevel(level)
