"""vLLM's KV-cache event stream: a ZMQ PUB socket that publishes what the prefix cache changed.

The wire format is vLLM 0.32's ``ZmqEventPublisher``: each batch is a 3-frame multipart message,
``[topic (utf-8), seq (8 bytes big-endian), payload]``, where ``seq`` starts at 0 in each process
and grows by 1 per batch, and ``payload`` is the msgpack array ``[ts, [event, ...], 0]`` (unix
time as a float, the events as maps with a ``"type"`` key, data-parallel rank 0). The events
themselves come from ``simulator.prefix_cache``.

The socket is bound on 127.0.0.1 and used only from the simulator's event-loop thread (a ZMQ
socket is not thread-safe); a PUB send never blocks, and a subscriber too slow for the high-water
mark loses batches, as with vLLM. There is no replay socket. ``pyzmq`` and ``msgpack`` are
imported only when events are turned on.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["HWM", "KVEventPublisher", "KVEventsError"]

HWM = 100_000  # vLLM's default high-water mark and queue size
BUFFER_STEPS = 10_000


class KVEventsError(OSError):
    """The event socket could not be opened (pyzmq or msgpack missing, or the port is taken)."""


class KVEventPublisher:
    """One PUB socket on ``127.0.0.1:port`` (0: a free port, read back from ``port``)."""

    def __init__(self, port: int, topic: str = "") -> None:
        try:
            import msgpack
            import zmq
        except ImportError as exc:
            raise KVEventsError(f"kv events need pyzmq and msgpack: {exc}") from None
        self._zmq = zmq
        self._packb = msgpack.packb
        self.topic = topic
        self._topic = topic.encode("utf-8")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.set_hwm(HWM)
        try:
            if port == 0:
                self.port = int(self._sock.bind_to_random_port("tcp://127.0.0.1"))
            else:
                self._sock.bind(f"tcp://127.0.0.1:{port}")
                self.port = port
        except zmq.ZMQError as exc:
            self.close()
            raise KVEventsError(f"kv events: cannot bind tcp://127.0.0.1:{port}: {exc}") from None
        self.seq = 0  # the next batch's sequence number
        self.dropped = 0

    def set_topic(self, topic: str) -> None:
        self.topic = topic
        self._topic = topic.encode("utf-8")

    def publish(self, events: list[Any]) -> None:
        """Send one batch of events (maps with a ``"type"``); nothing for an empty list."""
        if not events:
            return
        payload = self._packb([time.time(), events, 0], use_bin_type=True)
        try:
            self._sock.send_multipart(
                [self._topic, self.seq.to_bytes(8, "big"), payload], flags=self._zmq.NOBLOCK
            )
        except self._zmq.ZMQError:  # never raised by PUB in practice; count it, go on
            self.dropped += 1
        self.seq += 1

    def source(self) -> dict[str, Any]:
        """This publisher as ``GET /kv_event_sources`` describes it (vLLM's ``KVEventsConfig``)."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{self.port}",
            "replay_endpoint": None,
            "buffer_steps": BUFFER_STEPS,
            "hwm": HWM,
            "max_queue_size": HWM,
            "topic": self.topic,
        }

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
