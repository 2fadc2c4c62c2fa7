"""How the admission limit is split among worker processes."""

from __future__ import annotations

import pytest

from vllm_gateway.runtime.workers import split_limit, worker_settings
from vllm_gateway.settings import Settings


@pytest.mark.parametrize(("total", "workers"), [(100, 1), (100, 3), (7, 2), (5, 8), (1000, 16)])
def test_shares_add_up_and_differ_by_at_most_one(total: int, workers: int) -> None:
    shares = [split_limit(total, workers, i) for i in range(workers)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_each_worker_may_take_at_least_one_request() -> None:
    settings = Settings(max_concurrent_requests=2, max_queued_requests=3, workers=4)
    limits = [worker_settings(settings, i).max_concurrent_requests for i in range(4)]
    queues = [worker_settings(settings, i).max_queued_requests for i in range(4)]
    assert limits == [1, 1, 1, 1]
    assert sum(queues) == 3
    assert all(worker_settings(settings, i).workers == 1 for i in range(4))
