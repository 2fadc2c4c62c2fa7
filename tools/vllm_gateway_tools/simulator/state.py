"""The simulator's shared state: config, counters, recent request records, and the /metrics text.

``running`` is a live gauge (requests between arrival and their one recorded outcome) and survives
``reset``; the other counters and the records start again from zero. ``total`` counts every
generation request, so after traffic settles ``total == completed + aborted + failed + dropped``.
"""

from __future__ import annotations

import hmac
import time
from collections import deque
from typing import Any

from vllm_gateway_tools.simulator.config import SimulatorConfig

__all__ = ["RECORDS_KEPT", "SimState", "authorized", "prompt_tokens"]

RECORDS_KEPT = 500


class SimState:
    """Config, counters and recent request records, shared by every connection of one simulator."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.created = int(time.time())
        self.connections: set[Any] = set()  # the open SimProtocol connections
        self.running = 0
        self.running_by_model: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Zero the counters and forget the records; ``running`` is a live gauge and stays."""
        self.total = self.completed = self.aborted = self.failed = self.dropped = 0
        self.chunks = 0
        self.prompt_tokens: dict[str, int] = {}
        self.generation_tokens: dict[str, int] = {}
        self.records: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)

    def stats(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "total": self.total,
            "completed": self.completed,
            "aborted": self.aborted,
            "failed": self.failed,
            "dropped": self.dropped,
            "chunks": self.chunks,
            "connections": len(self.connections),
            "requests": [dict(r) for r in self.records],
        }

    def metrics(self) -> bytes:
        """Prometheus text with vLLM's metric names and labels (``model_name``, ``engine``)."""
        lines = []
        none: dict[str, int] = {}  # the simulator never queues: waiting is always 0
        gauges: tuple[tuple[str, str, str, dict[str, int]], ...] = (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", "gauge", self.running_by_model),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "gauge", none),
            ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", "counter", self.prompt_tokens),
            ("vllm:generation_tokens_total", "Number of generation tokens processed.", "counter", self.generation_tokens),
        )  # fmt: skip
        for name, help_text, kind, values in gauges:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for model in self.config.models:
                value = float(values.get(model, 0))
                lines.append(f'{name}{{model_name="{model}",engine="0"}} {value}')
        return ("\n".join(lines) + "\n").encode()


def authorized(headers: dict[str, str], key: str) -> bool:
    """vLLM's ``--api-key`` check: ``Authorization: Bearer <key>``, compared in constant time."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode())


def prompt_tokens(body: dict[str, Any], chat: bool) -> int | None:
    """A deterministic prompt size: about four characters a token. None when the prompt is missing."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        chars = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
        return max(1, (chars + 3) // 4 + 3 * len(messages))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return max(1, (len(prompt) + 3) // 4)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return max(1, sum((len(p) + 3) // 4 for p in prompt if isinstance(p, str)))
    return None
