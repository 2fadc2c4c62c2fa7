"""Run the soak (reliability case R14); the same as ``python -m vllm_gateway.soak``.

python scripts/soak.py --duration 180 --out soak-report.json
"""

import sys

from vllm_gateway.soak import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
