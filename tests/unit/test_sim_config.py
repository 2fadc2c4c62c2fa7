"""The simulator's knobs: defaults, validation, run-time updates and per-request overrides."""

from __future__ import annotations

import math

import pytest

from vllm_gateway_tools.simulator.config import ConfigError, SimulatorConfig
from vllm_gateway_tools.simulator.state import authorized, prompt_tokens


def test_defaults_are_the_documented_pace() -> None:
    cfg = SimulatorConfig()
    assert (cfg.ttft, cfg.itl, cfg.tokens, cfg.models) == (0.05, 0.02, 16, ("sim-model",))
    assert cfg.status is None and not cfg.hang and cfg.malformed is None and not cfg.unhealthy
    # A generate server, dev routes off, the Responses store on.
    assert (cfg.runner, cfg.dev_mode, cfg.responses_store) == ("generate", False, True)


def test_models_accept_commas_and_lists() -> None:
    assert SimulatorConfig(models=("a,b", " c ")).models == ("a", "b", "c")
    assert SimulatorConfig(models="x, y").models == ("x", "y")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        SimulatorConfig(models=(",",))


@pytest.mark.parametrize(
    "changes",
    [{"ttft": -1}, {"itl": math.inf}, {"itl": "fast"}, {"tokens": 0}, {"tokens": 2.5}, {"tokens": True},
     {"status": 42}, {"status": 600}, {"stall_after": -1}, {"malformed": "weird"}, {"hang": 1},
     {"no_such_knob": 1}, {"runner": "embed"}, {"dev_mode": "yes"}, {"responses_store": 0}],
)  # fmt: skip
def test_bad_values_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SimulatorConfig().updated(changes)


def test_updated_returns_a_new_config() -> None:
    cfg = SimulatorConfig()
    new = cfg.updated({"stall_after": 3, "malformed": "no_done"})
    assert (new.stall_after, new.malformed) == (3, "no_done")
    assert cfg.stall_after is None  # the original never changes
    assert new.as_dict()["models"] == ["sim-model"]


def test_per_request_override_takes_pace_and_faults_only() -> None:
    cfg = SimulatorConfig()
    assert cfg.overridden({"tokens": 3, "drop_after": 2}).tokens == 3
    assert cfg.overridden({}) is cfg
    for server_only in (
        {"api_key": "k"},
        {"models": ["x"]},
        {"unhealthy": True},
        {"max_model_len": 9},
        {"runner": "pooling"},
        {"dev_mode": True},
        {"responses_store": False},
    ):
        with pytest.raises(ConfigError):
            cfg.overridden(server_only)
    with pytest.raises(ConfigError):
        cfg.overridden([1, 2])


def test_authorized_is_a_bearer_check() -> None:
    assert authorized({"authorization": "Bearer k1"}, "k1")
    assert authorized({"authorization": "bearer k1"}, "k1")
    assert not authorized({"authorization": "Bearer k2"}, "k1")
    assert not authorized({"authorization": "Basic k1"}, "k1")
    assert not authorized({}, "k1")


def test_prompt_tokens_are_deterministic() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 40}]}
    assert prompt_tokens(chat, True) == prompt_tokens(chat, True) == 13
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 40}]}]}
    assert prompt_tokens(parts, True) == 13
    assert prompt_tokens({"prompt": "x" * 40}, False) == 10
    assert prompt_tokens({"prompt": [1, 2, 3]}, False) == 3
    assert prompt_tokens({"messages": []}, True) is None
    assert prompt_tokens({}, False) is None
