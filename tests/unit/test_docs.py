"""The docs name only what exists. Every repository path, link, file name, module, Python import
and command that README.md and the pages under docs/ (and deploy/) name is looked up in the tree
as it is when the test runs, so a module moved or a file removed fails here with the page and the
name, until the page is made true again.

What counts as a name:

- a link ``[text](target)``: the file exists; an ``#anchor`` is a heading of the page it points to;
- a repository path anywhere in a page, in prose or code (``src/...``, ``tests/...``,
  ``scripts/...``, ``tools/...``, ``docs/...``, ``deploy/...``; globs and ``{a,b}`` must match
  something; ``file.py::test_name`` names a test defined in the file; ``COMMIT:path`` names
  history and is not looked up);
- in inline code, a partial path (``edge/http.py``, ``results/cpu/``) and a bare source file name
  (``call.py``): it is found from the page's folder, the repository root, ``src/vllm_gateway/``,
  ``tools/vllm_gateway_tools/``, ``tests/``, or a folder of another path the same page names;
- ``python -m X``: X is a module of src/ or tools/ (a package needs ``__main__.py``), or an
  installed one;
- a dotted ``vllm_gateway...`` name in inline code, and the imports of a page's Python blocks:
  the module exists and defines the name (a logger's name passes when src/ uses it);
- ``make X``: a target of the Makefile; ``vllm-gateway X --flag``: the command exists and its
  ``--help`` lists the flag.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(
    {
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "docs" / "results").rglob("README.md"),
        *(ROOT / "deploy").rglob("*.md"),
    }
)
SOURCE_ROOTS = ("src", "tests", "scripts", "tools", "docs", "deploy")
# Where a bare or partial name in inline code is looked for, besides the page's own folder and the
# folders of the other paths the page names.
BASES = (ROOT, ROOT / "src" / "vllm_gateway", ROOT / "tools" / "vllm_gateway_tools", ROOT / "tests")
# Paths that commands make, not files of the repository (each is in .gitignore or a placeholder).
MADE = (".venv/", "test-artifacts/", "bench-results/", "OUT/", "~/", "/")
# Modules that a page may name without their distribution being installed here: vLLM is
# installed by `make install`, not by the gateway-only install that runs the fast tests.
NOT_INSTALLED_OK = {"vllm"}

SOURCE_EXT = r"py|sh|toml|ya?ml|html|js|css"
FILE_EXT = rf"{SOURCE_EXT}|md|json|jsonl|txt|png|gz|log|cfg|ini|csv"
ROOTED = re.compile(
    rf"(?<![\w./~$:-])(?:\./)?((?:{'|'.join(SOURCE_ROOTS)})/[\w.*?{{}},/-]*(?:::[\w\[\]*-]+)?)"
)
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`\n]+)`")
PARTIAL = re.compile(rf"^[\w.*{{}},-]+(?:/[\w.*{{}},-]+)*(?:/|\.(?:{FILE_EXT})(?:::[\w\[\]*-]+)?)$")
BARE_SOURCE = re.compile(rf"^[\w*-]+\.(?:{SOURCE_EXT})$")
MODULE = re.compile(r"\bpython[\d.]*\s+-m\s+([A-Za-z_][\w.]*)")
DOTTED = re.compile(r"^(vllm_gateway(?:_tools)?(?:\.\w+)+)")
# A command where a command starts: at the start of a line of code (after variable assignments)
# or after a shell operator, "$ " or "or: ".
_AT_START = r"(?:^|[;&|(]\s*|\$\s+|or:\s+)(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
MAKE = re.compile(_AT_START + r"make\s+([a-z][\w-]*)", re.MULTILINE)
COMMAND = re.compile(
    _AT_START + r"vllm-gateway[ \t]+([a-z][\w-]*)((?:[ \t]+[^\s`|;&#]+)*)", re.MULTILINE
)
# A file a command runs or reads: ``python FILE``, ``-r FILE``, ``-f FILE``.
FILE_ARG = re.compile(r"(?:\bpython[\d.]*|(?<!\S)-[rf]|--file)[ \t]+([\w./-]+)")
IMPORT_FROM = re.compile(r"^\s*from\s+([\w.]+)\s+import\s+\(?([\w, ]+)", re.MULTILINE)
IMPORT = re.compile(r"^\s*import\s+([\w., ]+)", re.MULTILINE)
SHELL = ("", "bash", "sh", "shell", "console")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*(\w*)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _split(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The page's prose (fenced blocks blanked, line count kept) and its fenced blocks with
    their language."""
    prose: list[str] = []
    blocks: list[tuple[str, str]] = []
    fence = ""
    lang = ""
    body: list[str] = []
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence:
            if match and match.group(1).startswith(fence[:3]) and not match.group(2):
                blocks.append((lang, "\n".join(body)))
                fence, body = "", []
            else:
                body.append(line)
            prose.append("")
        elif match:
            fence, lang = match.group(1), match.group(2).lower()
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def _expand(pattern: str) -> list[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [x for part in match.group(1).split(",") for x in _expand(head + part + tail)]


def _found(base: Path, name: str) -> list[Path]:
    """What ``name`` (maybe a glob, maybe with ``{a,b}``) names under ``base``; all or nothing."""
    found: list[Path] = []
    for one in _expand(name):
        one = one.rstrip("/") or "."
        hits = sorted(base.glob(one)) if any(c in one for c in "*?[") else [base / one]
        hits = [hit for hit in hits if hit.exists()]
        if not hits:
            return []
        found.extend(hits)
    return found


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }


def _check_node(path: Path, node: str) -> str | None:
    """``node`` (a name, a glob of names, or ``name[param]``) is defined in ``path``."""
    name = node.split("[", 1)[0]
    if path.suffix != ".py" or not fnmatch.filter(_test_names(path), name):
        return f"{_rel(path)} defines no {name}"
    return None


class Page:
    def __init__(self, path: Path, text: str | None = None) -> None:
        self.path = path
        self.text = path.read_text() if text is None else text
        self.prose, self.blocks = _split(self.text)
        self.folders: set[Path] = set()  # folders of the paths the page names

    def saw(self, hits: list[Path]) -> None:
        for hit in hits:
            self.folders.add(hit if hit.is_dir() else hit.parent)
            if hit.is_dir():
                self.folders.add(hit.parent)

    def commands(self) -> str:
        """Where commands are: inline code, one span a line, and the fenced shell blocks (no
        language, or a shell's; output is fenced as ``text``), continued lines joined."""
        spans = [m.group(1) for m in INLINE.finditer(self.prose)]
        shell = [block for lang, block in self.blocks if lang in SHELL]
        return "\n".join([*spans, *shell]).replace("\\\n", " ")

    def inline_words(self) -> Iterator[str]:
        for span in INLINE.finditer(self.prose):
            for word in span.group(1).split():
                word = word.strip("()[],;:'\"")
                if word:
                    yield word


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def _anchors(path: Path) -> set[str]:
    prose, _ = _split(path.read_text())
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for line in prose.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match is None:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(page: Page) -> list[str]:
    problems: list[str] = []
    for match in LINK.finditer(page.prose):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        file, _, anchor = target.partition("#")
        path = (page.path.parent / file).resolve() if file else page.path
        if not path.exists():
            problems.append(f"link {target}: no {file}")
            continue
        page.saw([path])
        if anchor and path.suffix == ".md" and anchor not in _anchors(path):
            problems.append(f"link {target}: {_rel(path)} has no heading #{anchor}")
    return problems


def _rooted(page: Page) -> list[str]:
    problems: list[str] = []
    for match in ROOTED.finditer(page.text):
        name, _, node = match.group(1).partition("::")
        name = name.rstrip(".,")
        hits = _found(ROOT, name)
        if not hits:
            problems.append(f"path {name}: not in the repository")
            continue
        page.saw(hits)
        if node and (problem := _check_node(hits[0], node)):
            problems.append(f"path {match.group(1)}: {problem}")
    return problems


def _inline_names(page: Page) -> list[str]:
    """Partial paths and bare source file names in inline code."""
    problems: list[str] = []
    later: list[str] = []
    for word in page.inline_words():
        if word.startswith(MADE) or word.startswith(SOURCE_ROOTS) or "://" in word:
            continue
        word = word.removeprefix("./")
        if not (PARTIAL.match(word) and ("/" in word.rstrip("/") or BARE_SOURCE.match(word))):
            continue
        name, _, node = word.partition("::")
        for base in (page.path.parent, *BASES):
            hits = _found(base, name)
            if hits:
                page.saw(hits)
                if node and (problem := _check_node(hits[0], node)):
                    problems.append(f"name {word}: {problem}")
                break
        else:
            later.append(word)
    for word in later:  # found beside another path of the same page?
        name = word.partition("::")[0]
        if not any(_found(folder, name) for folder in page.folders):
            problems.append(
                f"name {word}: not found from the page's folder, the roots, or a folder it names"
            )
    return problems


@functools.cache
def _module_file(name: str) -> Path | None:
    """The file of module ``name`` in src/ or tools/ (a package's __init__.py), if there."""
    for top in (ROOT / "src", ROOT / "tools"):
        base = top.joinpath(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.exists():
                return candidate
    return None


def _installed(name: str) -> bool:
    """Whether module ``name`` can be found without importing it (nor its packages)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        return False
    locations = list(spec.submodule_search_locations or [])
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        found = [Path(d) / part for d in locations if (Path(d) / part).is_dir()]
        if found:
            locations = [str(d) for d in found]
            continue
        return last and any((Path(d) / f"{part}.py").exists() for d in locations)
    return True


def _runnable(name: str) -> str | None:
    """Why ``python -m name`` cannot run, or None."""
    path = _module_file(name)
    if path is not None:
        if path.name == "__init__.py" and not (path.parent / "__main__.py").exists():
            return f"python -m {name}: a package without __main__.py"
        return None
    if _installed(name):
        return None
    if (
        name.split(".")[0] in NOT_INSTALLED_OK
        and importlib.util.find_spec(name.split(".")[0]) is None
    ):
        return None
    return f"python -m {name}: no such module in src/, tools/ or installed"


@functools.cache
def _defined(path: Path) -> frozenset[str]:
    """Top-level names of a module: definitions, assignments, imports."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


@functools.cache
def _quoted_in_src(text: str) -> bool:
    """Whether src/ uses ``text`` as a string literal (a logger's name, for one)."""
    needles = (f'"{text}"', f"'{text}'")
    return any(any(n in p.read_text() for n in needles) for p in (ROOT / "src").rglob("*.py"))


def _dotted(name: str) -> str | None:
    """Why the dotted ``vllm_gateway...`` name does not exist, or None."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        path = _module_file(".".join(parts[:cut]))
        if path is None:
            continue
        rest = parts[cut:]
        if not rest or rest[0] in _defined(path):
            return None
        break
    if _quoted_in_src(name):
        return None
    return f"{name}: no such module or name"


def _modules(page: Page) -> list[str]:
    problems: list[str] = []
    for match in MODULE.finditer(page.text):
        if problem := _runnable(match.group(1)):
            problems.append(problem)
    for word in page.inline_words():
        dotted = DOTTED.match(word)
        if dotted and (problem := _dotted(dotted.group(1))):
            problems.append(problem)
    for lang, block in page.blocks:
        if lang != "python":
            continue
        names = [
            f"{m.group(1)}.{name.strip()}"
            for m in IMPORT_FROM.finditer(block)
            for name in m.group(2).split(",")
            if name.strip()
        ]
        names += [n.strip() for m in IMPORT.finditer(block) for n in m.group(1).split(",")]
        for name in names:
            if name.startswith("vllm_gateway") and (problem := _dotted(name)):
                problems.append(f"import {problem}")
    return problems


@functools.cache
def _make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w-]*)\s*:", text, re.MULTILINE))


@functools.cache
def _help(command: str) -> str | None:
    """``vllm-gateway COMMAND --help``, or None when there is no such command."""
    result = subprocess.run(
        [sys.executable, "-m", "vllm_gateway", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    if result.returncode != 0:
        return None
    return result.stdout


def _commands(page: Page) -> list[str]:
    problems: list[str] = []
    text = page.commands()
    for match in MAKE.finditer(text):
        if match.group(1) not in _make_targets():
            problems.append(f"make {match.group(1)}: no such target in the Makefile")
    for match in FILE_ARG.finditer(text):
        name = match.group(1)
        if name.startswith(("-", *MADE)) or not ("/" in name or "." in name):
            continue
        if not _found(ROOT, name.removeprefix("./")):
            problems.append(f"{match.group(0).strip()}: no {name} in the repository")
    for match in COMMAND.finditer(text):
        command, rest = match.group(1), match.group(2)
        usage = _help(command)
        if usage is None:
            problems.append(f"vllm-gateway {command}: no such command")
            continue
        for flag in re.findall(r"(?<!\S)(--[a-z][\w-]*)", rest):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage):
                problems.append(f"vllm-gateway {command} {flag}: not in its --help")
    return problems


def test_the_pages_are_found() -> None:
    names = {_rel(p) for p in PAGES}
    assert {"README.md", "docs/README.md", "docs/reliability.md"} <= names


@pytest.mark.parametrize("path", PAGES, ids=_rel)
def test_every_name_a_page_gives_exists(path: Path) -> None:
    page = Page(path)
    problems = [*_links(page), *_rooted(page), *_inline_names(page)]
    problems += [*_modules(page), *_commands(page)]
    assert not problems, f"{_rel(path)} names what does not exist:\n  " + "\n  ".join(problems)


def test_docs_readme_lists_every_page() -> None:
    index = (ROOT / "docs" / "README.md").read_text()
    listed = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages == listed, f"docs/README.md: missing {pages - listed}, extra {listed - pages}"


# --- the checker itself: each rule catches what it is for ----------------------------------------


def _problems(text: str) -> list[str]:
    page = Page(ROOT / "docs" / "a-page.md", text)
    return [*_links(page), *_rooted(page), *_inline_names(page), *_modules(page), *_commands(page)]


@pytest.mark.parametrize(
    "text",
    [
        "See `src/vllm_gateway/launcher.py`.",
        "Run `python -m vllm_gateway.model_prep`.",
        "The server (`http_server.py`) and the client (`upstream.py`).",
        "The pages of `docs/results/cpu/nowhere/*`.",
        "[the budget](reliability.md#no-such-heading)",
        "[a page](nowhere.md)",
        "`tests/integration/test_hostile_peers.py::test_that_does_not_exist`",
        "`tests/integration/test_hostile_peers.py::test_zz_*`",
        "```python\nfrom vllm_gateway.observe import Observer\n```",
        "`vllm_gateway.embedded.EmbeddedBackend`",
        "`make everything`",
        "`vllm-gateway serve --no-such-flag`",
        "`vllm-gateway launch`",
        "`python -m vllm_gateway_tools`",
        "`python scripts/soak.py --duration 180`",
        "```\npip install -r requirements-nothing.txt\n```",
    ],
)
def test_the_checker_finds_a_stale_name(text: str) -> None:
    assert _problems(text), text


def test_the_checker_passes_true_names() -> None:
    text = (
        "`src/vllm_gateway/cli.py`, `tests/unit/test_docs.py::test_the_pages_are_found`, "
        "`tests/unit/test_docs.py::test_the_checker_*`, "
        "`docs/{routes,pool}.md`, `python -m vllm_gateway`, `python -m pytest`, `cli.py`, "
        "`vllm_gateway.cli.main`, `vllm_gateway.access`, `make test`, "
        "`vllm-gateway serve --port 7000`, `.venv/install.log`, `/v1/models`, "
        "`python run_vllm_gateway.py`, `kubectl apply -f deploy/k8s/vllm-gateway.yaml`, "
        "`git show 3d1ebca:docs/results/gone.log`, "
        "[the bounds](reliability.md#bounds-what-a-peer-can-make-the-gateway-wait-for-or-hold).\n"
        "```python\nfrom vllm_gateway.settings import Settings\n```\n"
    )
    assert _problems(text) == []
