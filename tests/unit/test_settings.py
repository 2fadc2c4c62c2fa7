"""Settings: the seed's variables and defaults, flag precedence, and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vllm_gateway.cli import main
from vllm_gateway.settings import Settings, SettingsError, load_settings


def test_defaults_are_the_seeds() -> None:
    s = load_settings({})
    assert s.backend_url == "http://127.0.0.1:8001"
    assert s.max_concurrent_requests == 100
    assert s.request_timeout == 120
    assert s.queue_wait_timeout == 60
    assert (s.host, s.port) == ("0.0.0.0", 7000)
    assert s.use_embedded_engine is False
    assert s.shutdown_timeout == 30


def test_environment_then_flags() -> None:
    env = {
        "VLLM_MAX_CONCURRENT_REQUESTS": "7",
        "VLLM_PORT": "7100",
        "VLLM_QUEUE_WAIT_TIMEOUT_SECONDS": "2.5",
    }
    s = load_settings(env)
    assert (s.max_concurrent_requests, s.port, s.queue_wait_timeout) == (7, 7100, 2.5)
    s = load_settings(env, {"port": "7200", "max_concurrent_requests": None})
    assert (s.max_concurrent_requests, s.port) == (7, 7200)


def test_several_backend_urls() -> None:
    s = load_settings({"VLLM_BACKEND_URL": "http://a:1, http://b:2/"})
    assert s.backend_urls == ("http://a:1", "http://b:2")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"VLLM_REQUEST_TIMEOUT_SECONDS": "-1"}, "VLLM_REQUEST_TIMEOUT_SECONDS"),
        ({"VLLM_QUEUE_WAIT_TIMEOUT_SECONDS": "soon"}, "VLLM_QUEUE_WAIT_TIMEOUT_SECONDS"),
        ({"VLLM_PORT": "70000"}, "VLLM_PORT"),
        ({"VLLM_MAX_CONCURRENT_REQUESTS": "0"}, "VLLM_MAX_CONCURRENT_REQUESTS"),
        ({"VLLM_BACKEND_URL": "127.0.0.1:8001"}, "VLLM_BACKEND_URL"),
        ({"VLLM_USE_EMBEDDED_ENGINE": "maybe"}, "VLLM_USE_EMBEDDED_ENGINE"),
        ({"VLLM_BACKEND_URL": ""}, "VLLM_BACKEND_URL"),
        ({"VLLM_FIRST_TOKEN_TIMEOUT_SECONDS": "200"}, "VLLM_FIRST_TOKEN_TIMEOUT_SECONDS"),
        ({"VLLM_MODEL_ALIASES": "justaname"}, "VLLM_MODEL_ALIASES"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert variable in str(info.value) and "\n" not in str(info.value)


def test_the_port_trap_of_the_start_script_is_named() -> None:
    # One shell: VLLM_PORT=7001 for vLLM, and the gateway pointed at vLLM on 7001.
    env = {"VLLM_PORT": "7001", "VLLM_BACKEND_URL": "http://127.0.0.1:7001"}
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert info.value.variable == "VLLM_PORT"
    assert "--port" in str(info.value)
    # The flag always wins.
    assert load_settings(env, {"port": "7000"}).port == 7000


def test_embedded_engine_wants_no_backend_url() -> None:
    s = load_settings({"VLLM_USE_EMBEDDED_ENGINE": "true"})
    assert s.use_embedded_engine and s.backend_urls == ()
    s = load_settings({"VLLM_USE_EMBEDDED_ENGINE": "true", "VLLM_BACKEND_URL": ""})
    assert s.backend_urls == ()
    with pytest.raises(SettingsError):
        load_settings({"VLLM_USE_EMBEDDED_ENGINE": "true", "VLLM_BACKEND_URL": "http://x:1"})


def test_api_keys_from_variable_and_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk2\n\nk3\n")
    s = load_settings({"VLLM_API_KEYS": "k1", "VLLM_API_KEYS_FILE": str(keys)})
    assert s.api_keys == frozenset({"k1", "k2", "k3"})
    with pytest.raises(SettingsError):
        load_settings({"VLLM_API_KEYS_FILE": str(tmp_path / "missing")})


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_cli_reports_one_line_and_exits_non_zero(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_REQUEST_TIMEOUT_SECONDS", "-5")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "VLLM_REQUEST_TIMEOUT_SECONDS" in err


async def test_upstream_idle_timeout_reaches_the_connection_pool() -> None:
    from vllm_gateway.backends.factory import build_backend
    from vllm_gateway.backends.http.backend import HTTPBackend
    from vllm_gateway.backends.pool.backend import PoolBackend

    backend = build_backend(load_settings({"VLLM_UPSTREAM_IDLE_TIMEOUT_SECONDS": "30"}))
    assert isinstance(backend, HTTPBackend)
    await backend.start()
    try:
        assert backend.pool.idle_timeout == 30
    finally:
        await backend.aclose()
    # Regression: a pool's members kept their connections 4 s whatever the setting said.
    pool = build_backend(
        load_settings(
            {
                "VLLM_UPSTREAM_IDLE_TIMEOUT_SECONDS": "30",
                "VLLM_BACKEND_URL": "http://127.0.0.1:9,http://127.0.0.1:10",
            }
        )
    )
    assert isinstance(pool, PoolBackend)
    for m in pool.members:
        assert isinstance(m.backend, HTTPBackend)
        await m.backend.start()
        try:
            assert m.backend.pool.idle_timeout == 30
        finally:
            await m.backend.aclose()


def test_serve_help_names_every_variable_and_default() -> None:
    import argparse

    from vllm_gateway.settings import FIELDS, add_arguments

    parser = argparse.ArgumentParser(prog="vllm-gateway serve")
    add_arguments(parser)
    text = " ".join(parser.format_help().split())  # argparse wraps lines anywhere
    for spec in FIELDS:
        assert f"{spec.flag} {spec.env}" in text
    assert "--api-keys-file VLLM_API_KEYS_FILE" in text
    assert "(env VLLM_MAX_CONCURRENT_REQUESTS; default 100)" in text
    assert "(env VLLM_POOL_ROUTING; default least_outstanding)" in text
    assert "(env VLLM_API_KEYS; default none)" in text
    assert text.count("; default ") == len(FIELDS) + 1


def test_each_setting_is_declared_once_and_the_pools_keep_their_names() -> None:
    import dataclasses

    from vllm_gateway.settings import FIELDS, PoolSettings

    assert len({s.env for s in FIELDS}) == len({s.flag for s in FIELDS}) == len(FIELDS)
    assert len({s.name for s in FIELDS}) == len(FIELDS)
    declared = {s.path for s in FIELDS}
    top = {(f.name,) for f in dataclasses.fields(Settings)} - {("pool",)}
    pool = {("pool", f.name) for f in dataclasses.fields(PoolSettings)}
    # Every field is a setting but two fixed knobs of the retry budget.
    assert declared == top | pool - {("pool", "retry_budget_min"), ("pool", "retry_budget_window")}
    for s in FIELDS:
        assert s.env.startswith("VLLM_") and s.flag.startswith("--")
        if s.path[0] == "pool":
            # The pool's variables, flags and flag keys are the ones users know.
            assert s.name == f"pool_{s.path[1]}"
            assert s.env.startswith("VLLM_POOL_") and s.flag.startswith("--pool-")
    assert Settings().pool == PoolSettings()


def test_pool_settings_come_from_their_variables_and_flags() -> None:
    env = {"VLLM_POOL_ROUTING": "session", "VLLM_POOL_HEALTH_INTERVAL_SECONDS": "0.5"}
    s = load_settings(env, {"pool_max_retries": "0", "pool_routing": None})
    assert (s.pool.routing, s.pool.health_interval, s.pool.max_retries) == ("session", 0.5, 0)
    assert s.pool.admission_wait == 1.0  # the rest keep their defaults
    with pytest.raises(SettingsError) as info:
        load_settings({"VLLM_POOL_FAILOVER_MAX": "11"})
    assert info.value.variable == "VLLM_POOL_FAILOVER_MAX"
    with pytest.raises(SettingsError) as info:
        load_settings({}, {"pool_routing": "random"})
    assert info.value.variable == "--pool-routing"


def _value(settings: Settings, path: tuple[str, ...]) -> object:
    value: object = settings
    for name in path:
        value = getattr(value, name)
    return value


def test_serve_help_groups_the_flags_and_its_examples_work() -> None:
    import shlex

    from vllm_gateway.cli import SERVE_EXAMPLES, serve_parser
    from vllm_gateway.settings import FIELDS
    from vllm_gateway.settings.declaration import GROUPS

    text = serve_parser().format_help()
    assert text.startswith("usage: vllm-gateway serve [-h] [--FLAG VALUE ...]\n")
    heads = [text.index(f"\n{g.title}:\n") for g in GROUPS]
    assert heads == sorted(heads)
    ends = [*heads[1:], text.index("\nexamples:\n")]
    for s in FIELDS:
        at = text.index(f"\n  {s.flag} {s.env}")
        g = GROUPS.index(s.group)
        assert heads[g] < at < ends[g], s.flag
    keys_file = text.index("\n  --api-keys-file VLLM_API_KEYS_FILE")
    assert text.index("\n  --api-keys VLLM_API_KEYS") < keys_file < text.index("\nbounds on")

    by_flag = {s.flag: s for s in FIELDS}
    by_env = {s.env: s for s in FIELDS}
    lines = SERVE_EXAMPLES.replace("\\\n", " ").splitlines()
    commands = [line.strip() for line in lines[1:] if not line.strip().startswith("#")]
    assert len(commands) >= 5
    for command in commands:
        words = shlex.split(command)
        env = dict(w.split("=", 1) for w in words[: words.index("vllm-gateway")])
        assert words[words.index("vllm-gateway") + 1] == "serve"
        flags = words[words.index("vllm-gateway") + 2 :]
        settings = load_settings(env, vars(serve_parser().parse_args(flags)))
        # Each flag and variable an example gives changes something.
        given = [by_flag[w] for w in flags if w.startswith("--")] + [by_env[e] for e in env]
        for s in given:
            assert _value(settings, s.path) != s.default, (command, s.flag)


def test_backend_discovery_is_a_dns_name_and_port() -> None:
    s = load_settings(
        {
            "VLLM_BACKEND_DISCOVERY": "dns://vllm-headless.default.svc.cluster.local.:8000",
            "VLLM_BACKEND_DISCOVERY_NAMESERVERS": "10.96.0.10, [fd00::a]:5353",
        },
        {"backend_discovery_min_interval": "0.5"},
    )
    assert s.backend_discovery == "dns://vllm-headless.default.svc.cluster.local:8000"
    assert s.backend_discovery_nameservers == ("10.96.0.10:53", "[fd00::a]:5353")
    assert s.backend_discovery_min_interval == 0.5
    assert Settings().backend_discovery is None


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"VLLM_BACKEND_DISCOVERY": "http://vllm:8000"}, "dns://NAME:PORT"),
        ({"VLLM_BACKEND_DISCOVERY": "dns://vllm"}, "the members' port"),
        ({"VLLM_BACKEND_DISCOVERY": "dns://vllm:99999"}, "invalid port"),
        ({"VLLM_BACKEND_DISCOVERY": "dns://bad name!:8000"}, "DNS name"),
        ({"VLLM_BACKEND_DISCOVERY": "dns://vllm:8000/path"}, "nothing after the port"),
        ({"VLLM_BACKEND_DISCOVERY_NAMESERVERS": "dns.example:53"}, "ADDRESS[:PORT]"),
        ({"VLLM_BACKEND_DISCOVERY_NAMESERVERS": "fd00::a"}, "IPv6"),
    ],
)
def test_a_bad_discovery_value_is_named(env: dict[str, str], reason: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(reason)) as err:
        load_settings(env)
    assert err.value.variable == next(iter(env))


@pytest.mark.parametrize(
    "other", [{"VLLM_BACKEND_URL": "http://a:8000"}, {"VLLM_BACKENDS_FILE": "backends.yaml"}]
)
def test_discovery_is_the_pools_one_source_of_members(other: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="names them too"):
        load_settings({"VLLM_BACKEND_DISCOVERY": "dns://vllm:8000", **other})


def test_discovery_intervals_are_in_order_and_not_with_the_embedded_engine() -> None:
    with pytest.raises(SettingsError, match="must not exceed"):
        load_settings(
            {
                "VLLM_BACKEND_DISCOVERY": "dns://vllm:8000",
                "VLLM_BACKEND_DISCOVERY_MIN_INTERVAL_SECONDS": "60",
            }
        )
    with pytest.raises(SettingsError, match="embedded engine"):
        load_settings(
            {"VLLM_BACKEND_DISCOVERY": "dns://vllm:8000", "VLLM_USE_EMBEDDED_ENGINE": "1"}
        )


def test_a_saturation_stale_bound_within_the_readings_spread_is_refused() -> None:
    # Readings come up to 1.25 intervals apart: a stale bound inside that made members unknown.
    on = {"VLLM_POOL_SATURATION_MAX_WAITING": "2", "VLLM_POOL_SATURATION_SCRAPE_SECONDS": "2"}
    with pytest.raises(SettingsError, match="VLLM_POOL_SATURATION_STALE_SECONDS"):
        load_settings(on)
    assert (
        load_settings({**on, "VLLM_POOL_SATURATION_STALE_SECONDS": "5"}).pool.saturation_stale_after
        == 5
    )
    # Off, the bound is not read.
    assert (
        load_settings({"VLLM_POOL_SATURATION_SCRAPE_SECONDS": "2"}).pool.saturation_max_waiting
        is None
    )
