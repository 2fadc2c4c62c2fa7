"""vLLM's log file, as the launcher reads and marks it: its last line (shown while vLLM warms up),
its tail (shown when vLLM dies), the meaning of lines that read like trouble and are not, and the
launcher's own lines appended to it (``[vllm-gateway up] ...``).

Invariants:
- The log may be growing, absent or unreadable: every reader here returns nothing rather than
  raising, reads a bounded amount, and a line still being written is not judged until it ends.
- Each expected-but-alarming line is explained once per reader, not at each repetition.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "EXPECTED_AT_EXIT",
    "EXPECTED_DURING_WARMUP",
    "LogExplainer",
    "annotate",
    "last_line",
    "tail_lines",
]

# What vLLM prints while it stops on request that reads like trouble but is not.
EXPECTED_AT_EXIT = (
    (
        "EngineDeadError",
        "vLLM 0.32's server stops its own engine on SIGTERM and force-kills it if it is slow to "
        "exit; its output handler, not told, then logs this traceback. After a requested stop it "
        "is harmless: nothing was in flight (the gateway had drained)",
    ),
    (
        "nanobind: leaked",
        "Triton's bindings list the objects still alive when vLLM's interpreter exits; printed "
        "at every stop and harmless (Triton hides the same report in its own worker processes)",
    ),
    (
        "resource_tracker: There appear to be",
        "Python's multiprocessing cleans up the shared memory vLLM's processes leave at exit; "
        "harmless",
    ),
)

# vLLM's warm-up lines that read like trouble but are not: (text in the line, what it means).
EXPECTED_DURING_WARMUP = (
    (
        "No available shared memory broadcast block found",
        "vLLM's server waits for its engine process, which is busy compiling the model "
        "(torch.compile); expected during warm-up, it stops once the engine is ready",
    ),
    (
        "Compiling model again due to a load failure",
        "the CPU build cannot load its cached compiled model, so every start compiles again "
        "(2 to 4 minutes on 2 cores)",
    ),
)


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a growing log file (only its tail is read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            lines = handle.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def tail_lines(path: Path, count: int = 20) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-count:]
    except OSError:
        return []


def annotate(log_path: Path, text: str) -> int:
    """Append a line of the launcher's own to vLLM's log; return the log's size before it."""
    try:
        with log_path.open("ab") as handle:
            size = handle.tell()
            handle.write(f"[vllm-gateway up] {text}\n".encode())
            return size
    except OSError:
        return 0


class LogExplainer:
    """Reads a growing log and returns, once each, the meaning of expected-but-alarming lines."""

    def __init__(
        self,
        log_path: Path,
        table: Sequence[tuple[str, str]] = EXPECTED_DURING_WARMUP,
        offset: int = 0,
    ) -> None:
        self.log_path = log_path
        self.table = table
        self.offset = offset
        self.seen: set[str] = set()
        self.partial = b""

    def new_notes(self, final: bool = False) -> list[str]:
        """Notes for the lines written since the last call (``final``: the last line too, even
        without its newline)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(1 << 20)
        except OSError:
            return []
        self.offset += len(chunk)
        text = (self.partial + chunk).decode("utf-8", "replace")
        lines = text.split("\n")
        self.partial = b"" if final else lines.pop().encode()  # an unfinished line waits
        notes = []
        for line in lines:
            for needle, meaning in self.table:
                if needle in line and needle not in self.seen:
                    self.seen.add(needle)
                    notes.append(f'"{needle}": {meaning}')
        return notes
