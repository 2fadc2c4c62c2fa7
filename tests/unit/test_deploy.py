"""The deployment files: start script, Dockerfiles, compose, Helm chart, dashboard and alerts.

Everything runs offline. External linters (shellcheck, hadolint, promtool) run inside the
validators when they are installed; the assertions of meaning here always run.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import render_k8s  # noqa: E402
import validate_deploy as vd  # noqa: E402
import validate_monitoring as vm  # noqa: E402

if TYPE_CHECKING:
    from vllm_gateway.errors import GatewayError

SCRIPT = ROOT / "scripts" / "start_vllm_h100.sh"


def dry_run(env: dict[str, str] | None = None, *args: str) -> list[str]:
    command: list[str] = vd.start_script_command(env, args)
    return command


# --- start script ------------------------------------------------------------------------------


def test_start_script_defaults_are_the_h100_table() -> None:
    cmd = dry_run()
    assert cmd[:5] == [
        "python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "openai/gpt-oss-20b",
    ]
    assert vd.flag_values(cmd, "--gpu-memory-utilization") == ["0.90"]
    assert vd.flag_values(cmd, "--max-num-seqs") == ["256"]
    assert vd.flag_values(cmd, "--tensor-parallel-size") == ["1"]
    assert vd.flag_values(cmd, "--dtype") == ["bfloat16"]
    assert "--trust-remote-code" in cmd
    assert vd.flag_values(cmd, "--host") == ["0.0.0.0"]
    assert vd.flag_values(cmd, "--port") == ["7001"]
    assert "--enforce-eager" not in cmd


def test_start_script_serves_the_short_and_the_full_model_name() -> None:
    assert vd.flag_values(dry_run(), "--served-model-name") == ["gpt-oss-20b", "openai/gpt-oss-20b"]
    local = dry_run({"VLLM_MODEL": "/models/SmolLM2/"})
    assert vd.flag_values(local, "--served-model-name") == ["SmolLM2", "/models/SmolLM2/"]
    bare = dry_run({"VLLM_MODEL": "tiny"})
    assert vd.flag_values(bare, "--served-model-name") == ["tiny"]
    chosen = dry_run({"VLLM_SERVED_MODEL_NAME": "a b"})
    assert vd.flag_values(chosen, "--served-model-name") == ["a", "b"]


def test_start_script_environment_overrides_every_value() -> None:
    cmd = dry_run(
        {
            "VLLM_MODEL": "org/other-model",
            "VLLM_PORT": "9123",
            "VLLM_SERVER_HOST": "127.0.0.1",
            "VLLM_GPU_MEMORY_UTILIZATION": "0.75",
            "VLLM_MAX_NUM_SEQS": "64",
            "VLLM_TENSOR_PARALLEL_SIZE": "4",
            "VLLM_DTYPE": "float16",
            "VLLM_TRUST_REMOTE_CODE": "false",
        }
    )
    assert vd.flag_values(cmd, "--model") == ["org/other-model"]
    assert vd.flag_values(cmd, "--port") == ["9123"]
    assert vd.flag_values(cmd, "--host") == ["127.0.0.1"]
    assert vd.flag_values(cmd, "--gpu-memory-utilization") == ["0.75"]
    assert vd.flag_values(cmd, "--max-num-seqs") == ["64"]
    assert vd.flag_values(cmd, "--tensor-parallel-size") == ["4"]
    assert vd.flag_values(cmd, "--dtype") == ["float16"]
    assert "--trust-remote-code" not in cmd


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("false", False),
        ("0", False),
        ("true", True),
        ("1", True),
        ("YES", True),
    ],
)
def test_enforce_eager_only_when_asked(value: str | None, expected: bool) -> None:
    env = {} if value is None else {"VLLM_ENFORCE_EAGER": value}
    assert ("--enforce-eager" in dry_run(env)) is expected


def test_extra_arguments_pass_through_last_and_intact() -> None:
    cmd = dry_run(None, "--max-model-len", "8192", "--chat-template", "a file with spaces.jinja")
    assert cmd[-4:] == ["--max-model-len", "8192", "--chat-template", "a file with spaces.jinja"]


def test_print_flag_is_the_same_as_dry_run_and_not_passed_on() -> None:
    env = {"PATH": "/usr/bin:/bin", "VLLM_LAUNCHER": "module", "VLLM_PYTHON": "python3"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--print", "--seed", "1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    printed = shlex.split(proc.stdout)
    assert printed == dry_run(None, "--seed", "1")
    assert "--print" not in printed


def test_serve_launcher_uses_the_vllm_console_script() -> None:
    cmd = dry_run({"VLLM_LAUNCHER": "serve"})
    assert cmd[:3] == ["vllm", "serve", "openai/gpt-oss-20b"]
    assert "--model" not in cmd


def test_auto_launcher_falls_back_to_the_module_when_the_console_script_is_broken(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "vllm"
    broken.write_text("#!/bin/sh\necho 'No package metadata was found for vllm' >&2\nexit 1\n")
    broken.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "VLLM_LAUNCHER": "auto"}
    assert dry_run(env)[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    broken.write_text("#!/bin/sh\necho 0.26.0\n")
    assert dry_run(env)[:2] == ["vllm", "serve"]


def test_start_script_execs_so_signals_reach_vllm(tmp_path: Path) -> None:
    fake = tmp_path / "fake-python"
    # Prints its own pid: equal to the script's pid only if the script exec'd it.
    fake.write_text('#!/bin/sh\necho "$$"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "VLLM_LAUNCHER": "module", "VLLM_PYTHON": str(fake)}
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.strip() == str(proc.pid)


def test_start_script_rejects_an_unknown_launcher() -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": "/usr/bin:/bin", "VLLM_LAUNCHER": "docker"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "VLLM_LAUNCHER" in proc.stderr


def _fake(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_start_script_help_is_its_own_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fake = _fake(tmp_path / "python", f'touch "{marker}"\n')
    env = {"PATH": "/usr/bin:/bin", "VLLM_LAUNCHER": "module", "VLLM_PYTHON": str(fake)}
    for flag in ("--help", "-h"):
        proc = subprocess.run(
            ["bash", str(SCRIPT), flag], env=env, capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, proc.stderr
        assert "--print" in proc.stdout and "VLLM_GPU_MEMORY_UTILIZATION" in proc.stdout
        assert not proc.stdout.startswith("#")
    assert not marker.exists(), "--help started vLLM"


def test_start_script_keeps_its_own_variables_out_of_vllm_s_environment(tmp_path: Path) -> None:
    fake = _fake(tmp_path / "python", "env\n")
    own = {
        "VLLM_MODEL": "org/m",
        "VLLM_SERVED_MODEL_NAME": "m",
        "VLLM_SERVER_HOST": "127.0.0.1",
        "VLLM_PORT": "7001",
        "VLLM_GPU_MEMORY_UTILIZATION": "0.5",
        "VLLM_MAX_NUM_SEQS": "4",
        "VLLM_TENSOR_PARALLEL_SIZE": "1",
        "VLLM_DTYPE": "float16",
        "VLLM_TRUST_REMOTE_CODE": "false",
        "VLLM_ENFORCE_EAGER": "true",
        "VLLM_LAUNCHER": "module",
        "VLLM_PYTHON": str(fake),
    }
    env = {"PATH": "/usr/bin:/bin", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "300", **own}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    seen = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert set(own) & set(seen) == set()
    assert seen["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "300"  # vLLM's own variables pass through


def _script_copy(tmp_path: Path) -> Path:
    """The start script in a project folder of its own, beside a fake python3 without vLLM."""
    copy = tmp_path / "project" / "scripts" / SCRIPT.name
    copy.parent.mkdir(parents=True)
    copy.write_text(SCRIPT.read_text())
    _fake(tmp_path / "bin" / "python3", 'case "$1" in -c) exit 1 ;; esac\necho "python3 $*"\n')
    return copy


def test_start_script_uses_the_project_venv_when_python3_lacks_vllm(tmp_path: Path) -> None:
    copy = _script_copy(tmp_path)
    venv_python = _fake(
        tmp_path / "project" / ".venv" / "bin" / "python",
        'case "$1" in -c) exit 0 ;; esac\necho "venv $*"\n',
    )
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "VLLM_LAUNCHER": "module"}
    proc = subprocess.run(
        ["bash", str(copy)], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.startswith("venv -m vllm.entrypoints.openai.api_server --model ")
    assert f"using the project's {venv_python}" in proc.stderr


def test_start_script_says_how_to_get_vllm_when_no_python_has_it(tmp_path: Path) -> None:
    copy = _script_copy(tmp_path)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "VLLM_LAUNCHER": "module"}
    proc = subprocess.run(["bash", str(copy)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "vLLM is not installed for python3" in proc.stderr
    assert "source .venv/bin/activate" in proc.stderr


def test_start_script_is_bash_n_clean() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_start_script_is_shellcheck_clean() -> None:
    proc = subprocess.run(
        ["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout


# --- containers --------------------------------------------------------------------------------


def test_dockerfiles_pass_the_checks() -> None:
    assert vd.check_dockerfiles() == []


def test_dockerfile_checker_catches_a_root_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = vd.DOCKERFILE.read_text().replace("USER 10001", "USER root")
    bad = tmp_path / "Dockerfile"
    bad.write_text(text)
    monkeypatch.setattr(vd, "DOCKERFILE", bad)
    assert any("non-root" in p for p in vd.check_dockerfiles())


def test_dockerfile_checker_catches_a_missing_copy_source(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nCOPY no-such-file.txt ./\n")
    assert vd.copy_source_problems(bad) == [
        "Dockerfile: COPY source no-such-file.txt does not exist"
    ]


def _gateway_cli_available() -> bool:
    return importlib.util.find_spec("vllm_gateway.cli") is not None


@pytest.mark.skipif(not _gateway_cli_available(), reason="vllm_gateway.cli not installed")
@pytest.mark.parametrize("dockerfile", [vd.DOCKERFILE, vd.DOCKERFILE_AIO])
def test_entrypoint_command_exists(dockerfile: Path) -> None:
    entry = [a for i, a in vd.dockerfile_instructions(dockerfile) if i == "ENTRYPOINT"][-1]
    argv = vd._exec_form(entry)
    assert argv is not None and argv[0] == "vllm-gateway"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_gateway", *argv[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_gateway(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """The real gateway on loopback, its backend a port where nothing listens."""
    port = _free_port()
    env = {
        **os.environ,
        "VLLM_HOST": "127.0.0.1",
        "VLLM_PORT": str(port),
        "VLLM_BACKEND_URL": f"http://127.0.0.1:{_free_port()}",
    }
    log = tmp_path / "gateway.log"
    with log.open("wb") as log_file:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "vllm_gateway", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=1):
                    break
            except OSError:
                assert gateway.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "gateway did not start\n" + log.read_text()
                time.sleep(0.2)
        yield port, env
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


@pytest.mark.skipif(not _gateway_cli_available(), reason="vllm_gateway.cli not installed")
def test_dockerfile_healthcheck_passes_against_a_live_gateway(tmp_path: Path) -> None:
    health = vd.healthcheck_command()
    assert health[0] == "python"
    check = [sys.executable, *health[1:]]
    closed = {**os.environ, "VLLM_PORT": str(_free_port())}
    assert subprocess.run(check, env=closed, capture_output=True, timeout=30).returncode != 0
    with running_gateway(tmp_path) as (_, env):
        result = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not _gateway_cli_available(), reason="vllm_gateway.cli not installed")
def test_live_gateway_exports_every_metric_the_dashboard_uses(tmp_path: Path) -> None:
    with (
        running_gateway(tmp_path) as (port, _),
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response,
    ):
        text = response.read().decode()
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    wanted = vm.GATEWAY_COUNTERS | vm.GATEWAY_GAUGES | vm.GATEWAY_HISTOGRAMS
    assert wanted - exported == set()


def test_compose_passes_the_checks() -> None:
    assert vd.check_compose() == []


# --- Kubernetes --------------------------------------------------------------------------------


def test_committed_manifests_are_fresh_valid_and_meaningful() -> None:
    assert vd.check_manifests() == []


def test_chart_vllm_args_match_the_start_script() -> None:
    docs = vd.load_manifests(vd.K8S_MANIFESTS.read_text())
    vllm = vd._find(docs, "Deployment", "vllm")
    args = vllm["spec"]["template"]["spec"]["containers"][0]["args"]
    script = dry_run({"VLLM_PORT": "8000"})
    # Same model, then the same flags in the same order (the script names the model by --model).
    assert args[0] == vd.flag_values(script, "--model")[0]
    assert args[1:] == script[script.index("--host") :]


def test_schema_validation_catches_a_bad_field() -> None:
    pytest.importorskip("kubernetes_validate")
    docs = vd.load_manifests(vd.K8S_MANIFESTS.read_text())
    svc = copy.deepcopy(vd._find(docs, "Service", "gateway"))
    svc["spec"]["ports"][0]["port"] = "seven thousand"
    assert vd.k8s_schema_problems([svc])


def test_meaning_check_catches_a_grace_period_shorter_than_the_drain() -> None:
    docs = vd.load_manifests(vd.K8S_MANIFESTS.read_text())
    gw = vd._find(docs, "Deployment", "gateway")
    gw["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    assert any("terminationGracePeriodSeconds" in p for p in vd.k8s_meaning_problems(docs))


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    pytest.importorskip("helm_python")
    manifests: list[dict[str, Any]] = vd.load_manifests(render_k8s.render_chart(values))
    return manifests


def test_chart_grace_period_is_prestop_plus_drain_plus_margin() -> None:
    docs = _render(
        {
            "gateway": {
                "preStopSleepSeconds": 10,
                "shutdownTimeoutSeconds": 90.5,
                "terminationGraceMarginSeconds": 7,
            }
        }
    )
    pod = vd._find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 10 + 91 + 7
    assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    assert vd.k8s_meaning_problems(docs) == []


def test_chart_with_every_option_renders_valid_manifests() -> None:
    docs = _render(
        {
            "gateway": {
                "apiKeys": {"values": ["k1", "k2"]},
                "redisUrl": "redis://redis:6379/0",
                "serviceMonitor": {"enabled": True},
                "extraEnv": {"VLLM_MODEL_ALIASES": "gpt-oss=gpt-oss-20b"},
            },
            "vllm": {
                "hfTokenSecret": {"name": "hf"},
                "cacheClaimName": "hf-cache",
                "enforceEager": True,
                "tensorParallelSize": 2,
            },
        }
    )
    assert vd.k8s_schema_problems(docs) == []
    assert vd.k8s_meaning_problems(docs, defaults=False) == []
    secret = vd._find(docs, "Secret", "gateway")
    assert secret["stringData"]["api-keys"] == "k1,k2"
    env = vd._find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    assert env[0]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    data = vd._find(docs, "ConfigMap", "gateway")["data"]
    assert data["VLLM_REDIS_URL"] == "redis://redis:6379/0"
    assert data["VLLM_MODEL_ALIASES"] == "gpt-oss=gpt-oss-20b"
    assert [d["kind"] for d in docs].count("ServiceMonitor") == 2
    vctr = vd._find(docs, "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]
    assert vctr["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--enforce-eager" in vctr["args"]


def test_chart_without_autoscaling_sets_replicas_and_external_backend() -> None:
    docs = _render(
        {
            "vllm": {"enabled": False},
            "gateway": {
                "autoscaling": {"enabled": False},
                "replicas": 3,
                "backendUrl": "http://a:8000,http://b:8000",
            },
        }
    )
    assert vd._find(docs, "HorizontalPodAutoscaler", "gateway") is None
    assert vd._find(docs, "Deployment", "vllm") is None
    assert vd._find(docs, "Deployment", "gateway")["spec"]["replicas"] == 3
    assert (
        vd._find(docs, "ConfigMap", "gateway")["data"]["VLLM_BACKEND_URL"]
        == "http://a:8000,http://b:8000"
    )
    assert vd.k8s_schema_problems(docs) == []


def test_chart_gateway_discovers_the_vllm_pods_through_their_headless_service() -> None:
    from vllm_gateway.settings import load_settings

    docs = vd.load_manifests(vd.K8S_MANIFESTS.read_text())
    data = vd._find(docs, "ConfigMap", "gateway")["data"]
    assert "VLLM_BACKEND_URL" not in data
    assert (
        data["VLLM_BACKEND_DISCOVERY"] == "dns://vllm-gateway-vllm.default.svc.cluster.local:8000"
    )
    settings = load_settings(data)  # the gateway's own parser takes the ConfigMap as it is
    assert settings.backend_discovery == data["VLLM_BACKEND_DISCOVERY"]
    assert settings.pool.drain_timeout == 30
    service = vd._find(docs, "Service", "vllm")
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == "vllm-gateway-vllm"
    vllm = vd._find(docs, "Deployment", "vllm")
    assert vllm["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    # No admin key by default: the pod leaves through DNS only, and no gateway pods Service.
    assert vd._find(docs, "Service", "gateway-pods") is None


def test_chart_vllm_grace_period_is_dns_lag_plus_drain_deadline_plus_margin() -> None:
    docs = _render(
        {
            "vllm": {"dnsLagSeconds": 7, "terminationGraceMarginSeconds": 20},
            "gateway": {"drainTimeoutSeconds": 45.5},
        }
    )
    pod = vd._find(docs, "Deployment", "vllm")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["DRAIN_SECONDS"] == str(7 + 46)
    assert pod["terminationGracePeriodSeconds"] == 7 + 46 + 20
    assert vd._find(docs, "ConfigMap", "gateway")["data"]["VLLM_POOL_DRAIN_TIMEOUT_SECONDS"] == (
        "45.5"
    )
    hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert hook == ["python3", "/etc/vllm-gateway/drain.py"]
    assert vd.k8s_meaning_problems(docs) == []
    pod["terminationGracePeriodSeconds"] = 53
    assert any("must exceed preStop" in p for p in vd.k8s_meaning_problems(docs))


def test_chart_with_admin_keys_drains_through_every_gateway_pod() -> None:
    docs = _render({"gateway": {"adminApiKeys": {"values": ["adm1"]}}})
    secret = vd._find(docs, "Secret", "gateway-admin")
    assert secret["stringData"]["admin-api-keys"] == "adm1"
    gw_env = vd._find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    assert gw_env == [
        {
            "name": "VLLM_ADMIN_API_KEYS",
            "valueFrom": {
                "secretKeyRef": {"name": secret["metadata"]["name"], "key": "admin-api-keys"}
            },
        }
    ]
    pods = vd._find(docs, "Service", "gateway-pods")
    assert pods["spec"]["clusterIP"] == "None"
    vctr = vd._find(docs, "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in vctr["env"]}
    assert env["GATEWAY_PODS"]["value"] == (
        f"{pods['metadata']['name']}.default.svc.cluster.local:7000"
    )
    assert (
        env["DRAIN_ADMIN_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    )
    assert vd.k8s_schema_problems(docs) == []
    assert vd.k8s_meaning_problems(docs) == []


def test_chart_with_a_backend_url_sets_no_discovery() -> None:
    docs = _render({"gateway": {"backendUrl": "http://a:8000"}})
    data = vd._find(docs, "ConfigMap", "gateway")["data"]
    assert data["VLLM_BACKEND_URL"] == "http://a:8000"
    assert "VLLM_BACKEND_DISCOVERY" not in data
    assert vd.k8s_meaning_problems(docs) == []


# --- dashboard and alerts ----------------------------------------------------------------------


def test_dashboard_passes_the_checks() -> None:
    assert vm.check_dashboard() == []


def test_dashboard_shows_every_gateway_metric() -> None:
    exprs = " ".join(e for _, e in vm.dashboard_expressions(json.loads(vm.DASHBOARD.read_text())))
    for metric in vm.GATEWAY_COUNTERS | vm.GATEWAY_GAUGES | vm.GATEWAY_HISTOGRAMS:
        assert metric in exprs, metric


def test_alerts_pass_the_checks() -> None:
    assert vm.check_alerts() == []


def test_alert_rules_have_for_durations_where_the_brief_needs_them() -> None:
    doc = yaml.safe_load(vm.ALERTS.read_text())
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    assert rules["VLLMGatewayQueueGrowing"]["for"] == "5m"
    assert rules["VLLMGatewayHighErrorRate"]["for"] == "5m"
    assert "0.05" in rules["VLLMGatewayHighErrorRate"]["expr"]


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(vllm_gateway_requests[5m])", "unknown metric vllm_gateway_requests"),
        ("sum(rate(vllm_gateway_requests_total[5m])", "syntax"),
        ('sum(rate(vllm_gateway_requests_total{outcome="ok"}[5m]))', "unknown outcome"),
    ],
)
def test_expression_checks_catch_mistakes(expr: str, problem: str) -> None:
    found = vm.expression_problems("x", expr) + vm._outcome_problems("x", expr)
    assert any(problem in p for p in found), found


def test_fallback_name_scan_without_a_parser() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route) (rate(vllm_gateway_overhead_seconds_bucket"
        '{route="/v1/chat/completions"}[5m]))) > on() group_left vllm:num_requests_running'
    )
    assert vm._promql_names_fallback(expr) == {
        "vllm_gateway_overhead_seconds_bucket",
        "vllm:num_requests_running",
    }
    with pytest.raises(ValueError):
        vm._promql_names_fallback("sum(rate(x[5m])")


def test_outcomes_are_the_gateway_s_own() -> None:
    metrics = pytest.importorskip("vllm_gateway.observability.metrics")
    assert set(metrics.OUTCOMES) == vm.OUTCOMES


def test_server_side_outcomes_are_the_5xx_error_types() -> None:
    # A 5xx that answers the client's own request (501 for a transfer coding, 505 for an HTTP
    # version) is the client's fault, not the service's: no alert counts it.
    errors = pytest.importorskip("vllm_gateway.errors")
    gateway_error: type[GatewayError] = errors.GatewayError
    client_error: type[GatewayError] = errors.ClientError
    types = {
        cls.type
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, gateway_error)
        and not issubclass(cls, client_error)
        and cls.status >= 500
    }
    assert types == vm.SERVER_SIDE_OUTCOMES


def test_error_ratio_counts_exactly_the_server_side_outcomes() -> None:
    doc = yaml.safe_load(vm.ALERTS.read_text())
    rule = next(
        r for g in doc["groups"] for r in g["rules"] if r["alert"] == "VLLMGatewayHighErrorRate"
    )
    dashboard = json.loads(vm.DASHBOARD.read_text())
    panel = next(
        e for t, e in vm.dashboard_expressions(dashboard) if t == "Server-side error ratio"
    )
    for expr in (rule["expr"], panel):
        found = re.search(r'outcome=~"([^"]*)"', expr)
        assert found is not None, expr
        regex = found.group(1)
        assert set(regex.split("|")) == vm.SERVER_SIDE_OUTCOMES


def test_monitoring_checks_pass_without_the_parser_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # CI may lack promql-parser: the fallback must accept the same files.
    monkeypatch.setitem(sys.modules, "promql_parser", None)
    assert vm.check_dashboard() == []
    monkeypatch.setattr(vm.shutil, "which", lambda name: None)  # and without promtool
    assert vm.check_alerts() == []
    assert vm._promql_names_fallback("rate(x_total[5m] offset 1h) > 1e-9 * 0.5") == {"x_total"}
