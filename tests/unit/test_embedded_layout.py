"""Finding vLLM's parts across its module layouts (0.32 and the GPU image's 0.26)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from vllm_gateway.backends.embedded.engine import _first_of


@pytest.fixture
def fake_modules(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    new = types.ModuleType("gw_layout_new")
    new.thing = "new"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gw_layout_new", new)
    return new


def test_first_path_that_imports_wins(fake_modules: types.ModuleType) -> None:
    assert _first_of("gw_layout_missing.sub:thing", "gw_layout_new:thing") == "new"
    assert _first_of("gw_layout_new:thing", "gw_layout_missing:thing") == "new"


def test_missing_attribute_falls_through(fake_modules: types.ModuleType) -> None:
    assert _first_of("gw_layout_new:absent", "gw_layout_new:thing") == "new"


def test_default_when_no_layout_has_it() -> None:
    marker = object()
    assert _first_of("gw_layout_missing:thing", default=marker) is marker


def test_nothing_found_raises_the_first_error() -> None:
    with pytest.raises(ImportError) as info:
        _first_of("gw_layout_missing_a:thing", "gw_layout_missing_b:thing")
    assert isinstance(info.value, ModuleNotFoundError)
    assert info.value.name == "gw_layout_missing_a"


def test_a_broken_module_is_not_taken_for_another_layout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The module exists, but its own import of something absent fails: a broken install,
    # reported as it is instead of silently trying the next layout.
    (tmp_path / "gw_layout_broken.py").write_text("import gw_layout_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        _first_of("gw_layout_broken:thing", "gw_layout_also_missing:thing")
    assert info.value.name == "gw_layout_not_installed"


def test_an_unknown_layout_is_named_as_such_not_as_a_missing_vllm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm_gateway.backends.embedded import engine as embedded

    fake_vllm = types.ModuleType("vllm")
    fake_vllm.__version__ = "9.9.9"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    moved = ModuleNotFoundError("No module named 'vllm.somewhere'", name="vllm.somewhere")
    message = embedded._import_error_message(moved)
    assert "cannot load its parts from the installed vLLM 9.9.9" in message
    assert "module layouts of vLLM 0.26 and 0.32" in message

    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` finds when it is absent
    missing = ModuleNotFoundError("No module named 'vllm'", name="vllm")
    assert "cannot be imported" in embedded._import_error_message(missing)
