"""What a newcomer reads first: ``vllm-gateway --help`` and ``vllm-gateway up --help``, and how
``up`` reads a command line that mixes its own flags with ``serve``'s."""

from __future__ import annotations

import pytest

from vllm_gateway.cli import COMMANDS, main
from vllm_gateway.runtime.up import arguments
from vllm_gateway.settings import load_settings

UP_FLAGS = (
    "--model",
    "--vllm-arg",
    "--vllm-port",
    "--log-file",
    "--vllm-startup-timeout",
    "--vllm-stop-timeout",
)


def test_help_lists_the_commands_and_nothing_internal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vllm-gateway <command> [flags]\n")
    for name, (_, line) in COMMANDS.items():
        assert f"  {name}  " in out and line in out
    assert "vllm-gateway <command> --help" in out
    assert "The only place" not in out  # the module's docstring is for its readers
    assert main([]) == 2
    assert capsys.readouterr().out == out


def test_up_help_shows_ups_own_flags_and_where_the_gateways_come_from(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["up", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in UP_FLAGS:
        assert f"  {flag} " in out
    assert "VLLM_* environment variables" in out and "'vllm-gateway serve --help'" in out
    # serve's own list is not repeated, and what is wrong for up is said to be so.
    assert "VLLM_MAX_CONCURRENT_REQUESTS" not in out
    assert "--backend-url VLLM_BACKEND_URL" not in out
    assert "model for the embedded engine" not in out
    assert "--backend-url, --embedded and --engine-args do not\n  apply" in out
    assert len(out.splitlines()) < 50


def test_up_takes_serves_flags_beside_its_own() -> None:
    args = arguments.parse_arguments(
        [
            *("--port", "7100", "--vllm-arg=--max-model-len 512", "--model", "org/m"),
            *("--max-concurrent-requests", "8", "--vllm-port", "9001", "--log-level", "debug"),
        ]
    )
    assert args.model == "org/m"
    assert args.vllm_args == ("--max-model-len", "512")
    assert args.vllm_port == 9001
    settings = load_settings({}, arguments.gateway_flags(args, "http://127.0.0.1:9001", {}))
    assert (settings.port, settings.max_concurrent_requests) == (7100, 8)
    assert settings.log_level == "debug"
    assert settings.model == "org/m"
    assert settings.backend_urls == ("http://127.0.0.1:9001",)
    # Without --model, VLLM_MODEL names vLLM's model, as before.
    args = arguments.parse_arguments([])
    flags = arguments.gateway_flags(args, "http://127.0.0.1:9", {})
    assert load_settings({"VLLM_MODEL": "env/m"}, flags).model == "env/m"


@pytest.mark.parametrize(("flag", "value"), [("--backend-url", "http://h:1"), ("--embedded", "1")])
def test_up_refuses_serve_flags_that_mean_nothing_for_it(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        arguments.parse_arguments([flag, value])
    assert refused.value.code == 2
    assert f"vllm-gateway up: error: {flag} does not apply to up:" in capsys.readouterr().err


def test_a_prefix_of_a_serve_flag_is_not_taken_for_ups_own(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # --log is a prefix of serve's --log-level and --log-format and of up's --log-file.
    with pytest.raises(SystemExit):
        arguments.parse_arguments(["--log", "debug"])
    assert "ambiguous option: --log" in capsys.readouterr().err
