"""The access log: one line per ended request, logger ``vllm_gateway.access``, level INFO; and
one line per change of a pool member's lifecycle state (``member_state``), so that a request's
line can be read beside what its backend was doing.

``write`` builds the line's fields (the JSON formatter prints them; docs/observability.md names
each) and its text (the text formatter prints that). The observer calls it only when the logger is
enabled for INFO, so a gateway with the access log off builds nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_gateway.observability.status import clip
from vllm_gateway.proxy.record import CallRecord

__all__ = ["logger", "member_state", "write"]

logger = logging.getLogger("vllm_gateway.access")

_LINE = (
    "request %s %s %s %s model=%s backend=%s tenant=%s queue_wait_ms=%.1f ttft_ms=%s "
    "backend_ms=%s duration_ms=%.1f overhead_ms=%s chunks=%d tokens=%s/%s"
)


def _span_ms(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round((end - start) * 1000, 3)


def write(
    call: CallRecord,
    route: str,
    outcome: str,
    duration: float,
    ttft: float | None,
    prompt: int | None,
    completion: int | None,
    default_backend: str,
) -> None:
    """Log ``call``'s line; the other values are the observer's, computed once for the metrics."""
    # A model name is the client's: cut to a bound (the text formatter escapes what remains).
    model = clip(call.model)
    upstream_id = call.upstream_id
    overhead = call.overhead
    fields = {
        "request_id": call.request_id,
        "upstream_id": upstream_id,
        "tenant": call.tenant,
        "model": model,
        # Every member a failed-over stream used, in order; else the one that served.
        "backend": ",".join(call.members)
        if len(call.members) > 1
        else call.served_by or default_backend,
        "failovers": len(call.failovers),
        "route": route,
        "status": call.status,
        "outcome": outcome,
        "queue_wait_ms": round(call.queue_wait * 1000, 3),
        "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
        "backend_ms": _span_ms(call.upstream_sent_at, call.upstream_answered_at),
        "duration_ms": round(duration * 1000, 3),
        "overhead_ms": None if overhead is None else round(overhead * 1000, 3),
        "chunks": call.chunks,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
    }
    text = _LINE
    args: tuple[Any, ...] = ()
    if upstream_id is not None and upstream_id != call.request_id:
        # The client named the request: vLLM's logs know it by the gateway's id.
        text, args = _LINE + " upstream_id=%s", (upstream_id,)
    logger.info(
        text,
        call.request_id,
        route,
        call.status,
        outcome,
        model,
        fields["backend"],
        fields["tenant"],
        call.queue_wait * 1000,
        "-" if ttft is None else f"{ttft * 1000:.1f}",
        "-" if fields["backend_ms"] is None else f"{fields['backend_ms']:.1f}",
        duration * 1000,
        "-" if overhead is None else f"{overhead * 1000:.3f}",
        call.chunks,
        "-" if prompt is None else prompt,
        "-" if completion is None else completion,
        *args,
        extra=fields,
    )


def member_state(name: str, url: str, state: str, source: str, in_flight: int) -> None:
    """A pool member entered ``state`` (joining, ready, draining, ejected, gone)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    logger.info(
        "backend %s state=%s source=%s in_flight=%d",
        name,
        state,
        source,
        in_flight,
        extra={
            "event": "backend_state",
            "backend": name,
            "backend_url": url,
            "state": state,
            "source": source,
            "in_flight": in_flight,
        },
    )
