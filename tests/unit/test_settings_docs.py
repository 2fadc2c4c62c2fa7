"""The README's settings table and docs/pool.md's stay in step with the declared settings: every
variable they name exists, every setting is in the README's table or in a page that a row of it
links for it, and the defaults they give are the declared ones (as ``serve --help`` shows them)."""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import re
from pathlib import Path

from vllm_gateway.settings import FIELDS, add_arguments, env_names

ROOT = Path(__file__).resolve().parents[2]


def _table(path: Path, heading: str) -> list[list[str]]:
    """The rows of the first table under ``heading``, as lists of cells."""
    section = path.read_text(encoding="utf-8").split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, f"{path.name}: no table under {heading!r}"
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


def _names(cell: str) -> list[str]:
    """The variables a cell names, braces expanded: `VLLM_A_{B,C}` is VLLM_A_B and VLLM_A_C."""
    out = []
    for name in re.findall(r"`(VLLM_[A-Z0-9_{},*]+)`", cell):
        parts = re.split(r"\{([^}]*)\}", name)
        choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
        out += ["".join(c) for c in itertools.product(*choices)]
    return out


def _shown_defaults() -> dict[str, str]:
    """Each variable's default as ``serve --help`` shows it."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = {}
    for action in parser._actions:
        found = re.search(r"\(env (\w+); default (.*)\)$", action.help or "")
        if found:
            out[found[1]] = found[2]
    return out


README_ROWS = _table(ROOT / "README.md", "## Settings")


def test_every_variable_the_readme_names_is_read() -> None:
    known = set(env_names())
    for row in README_ROWS:
        for name in _names(row[0]):
            if "*" in name:
                assert fnmatch.filter(known, name), f"{name} matches no setting"
            else:
                assert name in known, f"the README names {name}, which the gateway does not read"


def test_every_setting_is_in_the_readme_or_a_page_it_links() -> None:
    missing = []
    for env in env_names():
        rows = [row for row in README_ROWS if env in _names(row[0])]
        if rows:
            continue
        # A row that names it by a pattern (VLLM_POOL_*) links a page that names it.
        pages = [
            ROOT / link
            for row in README_ROWS
            if any("*" in n and fnmatch.fnmatch(env, n) for n in _names(row[0]))
            for link in re.findall(r"\]\((docs/[^)#]+)", row[-1])
        ]
        if not any(f"`{env}`" in page.read_text(encoding="utf-8") for page in pages):
            missing.append(env)
    assert missing == []


def test_the_readmes_defaults_are_the_declared_ones() -> None:
    shown = _shown_defaults()
    checked = 0
    for row in README_ROWS:
        names = _names(row[0])
        if any("*" in n for n in names):
            continue
        cell = row[1]
        parts = [cell] * len(names) if cell == "—" else re.split(r" / |, ", cell)
        if len(parts) != len(names):
            continue  # a combined row (the client bounds): its page gives each
        for name, part in zip(names, parts, strict=True):
            if part == "—":
                assert shown[name] == "none", (name, shown[name])
            elif part.startswith("`"):
                assert part.strip("`") == shown[name], (name, part, shown[name])
            else:
                continue  # words ("the prepared SmolLM2 folder"): what none means there
            checked += 1
    assert checked >= 30


def test_the_pool_pages_table_is_the_declared_one() -> None:
    by_env = {s.env: s for s in FIELDS}
    rows = _table(ROOT / "docs" / "pool.md", "## Settings")
    named = set()
    for key, env, default in rows:
        s = by_env[env.strip("`")]
        assert key.strip("`") == s.name, (key, env)
        value = default.strip("`")
        if s.default is None:
            assert value.startswith("none"), (env, default)
        elif isinstance(s.default, str):
            assert value == s.default, (env, default)
        else:
            assert float(value) == s.default, (env, default)
        named.add(s.env)
    assert named == {s.env for s in FIELDS if s.group.title == "a pool of backends"}
