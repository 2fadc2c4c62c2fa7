import sys

from vllm_gateway.cli import main

sys.exit(main())
