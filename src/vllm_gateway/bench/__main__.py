"""``python -m vllm_gateway.bench``."""

import sys

from vllm_gateway.bench.cli import main

sys.exit(main())
