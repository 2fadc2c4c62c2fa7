"""The house plan, checked: imports point one way, down the rooms of docs/ARCHITECTURE.md, with no
cycle anywhere (not even under TYPE_CHECKING or inside a function), and the runtime package holds
no simulator, benchmark or soak code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "vllm_gateway"

# Lowest first. A module may import from its own room or a lower one.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("vllm_gateway", "errors", "settings", "ids", "identity", "http1")),
    ("backends", ("backends",)),
    ("proxy", ("proxy",)),
    ("observability", ("observability",)),
    ("edge", ("edge",)),
    ("compose", ("compose",)),
    ("runtime", ("runtime",)),
    ("cli", ("cli", "__main__")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _room(module: str) -> int:
    rest = module.split(".", 1)[1] if "." in module else "vllm_gateway"
    head = rest.split(".", 1)[0]
    for rank, (_, heads) in enumerate(ROOMS):
        if head in heads:
            return rank
    raise AssertionError(f"{module} is in no room of the plan: add it to ROOMS")


def _imports(path: Path) -> set[str]:
    """Every vllm_gateway module ``path`` imports, wherever the import statement is."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base)
                module = f"{prefix}.{node.module}" if node.module else prefix
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "vllm_gateway" or name.startswith("vllm_gateway."):
                found.add(name)
            assert not name.startswith("vllm_gateway_tools"), f"{path}: imports the tools"
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # "from a.b import c" names a module a.b.c only when such a module exists.
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_imports_point_down_the_rooms() -> None:
    upward = [
        f"{module} ({ROOMS[_room(module)][0]}) imports {target} ({ROOMS[_room(target)][0]})"
        for module, targets in _graph().items()
        for target in targets
        if _room(target) > _room(module)
    ]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_the_runtime_package_holds_no_tools() -> None:
    names = {p.stem for p in SRC.rglob("*.py")} | {p.name for p in SRC.rglob("*") if p.is_dir()}
    assert not names & {"simulator", "soak", "bench"}
    assert not any(n.startswith("sim_") for n in names)


@pytest.mark.parametrize(
    ("module", "target"),
    [("vllm_gateway.proxy.call", "vllm_gateway.edge.http")],
)
def test_the_rule_sees_an_upward_import(module: str, target: str) -> None:
    # The check is only worth something if it can fail: an edge module is above the proxy.
    assert _room(target) > _room(module)
