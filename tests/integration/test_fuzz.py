"""S8: schema-driven fuzzing of the gateway's OpenAPI document with schemathesis.

The gateway (a child process, keys on) runs in front of the simulator (a child process); the
``st`` command generates valid and invalid input for every documented operation, bounded to 50
examples each, and checks that nothing answers 5xx and that input the schema forbids is refused
with a 4xx. Servers run in their own processes because schemathesis's client blocks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS, spawn_gateway
from vllm_gateway_tools.soak import SimulatorProcess

pytestmark = pytest.mark.timeout(240)

ST = shutil.which("st", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(ST is None, reason="schemathesis is not installed (pip install schemathesis)")
def test_s8_fuzzing_the_openapi_document_finds_no_5xx_and_invalid_input_gets_4xx(
    tmp_path: Path,
) -> None:
    with (
        SimulatorProcess("--ttft", "0.005", "--itl", "0.001") as sim,
        spawn_gateway(
            {"VLLM_BACKEND_URL": sim.url, "VLLM_API_KEYS": "fuzz-key", "VLLM_LOG_LEVEL": "warning"},
            name="fuzz",
        ) as gw,
    ):
        result = subprocess.run(
            [
                str(ST),
                "run",
                gw.url + "/openapi.json",
                "-H",
                "Authorization: Bearer fuzz-key",
                "--checks",
                "not_a_server_error,negative_data_rejection",
                "--max-examples",
                "50",
                "--no-shrink",
                "--seed",
                "8",
                "--generation-database",
                "none",
                "--workers",
                "1",
                "--request-timeout",
                "20",
                "--no-color",
                "--max-failures",
                "5",
                "--report-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=220,
            cwd=tmp_path,
            check=False,
        )
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "schemathesis.txt").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert "Tested: " in result.stdout
