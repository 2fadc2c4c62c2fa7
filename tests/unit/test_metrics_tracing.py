"""The optional OpenTelemetry observer: spans rebuilt from a finished call's timestamps."""

from __future__ import annotations

import time

import pytest

from tests.unit.test_metrics import FakeCall

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from vllm_gateway.observability.tracing import TracingObserver


def traced() -> tuple[TracingObserver, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return TracingObserver("b0", provider), exporter


def test_spans_follow_the_call_timestamps_and_join_the_client_trace() -> None:
    tracer, exporter = traced()
    start = time.perf_counter() - 3.0
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    call = FakeCall(
        started_at=start,
        upstream_sent_at=start + 1.0,
        queue_wait=0.75,
        first_byte_at=start + 1.5,
        ended_at=start + 2.5,
        chunks=9,
        request_headers=[(b"traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode())],
    )
    tracer.request_ended(call)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"gateway.request", "queue", "upstream", "stream"}
    root = spans["gateway.request"]
    assert format(root.context.trace_id, "032x") == trace_id
    assert root.attributes is not None
    assert root.attributes["vllm_gateway.request_id"] == "req-1"
    for name, seconds in (
        ("gateway.request", 2.5),
        ("queue", 0.75),
        ("upstream", 0.5),
        ("stream", 1.0),
    ):
        span = spans[name]
        assert span.end_time is not None and span.start_time is not None
        assert (span.end_time - span.start_time) / 1e9 == pytest.approx(seconds, abs=1e-3)
        if name != "gateway.request":
            assert span.parent is not None and span.parent.span_id == root.context.span_id


def test_a_failed_call_marks_the_request_span_as_an_error() -> None:
    tracer, exporter = traced()
    tracer.request_ended(FakeCall(outcome="queue_timeout", status=503, admitted=False))
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR"
    assert span.status.description == "queue_timeout"


def test_tracing_is_off_and_unimported_without_an_endpoint() -> None:
    import subprocess
    import sys

    code = (
        "import os, sys; os.environ.pop('OTEL_EXPORTER_OTLP_ENDPOINT', None);"
        "from vllm_gateway.compose import create_app; from vllm_gateway.settings import Settings;"
        "create_app(Settings());"
        "print('vllm_gateway.observability.tracing' in sys.modules, 'opentelemetry' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False", "False"]
