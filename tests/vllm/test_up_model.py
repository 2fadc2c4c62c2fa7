"""``vllm-gateway up`` prepares the default model in a child process of its own.

The conversion loads torch, transformers and Triton. In the launcher's process they would outlive
the conversion, and at its exit Triton's bindings print ~30 lines of ``nanobind: leaked ...``
after the launcher's last line (``[up] vLLM stopped ...``). Checked here with the real conversion
(about 30 s) into a fresh cache: the folder is prepared, and none of those libraries is loaded in
the process that asked for it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import ROOT, _require_vllm
from vllm_gateway.backends.embedded import model as model_prep

PROBE = """
import sys
from pathlib import Path
from vllm_gateway.runtime.up import preflight
print(preflight.model_to_serve(None, Path(sys.argv[1])))
print(",".join(m for m in ("torch", "transformers", "triton") if m in sys.modules) or "none")
"""


@pytest.mark.timeout(300)
def test_up_converts_the_default_model_in_a_child_process(tmp_path: Path) -> None:
    _require_vllm()
    try:
        result = subprocess.run(
            [sys.executable, "-c", PROBE, str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=280,
        )
        assert result.returncode == 0, result.stderr
        folder, loaded = result.stdout.splitlines()[-2:]
        assert loaded == "none", result.stderr
        assert Path(folder) == model_prep.default_model_dir(tmp_path)
        assert model_prep.is_prepared(Path(folder))
        # The launcher's progress line is all the terminal sees of it: transformers' own
        # progress bars stay in the child's output.
        assert "[up] converting the packaged GGUF file to a bf16 folder: done in" in result.stderr
        assert "de-quantizing" not in result.stderr
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)  # 270 MB
