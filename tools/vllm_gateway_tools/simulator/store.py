"""The Responses API store, as vLLM keeps it with ``VLLM_ENABLE_RESPONSES_API_STORE=1``.

What vLLM does (``openai/responses/serving.py``), and so this module:
- A response with ``store`` on is stored when it ends, completed or incomplete (an aborted one is
  not). ``GET /v1/responses/{id}`` answers the stored object, 404 for an unknown id.
- ``background: true`` stores the response at once with ``status: queued`` (it stays queued until
  the end; there is no ``in_progress`` in the store) and generates without a client: leaving does
  not abort it, only ``POST .../cancel`` does, which stores ``status: cancelled``. Cancelling a
  response that is not queued is a 400.
- A background *stream* keeps its events; ``GET ?stream=true&starting_after=N`` replays those
  after sequence number N, then follows the live ones until ``response.completed``. A cancelled
  one never ends, nor does one asked for events after its last: the replay waits for a
  response.completed that will not come, as vLLM's does.

vLLM never evicts its store; the simulator keeps the last ``KEPT`` responses.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import orjson

from vllm_gateway_tools.simulator.engine import Job
from vllm_gateway_tools.simulator.render_responses import ResponsesScript

__all__ = ["KEPT", "Reader", "ResponseStore", "Stored"]

KEPT = 10_000


class Reader(Protocol):
    """A connection that streams a stored response's events."""

    def replay_events(self, events: list[bytes]) -> None: ...

    def replay_end(self) -> None: ...


class Stored:
    """One stored response. As the ``Sink`` of a background job it keeps the stream's events
    (``log``, index = sequence number) and passes them on to its ``readers``."""

    __slots__ = ("ended", "final", "job", "log", "readers", "script", "status")

    def __init__(self, script: ResponsesScript, status: str, *, keep_events: bool) -> None:
        self.script = script
        self.status = status
        self.final: bytes | None = None  # the finished object's JSON
        self.job: Job | None = None  # the background job generating it
        self.log: list[bytes] | None = [] if keep_events else None
        self.ended = False  # the log holds response.completed
        self.readers: set[Reader] = set()

    def body(self) -> bytes:
        """The object ``GET`` answers now."""
        if self.final is not None:
            return self.final
        return orjson.dumps(self.script.obj(self.status, False))

    def attach(self, reader: Reader, starting_after: int | None) -> None:
        """Send ``reader`` the kept events after ``starting_after``, then the live ones."""
        assert self.log is not None
        start = 0 if starting_after is None else max(starting_after + 1, 0)
        backlog = self.log[start:]
        if backlog:
            reader.replay_events(backlog)
        if self.ended and backlog:  # the backlog ends with response.completed
            reader.replay_end()
        else:
            # As vLLM's replay, it waits for response.completed: forever, when that is already
            # behind ``starting_after`` or the response was cancelled.
            self.readers.add(reader)

    # --- Sink: a background job writes here ----------------------------------------------------
    def head(self) -> None:
        pass

    def events(self, events: list[bytes]) -> None:
        if self.log is not None:
            self.log.extend(events)
            for reader in list(self.readers):
                reader.replay_events(events)

    def end_stream(self) -> None:
        self.ended = True
        readers, self.readers = self.readers, set()
        for reader in readers:
            reader.replay_end()

    def send(self, status: int, body: bytes, content_type: bytes | None) -> None:
        pass  # the store is updated by the job's on_end

    def raw(self, data: bytes) -> None:
        pass  # background jobs run without the connection faults

    def drop(self) -> None:
        pass


class ResponseStore:
    """Stored responses by id, the oldest forgotten past ``KEPT``."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def get(self, response_id: str) -> Stored | None:
        return self._items.get(response_id)

    def put(self, response_id: str, stored: Stored) -> None:
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > KEPT:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def finished(self, job: Job, outcome: str, stored: Stored | None) -> None:
        """A job's end: store its final object (unless it was cancelled or aborted)."""
        script = job.script
        assert isinstance(script, ResponsesScript)
        # Ended by the engine (a /pause in abort mode) is an end too; a client leaving is not.
        ended = outcome == "completed" or script.finish == "abort"
        if stored is None:
            if not ended:
                return
            stored = Stored(script, script.status(), keep_events=False)
            self.put(script.request_id, stored)
        stored.job = None
        if stored.status == "cancelled" or not ended:
            return
        stored.status = script.status()
        stored.final = orjson.dumps(script.final_object())
