"""The pool's pure parts: backends file, knobs, routing choice, affinity keys, retry budget."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vllm_gateway.backends.http.backend import HTTPBackend
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.config import BackendSpec, PoolConfig, load_backends_file
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.retry import RetryBudget
from vllm_gateway.backends.pool.routing import affinity_key, choose
from vllm_gateway.settings import Settings, load_settings


def member(name: str, weight: float = 1.0, in_flight: int = 0, limit: int | None = None) -> Member:
    spec = BackendSpec(url=f"http://{name}:8000", weight=weight, max_outstanding=limit)
    m = Member(spec, PoolConfig(), HTTPBackend(spec.url, connect_timeout=1.0))
    m.in_flight = in_flight
    return m


def test_yaml_backends_file(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text(
        "backends:\n"
        "  - url: http://a:8000/\n"
        "    weight: 2\n"
        "    models: [llama, qwen]\n"
        "    max_outstanding: 16\n"
        "  - url: http://b:8000\n"
        "    name: b\n"
    )
    a, b = load_backends_file(path)
    assert a == BackendSpec("http://a:8000", 2.0, ("llama", "qwen"), None, 16)
    assert b == BackendSpec("http://b:8000", 1.0, None, "b", None)


def test_json_backends_file_as_a_bare_list(tmp_path: Path) -> None:
    path = tmp_path / "backends.json"
    path.write_text(json.dumps(["http://a:1", {"url": "http://b:2", "models": "m"}]))
    specs = load_backends_file(path)
    assert [s.url for s in specs] == ["http://a:1", "http://b:2"] and specs[1].models == ("m",)


@pytest.mark.parametrize(
    "text, message",
    [
        ("backends: []", "non-empty list"),
        ("backends:\n  - url: ftp://a", "'url'"),
        ("backends:\n  - url: http://a\n    weight: 0", "'weight'"),
        ("backends:\n  - url: http://a\n    weight: true", "'weight'"),
        ("backends:\n  - url: http://a\n    models: []", "'models'"),
        ("backends:\n  - url: http://a\n    max_outstanding: 0", "'max_outstanding'"),
        ("backends:\n  - url: http://a\n    colour: red", "unknown key"),
        ("backends:\n  - http://a\n  - http://a", "unique"),
        ("backends: [", "invalid YAML"),
    ],
)
def test_bad_backends_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_backends_file(path)


def test_missing_backends_file() -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        load_backends_file("/nonexistent/backends.yaml")


def test_pool_config_validates_and_reads_settings() -> None:
    with pytest.raises(ValueError, match="routing"):
        PoolConfig(routing="random")
    with pytest.raises(ValueError):
        PoolConfig(health_interval=0)
    with pytest.raises(ValueError):
        PoolConfig(watchdog_stall=-1)
    assert PoolBackend(Settings()).config == PoolConfig()

    settings = load_settings({"VLLM_POOL_ROUTING": "prefix", "VLLM_POOL_MAX_OUTSTANDING": "8"})
    cfg = PoolBackend(settings, max_retries=1).config
    assert (cfg.routing, cfg.max_outstanding, cfg.max_retries) == ("prefix", 8, 1)


def test_least_outstanding_then_weight_then_round_robin() -> None:
    cfg = PoolConfig()
    a, b, c = member("a", in_flight=2), member("b", in_flight=1), member("c", in_flight=1)
    assert choose([a, b, c], None, cfg)[0] in (b, c)
    picks = {choose([a, b, c], None, cfg)[0].name for _ in range(4)}
    assert picks == {b.name, c.name}  # the tie goes round-robin
    heavy = member("h", weight=2.0, in_flight=2)  # 2 in flight at weight 2 is a load of 1
    assert all(choose([b, c, heavy], None, cfg)[0] is heavy for _ in range(3))


def test_affinity_is_consistent_and_moves_only_the_keys_of_a_member_that_leaves() -> None:
    cfg = PoolConfig(routing="session")
    members = [member(n) for n in "abcd"]
    keys = [f"s:{i}" for i in range(200)]
    before = {k: choose(members, k, cfg)[0] for k in keys}
    assert len(set(before.values())) == 4
    rest = members[:3]
    after = {k: choose(rest, k, cfg)[0] for k in keys}
    moved = [k for k in keys if before[k] is not after[k]]
    assert moved and all(before[k] is members[3] for k in moved)


def test_affinity_yields_only_past_the_factor() -> None:
    cfg = PoolConfig(routing="session", affinity_yield_factor=2.0)
    a, b = member("a"), member("b")
    target, _ = choose([a, b], "s:key", cfg)
    other = b if target is a else a
    target.in_flight = 2  # 2 <= 2 * (0 + 1): still sticks
    assert choose([a, b], "s:key", cfg) == (target, False)
    target.in_flight = 3
    assert choose([a, b], "s:key", cfg) == (other, True)
    other.in_flight = 1  # the floor rises: 3 <= 2 * (1 + 1)
    assert choose([a, b], "s:key", cfg) == (target, False)


def test_affinity_keys() -> None:
    assert affinity_key("session", {"X-Session-ID": "s1"}, {"user": "u"}, 10) == "s:s1"
    assert affinity_key("session", {}, {"user": "u"}, 10) == "u:u"
    assert affinity_key("session", {}, {}, 10) is None
    assert affinity_key("least_outstanding", {"x-session-id": "s1"}, None, 10) is None
    chat = {
        "messages": [
            {"role": "system", "content": "abcdefghij"},
            {"role": "user", "content": [{"type": "text", "text": "xyz"}]},
        ]
    }
    assert affinity_key("prefix", {}, chat, 8) == "p:system:a"
    assert affinity_key("prefix", {}, chat, 100) == "p:system:abcdefghij\nuser:xyz\n"
    assert affinity_key("prefix", {}, {"prompt": "hello world"}, 5) == "p:hello"
    assert affinity_key("prefix", {}, {"prompt": ["first", "second"]}, 50) == "p:first"
    assert affinity_key("prefix", {}, {"prompt": [[1, 2, 3]]}, 50) == "p:1,2,3"


def test_member_limits_and_ejection_backoff() -> None:
    cfg = PoolConfig(readmit_backoff=1.0, readmit_backoff_max=3.0)
    m = member("a", limit=2)
    m.begin()
    assert m.has_room()
    m.begin()
    assert not m.has_room() and m.requests == 2
    assert not m.failure("connect", 2) and m.failure("connect", 2)
    waits = []
    for _ in range(3):
        m.eject("failures", cfg)
        waits.append(round(m.readmit_at - time.monotonic()))
        m.readmit()
    assert waits == [1, 2, 3]  # doubling, capped
    m.success()
    m.eject("failures", cfg)
    assert round(m.readmit_at - time.monotonic()) == 1  # a success resets the backoff
    m.readmit()
    assert m.ejections == 4 and m.errors["connect"] == 2
    assert m.stats()["healthy"] and m.stats()["in_flight"] == 2


def test_retry_budget() -> None:
    budget = RetryBudget(ratio=0.2, minimum=1, window=60.0)
    assert budget.try_retry()  # the minimum
    assert not budget.try_retry()
    for _ in range(20):
        budget.request()
    assert budget.try_retry() and budget.try_retry() and budget.try_retry()  # 20% of 20 = 4
    assert not budget.try_retry() and budget.exhausted == 2


def test_retry_budget_keeps_only_its_window_of_requests() -> None:
    """A pool that never retries still forgets the requests older than the window: the budget's
    memory is bounded by the window's requests, not by every request served."""
    now = [0.0]
    budget = RetryBudget(ratio=0.5, minimum=0, window=10.0, clock=lambda: now[0])
    for _ in range(1000):
        budget.request()
        now[0] += 1.0
    assert len(budget._requests) <= 11
    assert sum(budget.try_retry() for _ in range(10)) == 5  # half of the window's 10 requests
