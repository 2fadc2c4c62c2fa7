"""The pacing engine: one ``Job`` per engine request (generation or pooling), driven by timers.

There is no task per request and no sleep per chunk: a job holds at most one ``loop.call_at``
timer, and each timer callback writes the events due at that moment (rendered by the job's
``render.Script``) to the job's ``Sink``. The sink is the client's connection, or, for a background
Responses request, the response store (``simulator.store``), which keeps the events and passes them
to whoever is reading.

Invariants:
- A job is counted ``running`` from ``start`` until exactly one ``finish``, which records its
  outcome: ``completed``, ``error`` (a status fault), ``dropped`` (``drop_after`` cut the
  connection) or ``aborted`` (the client left, a cancel, or ``/pause`` in abort mode).
- Every token is due at ``t0 + ttft + i * itl``, where a job's ``ttft`` is the config's plus its
  prefill time (the prefix cache model's ``prefill_per_token`` per uncached prompt token);
  holding a job (``/sleep``, ``/pause``) moves ``t0`` on by the time it was held, so a held
  stream resumes where it stopped.
- ``state.active`` holds the jobs with a timer armed (or due to be); a held job is in
  ``state.held``; a stalled or hung job is in neither: it waits for its client to leave.
- With ``max_num_seqs``, a job that finds that many running waits in ``state.waiting`` (arrival
  order; ``vllm:num_requests_waiting``) and begins, its clock starting then, when one ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from vllm_gateway_tools.simulator import render
from vllm_gateway_tools.simulator.config import SimulatorConfig
from vllm_gateway_tools.simulator.state import SimState

__all__ = ["JSON", "Job", "Sink"]

JSON = b"application/json"
_HTML = (
    b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
)


class Sink(Protocol):
    """Where a job's bytes go. ``end_stream`` and ``send`` end the response."""

    def head(self) -> None: ...

    def events(self, events: list[bytes]) -> None: ...

    def end_stream(self) -> None: ...

    def send(self, status: int, body: bytes, content_type: bytes | None) -> None: ...

    def raw(self, data: bytes) -> None: ...

    def drop(self) -> None: ...


class Job:
    """The pacing state of one engine request."""

    __slots__ = ("cfg", "chunks", "done", "handle", "held_at", "i", "loop", "model", "on_end",
                 "record", "route", "script", "sink", "state", "t0", "ttft")  # fmt: skip

    def __init__(self, *, state: SimState, cfg: SimulatorConfig, record: dict[str, Any],
                 script: render.Script, route: str, sink: Sink,
                 loop: asyncio.AbstractEventLoop,
                 on_end: Callable[[Job, str], None] | None = None,
                 prefill: float = 0.0) -> None:  # fmt: skip
        self.state = state
        self.cfg = cfg
        self.record = record
        self.script = script
        self.route = route
        self.sink = sink
        self.loop = loop
        self.on_end = on_end  # called once, from finish, with the outcome
        # The served model it counts under (a LoRA adapter counts under the base model).
        self.model = script.model if script.model in cfg.models else cfg.models[0]
        self.t0 = loop.time()  # every token is due at t0 + ttft + i * itl
        self.ttft = cfg.ttft + prefill
        self.handle: asyncio.TimerHandle | None = None
        self.held_at: float | None = None
        self.i = 0  # next token index
        self.chunks = 0  # SSE events written
        self.done = False

    # --- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Count the request, then run it, or (``max_num_seqs`` requests already run) queue it."""
        state = self.state
        state.job_started(self.route, self.model, self.script.prompt_tokens)
        self.record["stream"] = self.script.stream
        limit = state.config.max_num_seqs
        if limit and state.running - len(state.waiting) > limit:  # running counts this job too
            state.waiting[self] = None  # state.schedule() begins it when a running job ends
            return
        self.begin()

    def begin(self) -> None:
        """Send what is due at once (faults, the stream head); its clock starts now."""
        if self.done:  # its client left while it waited
            return
        cfg, record, script = self.cfg, self.record, self.script
        self.t0 = self.loop.time()
        if cfg.status is not None:
            record["fault"] = f"status={cfg.status}"
            body = script.error(cfg.status, f"simulated error (status {cfg.status})")
            self._end_whole(cfg.status, body, JSON, "error")
        elif cfg.error_traceback:
            record["fault"] = "error_traceback"
            body = script.error(
                500, render.traceback_text(script.request_id), "InternalServerError"
            )
            self._end_whole(500, body, JSON, "error")
        elif cfg.hang:
            record["fault"] = "hang"  # hold the connection: the client's leaving finishes it
        elif cfg.malformed == "html":
            record["fault"] = "malformed=html"
            self._end_whole(200, _HTML, b"text/html; charset=utf-8", "completed")
        elif script.stream:
            record["status"] = 200
            self.sink.head()
            if cfg.malformed is not None:
                record["fault"] = f"malformed={cfg.malformed}"
            if self._cut() or not self._emit(script.opening()):
                return
            self._arm()
        else:
            self._arm()

    def _arm(self) -> None:
        """Schedule the next due step, or hold the job while the engine sleeps or is paused."""
        state = self.state
        if state.holding:
            self.held_at = self.loop.time()
            state.held.add(self)
            return
        state.active.add(self)
        cfg = self.cfg
        if self.script.stream:
            due = self.t0 + self.ttft + cfg.itl * self.i
            self.handle = self.loop.call_at(due, self._tick)
        else:
            due = self.t0 + self.ttft + cfg.itl * max(self.script.n - 1, 0)
            self.handle = self.loop.call_at(due, self._whole)

    def hold(self) -> None:
        """Freeze a running job (``/pause?mode=keep``, ``/sleep?mode=keep``)."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.state.active.discard(self)
        self.held_at = self.loop.time()
        self.state.held.add(self)

    def release(self) -> None:
        """Go on after a hold, as if the held time had not passed."""
        if self.held_at is not None:
            self.t0 += self.loop.time() - self.held_at
            self.held_at = None
        self.state.held.discard(self)
        self._arm()

    # --- streaming -----------------------------------------------------------------------------
    def _tick(self) -> None:
        """Send the events due now: one token, with the opening and closing events around it."""
        self.handle = None
        cfg, script = self.cfg, self.script
        i = self.i
        last = i == script.n - 1
        events = script.first() if i == 0 else []
        if cfg.malformed == "huge_line" and i == script.n // 2:
            # One enormous line with no newline, then the body ends: the reader must bound it.
            self.i = i + 1
            if self._emit([*events, b"data: " + b"x" * cfg.huge_line_bytes]):
                self._end_stream("completed")
            return
        events += script.tokens(i, last)
        if cfg.malformed == "bad_json" and i == script.n // 2:
            events.append(script.bad_event)
        if last:
            events += self._closing()
        self.i = i + 1
        if not self._emit(events):
            return
        if last:
            self._end_stream("completed")
        else:
            self.handle = self.loop.call_at(self.t0 + self.ttft + cfg.itl * self.i, self._tick)

    def _closing(self) -> list[bytes]:
        closing = self.script.closing()
        return closing[:-1] if self.cfg.malformed == "no_done" else closing

    def _emit(self, events: list[bytes]) -> bool:
        """Send ``events``, obeying stall_after/drop_after. False: the stream is cut."""
        if not events:
            return True
        cfg = self.cfg
        if cfg.stall_after is None and cfg.drop_after is None:
            self.sink.events(events)
            self.chunks += len(events)
            self.state.chunks += len(events)
            return True
        for event in events:
            self.sink.events([event])
            self.chunks += 1
            self.state.chunks += 1
            if self._cut():
                return False
        return True

    def _cut(self) -> bool:
        """Apply stall_after/drop_after once ``chunks`` reaches them. True: the stream stops."""
        cfg = self.cfg
        if cfg.drop_after is not None and self.chunks >= cfg.drop_after:
            self._drop()
            return True
        if cfg.stall_after is not None and self.chunks >= cfg.stall_after:
            self._stall()
            return True
        return False

    def _stall(self) -> None:
        self.record["fault"] = f"stall_after={self.cfg.stall_after}"
        self.record["chunks"] = self.chunks
        self.state.active.discard(self)  # nothing more is sent until the client leaves

    def _drop(self) -> None:
        self.record["fault"] = f"drop_after={self.cfg.drop_after}"
        self.finish("dropped")
        self.sink.drop()  # flushes what was sent, then FIN: no terminating chunk

    def _end_stream(self, outcome: str) -> None:
        self.finish(outcome)
        self.sink.end_stream()

    # --- whole responses -----------------------------------------------------------------------
    def _whole(self) -> None:
        """The non-streamed response, due once every token would have been generated."""
        self.handle = None
        cfg = self.cfg
        self.i = self.script.n
        body = self.script.whole()
        if cfg.malformed == "bad_json":
            self.record["fault"] = "malformed=bad_json"
            body = b"{not json"
        if cfg.drop_after is None and cfg.stall_after is None:
            self._end_whole(200, body, JSON, "completed")
            return
        # Cut mid-body: the head promises the full length, only half of the body follows.
        self.record["status"] = 200
        self.sink.raw(
            render.response_head(200, JSON, len(body), close=False) + body[: len(body) // 2]
        )
        if cfg.drop_after is not None:
            self._drop()
        else:
            self._stall()

    def _end_whole(
        self, status: int, body: bytes, content_type: bytes | None, outcome: str
    ) -> None:
        self.record["status"] = status
        self.finish(outcome)
        self.sink.send(status, body, content_type)

    # --- early ends ----------------------------------------------------------------------------
    def end_early(self, finish: str) -> None:
        """End now, with what was generated so far and ``finish`` as the finish reason (the engine
        aborted the request: ``/pause`` or ``/sleep`` in abort mode). Counted as aborted."""
        if self.done:
            return
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        script = self.script
        if script.stream:
            events = script.first() if self.i == 0 else []
            script.n, script.finish = self.i, finish
            events += script.cut_short() + self._closing()
            if self._emit(events):
                self._end_stream("aborted")
        else:
            elapsed = self.loop.time() - self.t0 - self.ttft
            made = (
                0 if elapsed < 0 else 1 + int(elapsed / self.cfg.itl) if self.cfg.itl else script.n
            )
            script.n, script.finish = min(script.n, made), finish
            self.i = script.n
            self._end_whole(200, script.whole(), JSON, "aborted")

    def finish(self, outcome: str) -> None:
        """Account for the end of the request. Runs once; later calls do nothing."""
        if self.done:
            return
        self.done = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.record.update(outcome=outcome, chunks=self.chunks, ended=time.time())
        tokens = self.script.n if outcome == "completed" else self.i
        self.state.job_finished(self, outcome, tokens)  # may answer a /pause?mode=wait
        if self.on_end is not None:
            self.on_end(self, outcome)
