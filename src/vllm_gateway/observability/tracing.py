"""Optional OpenTelemetry traces: one trace per request, built after the request has ended.

Imported only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (see ``compose._tracer``), so a gateway
without it pays nothing, not even the import. When on, nothing runs on the hot path either: the
observer rebuilds the spans from the timestamps the call already carries, with explicit start and
end times, once the request is over:

    gateway.request   arrival -> end                  (attributes: id, route, model, status, ...)
    ├── queue         upstream send - queue wait -> upstream send   (needs ``upstream_sent_at``)
    ├── upstream      upstream send -> first byte     (needs ``upstream_sent_at``)
    └── stream        first byte -> end               (when a first byte went out)

A client's W3C ``traceparent`` header, when present, makes the request span its child. Export
is batched by the SDK's ``BatchSpanProcessor`` (OTLP over HTTP, or gRPC when
``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``); the exporter reads the standard ``OTEL_*`` variables.
"""

from __future__ import annotations

import os
import time
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

from vllm_gateway.observability.status import clip
from vllm_gateway.proxy.record import CallRecord

__all__ = ["TracingObserver"]


def _default_provider() -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").startswith("grpc"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "vllm-gateway")}
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class TracingObserver:
    """A ``gateway.observers`` member that turns each ended request into spans."""

    def __init__(self, backend: str, provider: Any = None) -> None:
        self._provider = provider if provider is not None else _default_provider()
        self._tracer = self._provider.get_tracer("vllm_gateway")
        self._backend = backend
        # perf_counter -> epoch nanoseconds, fixed once (both clocks are monotonic enough for
        # the length of one request).
        self._offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)

    def _ns(self, t: float) -> int:
        return self._offset_ns + int(t * 1e9)

    def request_ended(self, call: CallRecord) -> None:
        end = call.ended_at or time.perf_counter()
        parent = None
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in call.request_headers
            if k in (b"traceparent", b"tracestate")
        }
        if carrier:
            parent = propagate.extract(carrier)
        attrs = {
            "vllm_gateway.request_id": call.request_id,
            "http.route": clip(call.path),  # a refused request's path is the client's
            "http.response.status_code": call.status,
            "vllm_gateway.outcome": call.outcome,
            "vllm_gateway.stream": bool(call.stream),
            "vllm_gateway.chunks": call.chunks,
            "vllm_gateway.queue_wait_s": call.queue_wait,
            "vllm_gateway.backends.base": self._backend,
        }
        if call.model:
            attrs["gen_ai.request.model"] = clip(call.model)
        tenant = call.tenant
        if tenant:
            attrs["vllm_gateway.tenant"] = str(tenant)
        root = self._tracer.start_span(
            "gateway.request",
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=self._ns(call.started_at),
            attributes=attrs,
        )
        if call.outcome != "completed":
            root.set_status(Status(StatusCode.ERROR, call.outcome))
        ctx = trace.set_span_in_context(root)
        sent = call.upstream_sent_at
        first = call.first_byte_at
        if sent is not None:
            self._child("queue", ctx, sent - call.queue_wait, sent)
            self._child("upstream", ctx, sent, first if first is not None else end)
        if first is not None:
            self._child("stream" if call.stream else "response", ctx, first, end)
        root.end(end_time=self._ns(end))

    def _child(self, name: str, ctx: Any, start: float, end: float) -> None:
        span = self._tracer.start_span(name, context=ctx, start_time=self._ns(start))
        span.end(end_time=self._ns(max(start, end)))

    def close(self) -> None:
        shutdown = getattr(self._provider, "shutdown", None)
        if callable(shutdown):
            shutdown()
