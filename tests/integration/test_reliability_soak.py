"""R14, short: the soak tool for 20 s with faults, abandoned requests and two backend restarts.

The full soak (3 minutes by default) is ``python -m vllm_gateway_tools.soak``; see docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def test_r14_short_soak_breaks_no_promise_and_settles(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_gateway_tools.soak",
            "--duration",
            "20",
            "--concurrency",
            "10",
            "--restart-every",
            "8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    report = json.loads(out.read_text())
    assert result.returncode == 0, result.stdout + result.stderr + json.dumps(report["defects"][:5])
    assert report["broken_promises"] == 0 and report["settled"]
    assert report["restarts"] == 2 and report["disconnects"] > 0
    endings = report["endings"]
    assert endings.get("stream_done", 0) > 0 and endings.get("json_200", 0) > 0
    assert endings.get("stream_error", 0) > 0 and endings.get("error_json", 0) > 0
    assert report["gateway_exit"] == 0
    # Open descriptors come back to where they were after warm-up, give or take the idle pool.
    assert report["end"]["fds"] <= report["start"]["fds"] + report["concurrency"] + 5
