"""scripts/round_breakdown.py: histogram quantiles and round windows over vLLM's samples."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import round_breakdown as rb


def test_bucket_quantile_interpolates_inside_a_bucket() -> None:
    # 100 observations: 50 at or below 0.1 s, 40 more at or below 0.5 s, 10 at or below 1 s.
    buckets = {"0.1": 50.0, "0.5": 90.0, "1.0": 100.0, "+Inf": 100.0}
    assert rb.bucket_quantile(buckets, 0.5) == pytest.approx(0.1)
    assert rb.bucket_quantile(buckets, 0.7) == pytest.approx(0.1 + 0.4 * 20 / 40)
    assert rb.bucket_quantile(buckets, 0.99) == pytest.approx(0.5 + 0.5 * 9 / 10)
    assert math.isnan(rb.bucket_quantile({"0.1": 0.0, "+Inf": 0.0}, 0.5))


def test_engine_window_takes_the_difference_between_the_bounding_samples() -> None:
    def sample(t: float, n: float, total: float, low: float) -> dict[str, object]:
        return {
            "t": t,
            "ttft_count": n,
            "ttft_sum": total,
            "ttft_buckets": {"0.5": low, "1.0": n, "+Inf": n},
            "queue_count": n,
            "queue_sum": total / 2,
        }

    samples = [sample(0.0, 10, 5.0, 10), sample(1.0, 10, 5.0, 10), sample(5.0, 30, 25.0, 20)]
    got = rb.engine_window(samples, start=1.2, end=5.4)
    # 20 first tokens in the round, 20 s in all: mean 1,000 ms; 10 of them at or below 0.5 s.
    assert got["ttft_n"] == 20
    assert got["ttft_mean_ms"] == pytest.approx(1000)
    assert got["queue_mean_ms"] == pytest.approx(500)
    assert got["ttft_p50_ms"] == pytest.approx(500)
    # A window with no sample inside it says nothing rather than something wrong.
    assert rb.engine_window(samples, start=1.2, end=1.4) == {}
