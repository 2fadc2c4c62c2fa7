"""Log lines peers cannot forge (S11): the text formatter keeps every record on one line whatever
its values hold, and a route's parameter never carries a line break to the backend."""

from __future__ import annotations

import logging
import sys

from vllm_gateway.observability.logs import TextFormatter
from vllm_gateway.observability.status import clip
from vllm_gateway.proxy.routes import match, target


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("vllm_gateway.access", logging.INFO, "x", 1, msg, args, info)


def test_a_record_is_one_line_whatever_its_values_hold() -> None:
    hostile = "m\n2031-01-01 INFO forged\r\x00\x1b[31m\x85\u2028\u2029end"
    line = TextFormatter().format(_record("request r1 model=%s tenant=%s", hostile, "t"))
    assert len(line.splitlines()) == 1
    assert "model=m\\x0a2031-01-01 INFO forged\\x0d\\x00\\x1b[31m\\x85\\u2028\\u2029end" in line
    assert line.endswith("tenant=t")
    plain = TextFormatter().format(_record("request r2 model=%s", "sim-model"))
    assert plain.endswith("vllm_gateway.access: request r2 model=sim-model")


def test_a_traceback_follows_its_escaped_line() -> None:
    text = TextFormatter().format(_record("failed on %s", "a\nb", exc=True))
    first, *rest = text.splitlines()
    assert first.endswith("failed on a\\x0ab")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def test_clip_bounds_a_client_s_value() -> None:
    assert clip(None) is None and clip("sim-model") == "sim-model"
    cut = clip("m" * (1 << 20))
    assert cut is not None and len(cut) < 300 and cut.endswith(f"...({(1 << 20) - 256} more)")


def test_a_route_parameter_is_the_whole_rest_of_the_path() -> None:
    assert match("/v1/responses/resp_1") is not None
    for path in ("/v1/responses/resp_1\n", "/v1/responses/resp_1\n/cancel", "/adapters/x\n"):
        assert match(path) is None, path
    found = match("/v1/responses/resp_1/cancel")
    assert found is not None
    assert target(*found) == "/v1/responses/resp_1/cancel"
    found = match("/adapters/lora-1")
    assert found is not None and target(*found) == "/adapters/lora-1"
    found = match("/v1/chat/completions")
    assert found is not None and target(*found) == "/v1/chat/completions"
