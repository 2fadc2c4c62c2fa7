"""The launcher's pure pieces: the child's command line, its environment, the served names, and
the model folder's atomic preparation rules. No engine is started here."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_gateway.backends.embedded import model as model_prep
from vllm_gateway.runtime.up import arguments, command, vllm_command, vllm_log
from vllm_gateway.settings import env_names, load_settings


def test_served_names_short_first_then_path() -> None:
    assert vllm_command.served_names("/m/SmolLM2-135M-Instruct/") == [
        "SmolLM2-135M-Instruct",
        "/m/SmolLM2-135M-Instruct/",
    ]
    assert vllm_command.served_names("openai/gpt-oss-20b") == ["gpt-oss-20b", "openai/gpt-oss-20b"]
    assert vllm_command.served_names("gpt2") == ["gpt2"]


def test_command_uses_module_path_and_extra_args_come_last() -> None:
    cmd = vllm_command.build_vllm_command(
        "py", "/m/x", 1234, gpu=False, extra=["--max-model-len", "512"]
    )
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "1234"
    assert cmd[-2:] == ["--max-model-len", "512"]  # vLLM keeps the last occurrence
    assert "--gpu-memory-utilization" not in cmd


def test_gpu_command_has_the_seed_parameters() -> None:
    cmd = vllm_command.build_vllm_command("py", "org/m", 1, gpu=True)
    joined = " ".join(cmd)
    for part in (
        "--gpu-memory-utilization 0.90",
        "--max-num-seqs 256",
        "--tensor-parallel-size 1",
        "--dtype bfloat16",
        "--trust-remote-code",
    ):
        assert part in joined


def test_child_environment_drops_every_gateway_variable() -> None:
    own = {*env_names(), "VLLM_GATEWAY_CACHE"}  # the settings' and the model cache's
    env = {name: "x" for name in own} | {"PATH": "/bin", "VLLM_LOGGING_LEVEL": "DEBUG"}
    child = vllm_command.child_environment(env, gpu=False)
    assert not own & set(child)
    assert child["PATH"] == "/bin"
    assert child["VLLM_LOGGING_LEVEL"] == "DEBUG"  # vLLM's own variables pass through
    assert child["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_child_environment_keeps_a_chosen_kv_cache_size() -> None:
    child = vllm_command.child_environment({"VLLM_CPU_KVCACHE_SPACE": "8"}, gpu=False)
    assert child["VLLM_CPU_KVCACHE_SPACE"] == "8"
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_command.child_environment({}, gpu=True)


def test_last_line_of_a_growing_log(tmp_path: Path) -> None:
    log = tmp_path / "v.log"
    assert vllm_log.last_line(log) == ""
    log.write_text("first\nprogress 10%\rprogress 90%\n\n")
    assert vllm_log.last_line(log) == "progress 90%"


def test_up_refuses_bad_settings_before_starting_vllm(capsys: pytest.CaptureFixture[str]) -> None:
    assert command.main(["--max-concurrent-requests", "0", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "invalid --max-concurrent-requests='0'" in err
    assert "starting vLLM" not in err


def test_unprepared_folder_is_not_reused(tmp_path: Path) -> None:
    folder = model_prep.default_model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not model_prep.is_prepared(folder)
    (folder / model_prep.MARKER).write_text(model_prep.LAYOUT_VERSION + "\n")
    assert model_prep.is_prepared(folder)
    assert model_prep.prepare_default_model(tmp_path) == folder  # reused, nothing converted


def test_cache_dir_from_env_only_when_given() -> None:
    assert model_prep.default_cache_dir({"VLLM_GATEWAY_CACHE": "/c"}) == Path("/c")
    assert model_prep.default_cache_dir({}) == Path.home() / ".cache" / "vllm-gateway"


def test_up_keeps_the_pool_to_its_own_vllm_warm() -> None:
    # vLLM's keep-alive is raised for the child, and the gateway's idle timeout sits below it.
    assert vllm_command.child_environment({}, gpu=True)["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "300"
    args = arguments.parse_arguments([])
    settings = load_settings({}, arguments.gateway_flags(args, "http://127.0.0.1:9", {}))
    assert settings.upstream_idle_timeout == 240.0
    # A keep-alive chosen by the user is kept, and the gateway follows it.
    env = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "10"}
    assert vllm_command.child_environment(env, gpu=True)["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "10"
    settings = load_settings(env, arguments.gateway_flags(args, "http://127.0.0.1:9", env))
    assert settings.upstream_idle_timeout == 8.0
    # An idle timeout the user set wins, from the environment or the command line.
    env = {"VLLM_UPSTREAM_IDLE_TIMEOUT_SECONDS": "3"}
    settings = load_settings(env, arguments.gateway_flags(args, "http://127.0.0.1:9", env))
    assert settings.upstream_idle_timeout == 3.0
    args = arguments.parse_arguments(["--upstream-idle-timeout", "7"])
    settings = load_settings({}, arguments.gateway_flags(args, "http://127.0.0.1:9", {}))
    assert settings.upstream_idle_timeout == 7.0
