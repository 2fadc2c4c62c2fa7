import sys

from vllm_gateway_tools.simulator.runner import main

sys.exit(main())
