"""Start the gateway, as the architecture describes: ``python run_vllm_gateway.py``.

Equivalent to ``vllm-gateway serve``; settings come from the VLLM_* environment variables.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from vllm_gateway.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
