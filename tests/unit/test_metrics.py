"""Metrics primitives, the exposition format, usage parsing and the observer's arithmetic."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import orjson
import pytest

from vllm_gateway.backends.base import Backend, BackendStats, UpstreamRequest, UpstreamResponse
from vllm_gateway.errors import Unauthorized
from vllm_gateway.observability.health import BackendHealth
from vllm_gateway.observability.logs import JSONFormatter
from vllm_gateway.observability.metrics import OUTCOMES, GatewayMetrics
from vllm_gateway.observability.observer import Observer
from vllm_gateway.observability.prometheus import Counter, Gauge, Histogram, Registry, format_value
from vllm_gateway.observability.status import StatusBoard
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.record import RejectedCall
from vllm_gateway.proxy.usage import parse_usage
from vllm_gateway.settings import Settings

CHAT = "/v1/chat/completions"


class FakeCall:
    """A ``CallRecord``: the fields a finished ProxyCall carries."""

    def __init__(self, **fields: Any) -> None:
        now = time.perf_counter()
        self.request_id = "req-1"
        self.upstream_id: str | None = None
        self.path = CHAT
        self.model = "m"
        self.tenant: str | None = None
        self.stream = True
        self.status = 200
        self.outcome = "completed"
        self.queue_wait = 0.0
        self.overhead: float | None = None
        self.chunks = 0
        self.admitted = True
        self.usage: Any = None
        self.started_at = now
        self.first_byte_at: float | None = None
        self.ended_at: float | None = None
        self.upstream_sent_at: float | None = None
        self.upstream_answered_at: float | None = None
        self.served_by: str | None = None
        self.request_headers: list[tuple[bytes, bytes]] = []
        self.failovers: list[tuple[str, str]] = []
        self.members: list[str] = []
        self.__dict__.update(fields)


class IdleBackend(Backend):
    name = "b0"

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        raise NotImplementedError

    async def check_health(self, timeout: float) -> bool:
        return True


class PoolLike(IdleBackend):
    def stats(self) -> list[BackendStats]:
        return [
            {
                "name": "a",
                "in_flight": 2,
                "healthy": True,
                "errors": {"backend_unavailable": 3},
                "ejections": 1,
            },
            {"name": "b", "in_flight": 0, "healthy": False, "errors": {}, "ejections": 4},
        ]


def make_observer(backend: Backend | None = None) -> Observer:
    gw = Gateway(Settings(), backend or IdleBackend())
    health = BackendHealth(gw.backend.check_health, timeout=1.0)
    return Observer(gw, GatewayMetrics(gw, health), StatusBoard(gw))


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of an exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# --- primitives and format ---------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_le_is_inclusive() -> None:
    h = Histogram("x_seconds", "help", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    got = samples("\n".join(h.render()))
    assert got['x_seconds_bucket{le="0.1"}'] == 2  # 0.05 and exactly 0.1
    assert got['x_seconds_bucket{le="1"}'] == 4
    assert got['x_seconds_bucket{le="+Inf"}'] == 5
    assert got["x_seconds_count"] == 5
    assert got["x_seconds_sum"] == pytest.approx(8.65)


def test_counter_children_and_label_escaping() -> None:
    c = Counter("c_total", "a\nhelp", ("k",))
    c.labels('a"b\\c\nd').inc(2)
    c.labels("plain").inc()
    text = "\n".join(c.render())
    assert "# HELP c_total a\\nhelp" in text
    assert 'c_total{k="a\\"b\\\\c\\nd"} 2' in text
    assert 'c_total{k="plain"} 1' in text
    with pytest.raises(ValueError):
        c.labels("one", "two")


def test_registry_rejects_a_second_metric_of_the_same_name() -> None:
    r = Registry()
    r.register(Counter("dup_total", "h"))
    with pytest.raises(ValueError):
        r.register(Gauge("dup_total", "h", list))


def test_format_value_special_values() -> None:
    assert format_value(math.inf) == "+Inf"
    assert format_value(math.nan) == "NaN"
    assert format_value(3.0) == "3"
    assert format_value(0.25) == "0.25"


def test_exposition_parses_with_the_reference_parser() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    obs = make_observer(PoolLike())
    obs.request_ended(FakeCall(first_byte_at=time.perf_counter(), chunks=3))
    families = {f.name: f for f in parser.text_string_to_metric_families(obs.metrics.render())}
    # The reference parser strips _total from counter family names.
    for name in (
        "vllm_gateway_requests",
        "vllm_gateway_requests_in_flight",
        "vllm_gateway_queue_depth",
        "vllm_gateway_draining",
        "vllm_gateway_admission_limit",
        "vllm_gateway_queue_wait_seconds",
        "vllm_gateway_time_to_first_token_seconds",
        "vllm_gateway_inter_token_latency_seconds",
        "vllm_gateway_request_duration_seconds",
        "vllm_gateway_overhead_seconds",
        "vllm_gateway_tokens",
        "vllm_gateway_backend_in_flight",
        "vllm_gateway_backend_errors",
        "vllm_gateway_backend_healthy",
        "vllm_gateway_backend_ejections",
    ):
        assert name in families, name
    assert families["vllm_gateway_queue_wait_seconds"].type == "histogram"
    assert families["vllm_gateway_backend_errors"].type == "counter"


# --- usage -------------------------------------------------------------------------------------


def test_parse_usage_from_last_stream_event_body_and_dict() -> None:
    event = (
        b'data: {"choices":[],"usage":{"prompt_tokens":12,"total_tokens":112,'
        b'"completion_tokens":100,"prompt_tokens_details":null}}\n\n'
    )
    assert parse_usage(event) == (12, 100)
    body = orjson.dumps(
        {
            "choices": [{"message": {"content": "x"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7},
        }
    )
    assert parse_usage(body) == (5, 7)
    assert parse_usage({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}) == (1, 2)
    assert parse_usage({"prompt_tokens": 3}) == (3, None)
    assert parse_usage(b'data: {"choices":[],"usage":null}\n\n') == (None, None)
    assert parse_usage(b'{"prompt_tokens": "x"}') == (None, None)
    assert parse_usage(None) == (None, None)


# --- the observer ------------------------------------------------------------------------------


def test_observer_counts_a_completed_stream_with_ttft_itl_tokens_and_overhead() -> None:
    obs = make_observer()
    start = time.perf_counter() - 2.0
    call = FakeCall(
        started_at=start,
        first_byte_at=start + 0.5,
        ended_at=start + 1.5,
        chunks=11,
        queue_wait=0.2,
        upstream_sent_at=start + 0.201,
        overhead=0.001,
        usage=b'data: {"usage":{"prompt_tokens":4,"completion_tokens":10}}\n\n',
    )
    obs.request_ended(call)
    m = obs.metrics
    assert m.requests.value(CHAT, "200", "completed") == 1
    ttft = m.ttft.child()
    assert ttft is not None and ttft.sum == pytest.approx(0.5)
    itl = m.itl.child()
    assert itl is not None and itl.count == 1 and itl.sum == pytest.approx(0.1)  # 1.0 s / 10 gaps
    dur = m.duration.child(CHAT)
    assert dur is not None and dur.sum == pytest.approx(1.5)
    qw = m.queue_wait.child()
    assert qw is not None and qw.sum == pytest.approx(0.2)
    over = m.overhead.child()
    assert over is not None and over.sum == pytest.approx(0.001, abs=1e-9)
    assert m.tokens.value("prompt") == 4
    assert m.tokens.value("completion") == 10


def test_observer_maps_unknown_outcome_and_route_to_fixed_labels() -> None:
    obs = make_observer()
    obs.request_ended(FakeCall(outcome="something_new", path="/v1/other", status=500))
    assert obs.metrics.requests.value("other", "500", "other") == 1
    assert {
        "completed",
        "queue_timeout",
        "overloaded",
        "shutting_down",
        "first_token_timeout",
        "stream_idle_timeout",
        "request_timeout",
        "backend_unavailable",
        "bad_backend_response",
        "client_disconnected",
        "client_error",
    } <= OUTCOMES


def test_observer_skips_queue_wait_without_permit_and_itl_without_two_events() -> None:
    obs = make_observer()
    obs.request_ended(FakeCall(admitted=False, outcome="overloaded", status=503))
    obs.request_ended(FakeCall(first_byte_at=time.perf_counter(), chunks=1))
    obs.request_ended(FakeCall(first_byte_at=time.perf_counter(), chunks=5, stream=False))
    qw = obs.metrics.queue_wait.child()
    assert qw is not None and qw.count == 2
    itl = obs.metrics.itl.child()
    assert itl is not None and itl.count == 0


def test_single_backend_errors_health_and_in_flight_render() -> None:
    obs = make_observer()
    assert obs.metrics.health is not None
    obs.metrics.health.healthy = False  # the last check said so
    obs.request_ended(FakeCall(outcome="backend_unavailable", status=502))
    obs.request_ended(FakeCall(outcome="first_token_timeout", status=504))
    obs.request_ended(FakeCall(outcome="queue_timeout", status=503))  # not the backend's fault
    got = samples(obs.metrics.render())
    assert got['vllm_gateway_backend_errors_total{backend="b0",type="backend_unavailable"}'] == 1
    assert got['vllm_gateway_backend_errors_total{backend="b0",type="first_token_timeout"}'] == 1
    assert not any("queue_timeout" in k for k in got if k.startswith("vllm_gateway_backend_"))
    assert got['vllm_gateway_backend_healthy{backend="b0"}'] == 0
    assert got['vllm_gateway_backend_in_flight{backend="b0"}'] == 0
    assert got['vllm_gateway_backend_ejections_total{backend="b0"}'] == 0


def test_unknown_health_has_no_sample() -> None:
    obs = make_observer()
    assert "vllm_gateway_backend_healthy{" not in obs.metrics.render()


def test_pool_stats_are_rendered_per_backend() -> None:
    got = samples(make_observer(PoolLike()).metrics.render())
    assert got['vllm_gateway_backend_in_flight{backend="a"}'] == 2
    assert got['vllm_gateway_backend_healthy{backend="b"}'] == 0
    assert got['vllm_gateway_backend_errors_total{backend="a",type="backend_unavailable"}'] == 3
    assert got['vllm_gateway_backend_ejections_total{backend="b"}'] == 4


def test_gauges_are_read_from_the_gateway_at_scrape_time() -> None:
    obs = make_observer()
    obs.gateway.draining = True
    got = samples(obs.metrics.render())
    assert got["vllm_gateway_draining"] == 1
    assert got["vllm_gateway_admission_limit"] == Settings().max_concurrent_requests
    assert got["vllm_gateway_requests_in_flight"] == 0


def test_rejected_call_from_the_front_door_is_counted() -> None:
    obs = make_observer()
    obs.request_ended(RejectedCall("r-401", CHAT, Unauthorized()))
    assert obs.metrics.requests.value(CHAT, "401", "authentication_error") == 1
    assert obs.board is not None and obs.board.errors[-1]["request_id"] == "r-401"


def test_access_log_line_carries_every_field_in_json(caplog: pytest.LogCaptureFixture) -> None:
    obs = make_observer()
    start = time.perf_counter() - 1.0
    call = FakeCall(
        request_id="abc123",
        started_at=start,
        first_byte_at=start + 0.25,
        ended_at=start + 1.0,
        chunks=4,
        queue_wait=0.125,
        overhead=0.0005,
        tenant="team-a",
        usage=b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}',
    )
    with caplog.at_level(logging.INFO, logger="vllm_gateway.access"):
        obs.request_ended(call)
    (record,) = [r for r in caplog.records if r.name == "vllm_gateway.access"]
    line = orjson.loads(JSONFormatter().format(record))
    assert line["request_id"] == "abc123"
    assert line["tenant"] == "team-a"
    assert line["backend"] == "b0"
    assert line["route"] == CHAT
    assert line["status"] == 200
    assert line["outcome"] == "completed"
    assert line["queue_wait_ms"] == pytest.approx(125.0)
    assert line["ttft_ms"] == pytest.approx(250.0)
    assert line["duration_ms"] == pytest.approx(1000.0)
    assert line["overhead_ms"] == pytest.approx(0.5)
    assert line["chunks"] == 4
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 4)
    assert line["model"] == "m"
    # Text mode: one readable line that starts with the id.
    assert record.getMessage().startswith("request abc123 /v1/chat/completions 200 completed")
    assert "\n" not in record.getMessage()


def test_access_log_names_the_pool_member_that_served() -> None:
    obs = make_observer()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    access = logging.getLogger("vllm_gateway.access")
    old_level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        obs.request_ended(FakeCall(served_by="gpu-2"))
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    assert records[0].backend == "gpu-2"  # type: ignore[attr-defined]


# --- the status board --------------------------------------------------------------------------


def test_status_board_counts_events_of_open_and_ended_streams() -> None:
    obs = make_observer()
    board = obs.board
    assert board is not None
    gw = obs.gateway
    open_call = FakeCall(chunks=30)
    gw.active.add(open_call)  # type: ignore[arg-type]
    board.tick()  # baseline: 30 events so far
    open_call.chunks = 50
    obs.request_ended(
        FakeCall(
            chunks=7,
            outcome="stream_idle_timeout",
            status=200,
            request_id="bad-1",
            first_byte_at=time.perf_counter(),
        )
    )
    board._last_tick = time.monotonic() - 1.0
    board.tick()
    snap = board.snapshot(10)
    assert snap["series"]["events"][-1] == pytest.approx(27, rel=0.05)  # 20 open + 7 ended
    assert snap["series"]["requests"][-1] == pytest.approx(1, rel=0.05)
    assert snap["series"]["errors"][-1] == pytest.approx(1, rel=0.05)
    assert snap["series"]["ttft_p50"][-1] is not None
    assert snap["errors"][0]["request_id"] == "bad-1"
    assert snap["errors"][0]["outcome"] == "stream_idle_timeout"
    assert snap["live"]["errors_total"] == 1
    assert snap["backends"] == []  # wired by compose.create_app only


def test_status_board_ring_is_bounded() -> None:
    gw = Gateway(Settings(), IdleBackend())
    board = StatusBoard(gw, seconds=5)
    for _ in range(12):
        board.tick()
    assert len(board.points) == 5
    assert len(board.snapshot(3)["series"]["t"]) == 3
