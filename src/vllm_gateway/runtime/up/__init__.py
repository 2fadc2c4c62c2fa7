"""``vllm-gateway up``: vLLM's OpenAI server as a supervised child process, the gateway in front.

One module per job, each imported only by the ones above it in this list:

    command.py        the command's sequence: check, prepare, start vLLM, wait, serve, stop
    preflight.py      before vLLM starts: the ports free, the model (converted in a child), the log
    report.py         what ``up`` says about vLLM: ready, died, stopped (and how it ended)
    warmup.py         the wait for vLLM's ``/health``, and the progress line of a blocking step
    arguments.py      ``up``'s own flags, and ``serve``'s flags passed through to the gateway
    vllm_process.py   vLLM's process group: start, signals, stop, the wait for the group to go
    vllm_command.py   what vLLM is started with: its command line and its environment
    vllm_log.py       vLLM's log file: its tail, the lines explained, the launcher's own lines
    console.py        the launcher's voice: ``[up]`` lines on stderr, exit codes spelled out

The package imports nothing here, so that importing one part does not import the others.
"""
