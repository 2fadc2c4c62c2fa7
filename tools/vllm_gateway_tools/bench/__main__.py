"""``python -m vllm_gateway_tools.bench``."""

import sys

from vllm_gateway_tools.bench.cli import main

sys.exit(main())
