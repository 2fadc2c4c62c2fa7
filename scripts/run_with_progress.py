#!/usr/bin/env python3
"""Run a long, chatty command (pip, apt-get, debootstrap) with a progress line, not its output.

    run_with_progress.py --label install --log .venv/install.log --watch .venv -- pip install ...

The command's output goes to the log file. On a terminal one line is rewritten every second; in a
log or a CI transcript a line is printed every ``--every`` seconds (10). The line says what is
happening (the package being collected, downloaded, built or unpacked), the megabytes downloaded
so far (from pip's ``Downloading x (N MB)`` and apt's ``Get: ... [N kB]`` lines), the size of the
``--watch`` folder, and the elapsed time. Warnings and errors of the command are shown as they
come. On failure the log's last lines are printed; the exit status is the command's own.

Standard library only: it runs before the project's virtual environment exists.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

# pip's line about a configured local index that lacks a package's folder: noise, once per package.
NOISE = re.compile(r"is ignored: it is neither a file nor a directory")
SHOWN = re.compile(r"^(WARNING|ERROR|E|W): ")
SIZE = re.compile(r"[(\[]([\d.,]+)\s*([kMG]?B)[)\]]\s*$")
UNITS = {"B": 1e-6, "kB": 1e-3, "MB": 1.0, "GB": 1e3}
PHASES = (
    (re.compile(r"^Collecting (\S+)"), "collecting {}"),
    (re.compile(r"^Requirement already satisfied: (\S+)"), "checking {}"),
    (re.compile(r"^Obtaining (\S+)"), "reading {}"),
    (re.compile(r"^\s*Downloading (\S+)"), "downloading {}"),
    (re.compile(r"^Processing (?!triggers)(\S+)"), "reading {}"),
    (re.compile(r"^\s*Building wheel for (\S+)"), "building {}"),
    (re.compile(r"^Installing collected packages: (.*)"), "installing {}"),
    (re.compile(r"^Successfully installed"), "installed"),
    (re.compile(r"^Would install (.*)"), "resolved {}"),
    (re.compile(r"^Get:\d+ \S+ \S+ \S+ ([^\s\[]\S*) "), "downloading {}"),
    (re.compile(r"^Unpacking (\S+)"), "unpacking {}"),
    (re.compile(r"^Setting up (\S+)"), "setting up {}"),
    # debootstrap
    (re.compile(r"^I: (?:Retrieving|Validating) (\S+?)\.*(?:\s|$)"), "downloading {}"),
    (re.compile(r"^I: (?:Extracting|Unpacking|Configuring) (\S+?)\.*(?:\s|$)"), "installing {}"),
    (re.compile(r"^I: (.*?)\.*$"), "{}"),  # its other steps, as it says them
)


def describe(line: str) -> str | None:
    """A short phrase for a line of pip, apt or debootstrap output, or None for one that says
    nothing new."""
    for pattern, template in PHASES:
        found = pattern.search(line)
        if found:
            if not found.groups():
                return template
            subject = found.group(1)
            if ", " in subject:  # pip's list of packages to install: count them
                subject = f"{subject.count(', ') + 1} packages"
            elif template.startswith("resolved"):  # pip --dry-run's list, space-separated
                subject = f"{len(subject.split())} packages"
            else:
                subject = artifact(subject)
            return template.format(subject)
    return None


def artifact(subject: str) -> str:
    """``torch 2.13.0+cpu`` for a wheel's or sdist's file name or path; anything else unchanged."""
    name = subject.rsplit("/", 1)[-1]
    if name.endswith(".whl"):
        parts = name.split("-")
        return f"{parts[0]} {parts[1]}" if len(parts) >= 5 else name
    for suffix in (".tar.gz", ".zip"):
        if name.endswith(suffix) and "-" in name:
            project, _, version = name[: -len(suffix)].rpartition("-")
            return f"{project} {version}"
    return name


def megabytes(line: str) -> float:
    """The size a ``Downloading``/``Get:`` line announces, in MB (0 for other lines)."""
    if not (line.lstrip().startswith("Downloading") or line.startswith("Get:")):
        return 0.0
    found = SIZE.search(line)
    if not found:
        return 0.0
    return float(found.group(1).replace(",", "")) * UNITS[found.group(2)]


def folder_mb(path: Path) -> float:
    total = 0
    stack = [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total / 1e6


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    def __init__(self, label: str, watch: Path | None, every: float, out: object) -> None:
        self.label = label
        self.watch = watch
        self.every = every
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.phase = "starting"
        self.downloaded = 0.0
        self.watch_base = folder_mb(watch) if watch else 0.0
        self.watch_now = self.watch_base
        self.measured = time.monotonic()
        self.lock = threading.Lock()
        self.dirty = False  # a rewritten line is on screen

    def feed(self, line: str) -> None:
        with self.lock:
            self.downloaded += megabytes(line)
            phase = describe(line)
            if phase:
                self.phase = phase
            if SHOWN.match(line) and not NOISE.search(line):
                self._clear()
                self.out.write(f"[{self.label}] {line}\n")
                self.out.flush()

    def line(self) -> str:
        parts = [f"[{self.label}] {clock(time.monotonic() - self.started)}", self.phase]
        if self.downloaded:
            parts.append(f"{self.downloaded:,.0f} MB downloaded")
        if self.watch:
            parts.append(f"{self.watch.name} {self.watch_now - self.watch_base:+,.0f} MB")
        return " | ".join(parts)

    def tick(self) -> None:
        # Sizing a 4 GB venv reads every inode: at most every 5 s, even when the line is redrawn.
        if self.watch and time.monotonic() - self.measured >= min(5.0, self.every):
            size = folder_mb(self.watch)
            self.measured = time.monotonic()
            with self.lock:
                self.watch_now = size
        with self.lock:
            text = self.line()
            if self.tty:
                width = shutil.get_terminal_size((120, 20)).columns
                self.out.write("\r\x1b[K" + text[: width - 1])
                self.dirty = True
            else:
                self.out.write(text + "\n")
            self.out.flush()

    def _clear(self) -> None:
        if self.dirty:
            self.out.write("\r\x1b[K")
            self.dirty = False

    def finish(self, message: str) -> None:
        with self.lock:
            self._clear()
            self.out.write(f"[{self.label}] {message}\n")
            self.out.flush()


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="run", help="prefix of the progress lines")
    parser.add_argument("--log", required=True, type=Path, help="the command's output (appended)")
    parser.add_argument("--watch", type=Path, help="a folder whose growth is shown")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between lines off a tty")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    out = sys.stdout
    progress = Progress(args.label, args.watch, args.every, out)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=40)
    with args.log.open("a", encoding="utf-8", errors="replace") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            bufsize=1,
        )
        done = threading.Event()

        def ticker() -> None:
            # On a schedule, so the time a tick takes (sizing the folder) does not stretch it.
            interval = 1.0 if progress.tty else args.every
            due = time.monotonic() + interval
            while not done.wait(max(0.0, due - time.monotonic())):
                due += interval
                progress.tick()

        thread = threading.Thread(target=ticker, name="progress", daemon=True)
        thread.start()
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                log.write(raw)
                line = raw.rstrip("\n")
                if line.strip():
                    tail.append(line)
                    progress.feed(line)
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            code = process.wait()
        finally:
            done.set()
            thread.join()
    took = clock(time.monotonic() - progress.started)
    if code == 0:
        grown = ""
        if args.watch:
            grown = f", {args.watch.name} {folder_mb(args.watch) - progress.watch_base:+,.0f} MB"
        progress.finish(f"done in {took}{grown}")
    else:
        progress.finish(f"failed (exit code {code}) after {took}; last lines of {args.log}:")
        for line in tail:
            out.write(f"    {line}\n")
        out.flush()
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
