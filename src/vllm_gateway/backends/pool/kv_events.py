"""A member's KV-cache events (vLLM's ``--kv-events-config``), read into its ``MemberCache``.

vLLM publishes on a ZMQ PUB socket; each message has three frames: the topic, a sequence number
(8 bytes, big-endian, from 0 in each engine process) and a msgpack payload ``[ts, [event, ...],
data_parallel_rank]``. Each event is a map with a ``type``: ``BlockStored`` (``block_hashes``,
``parent_block_hash``, ``token_ids``, ``block_size``), ``BlockRemoved`` (``block_hashes``) or
``AllBlocksCleared``. A sequence number lower than the last one means the engine restarted: its
cache is empty, and so is the index.

The endpoint comes from the member's ``GET /kv_event_sources`` (rank 0; a wildcard host is
replaced by the member's host) unless the backends file gives one. Needs the ``kv`` extra
(pyzmq, msgpack); without it the pool routes on what it sent each member.

Bounds, whatever a member sends: a message over ``MAX_MESSAGE_BYTES`` closes the connection (ZMQ's
``MAXMSGSIZE``; the index is emptied and the pool subscribes again at its next refresh), at most
``QUEUED_MESSAGES`` wait unread (``RCVHWM``; the rest are dropped, counted as a gap), and a message
that does not decode as above is counted ``bad`` and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from vllm_gateway.backends.pool.cache_index import MemberCache

__all__ = ["MAX_MESSAGE_BYTES", "QUEUED_MESSAGES", "apply_message", "endpoint_for", "subscribe"]

log = logging.getLogger("vllm_gateway.backends.pool.kv_events")

MAX_MESSAGE_BYTES = 4 << 20
QUEUED_MESSAGES = 16
_BATCH = 64  # messages read between two turns of the event loop
_RECHECK_S = 1.0  # the longest wait between two looks at the sockets


def endpoint_for(sources: Any, member_url: str) -> tuple[str, str] | None:
    """(endpoint, topic) from a ``/kv_event_sources`` answer, or None when events are off."""
    if not isinstance(sources, Mapping) or not sources:
        return None
    first = sources.get("0", next(iter(sources.values())))
    if not isinstance(first, Mapping) or not first.get("enable_kv_cache_events"):
        return None
    endpoint, topic = first.get("endpoint"), first.get("topic") or ""
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        return None  # ipc:// and inproc:// are the member's own host's business
    host_port = endpoint[len("tcp://") :]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host in ("*", "0.0.0.0", "[::]", "::", ""):
        host = urlsplit(member_url).hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
    return f"tcp://{host}:{port}", str(topic)


def apply_message(cache: MemberCache, frames: list[bytes]) -> str:
    """Apply one published message; returns ``ok``, ``gap``, ``restart`` or ``bad``."""
    import msgpack

    if len(frames) != 3 or len(frames[1]) != 8:
        return "bad"
    seq = int.from_bytes(frames[1], "big")
    try:
        batch = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException):
        return "bad"
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        return "bad"
    outcome = "ok"
    if cache.last_seq is not None and seq <= cache.last_seq:
        cache.clear()  # the engine restarted: what it had is gone
        outcome = "restart"
    elif cache.last_seq is not None and seq > cache.last_seq + 1:
        outcome = "gap"
    cache.last_seq = seq
    cache.events_live = True
    for event in batch[1]:
        if not isinstance(event, Mapping):
            return "bad"
        kind = event.get("type")
        if kind == "BlockStored":
            hashes, ids, size = (
                event.get("block_hashes"),
                event.get("token_ids"),
                event.get("block_size"),
            )
            if not (
                isinstance(hashes, list)
                and isinstance(ids, list)
                and isinstance(size, int)
                and size > 0
                and len(ids) >= size * len(hashes)
            ):
                return "bad"
            parent = event.get("parent_block_hash")
            cache.stored([_hashable(h) for h in hashes], _hashable(parent), ids, size)
        elif kind == "BlockRemoved":
            hashes = event.get("block_hashes")
            if not isinstance(hashes, list):
                return "bad"
            cache.removed(_hashable(h) for h in hashes)
        elif kind == "AllBlocksCleared":
            cache.clear()
            cache.last_seq = seq
            cache.events_live = True
    return outcome


def _hashable(value: Any) -> Any:
    # vLLM sends 64-bit ints by default, 32-byte strings when told to; a list would not hash.
    return tuple(value) if isinstance(value, list) else value


async def subscribe(endpoint: str, topic: str, cache: MemberCache, name: str) -> None:
    """Read ``endpoint``'s events into ``cache`` until cancelled or disconnected.

    A disconnection (the member restarted, or broke a bound, after which ZMQ does not reconnect)
    ends the reading and empties the index, since events were missed; the pool's next refresh
    subscribes again.

    The sockets are plain ZMQ sockets watched through their file descriptors: on each wake-up
    every waiting message is read without a future per message (``zmq.asyncio`` cost about a
    sixth of the gateway's CPU at a few hundred requests a second), yielding to the loop every
    ``_BATCH`` messages. ZMQ's descriptor signals edges, so the queues are drained to empty before
    each wait, and each wait is bounded (``_RECHECK_S``) all the same."""
    import zmq
    from zmq.utils.monitor import parse_monitor_message

    loop = asyncio.get_running_loop()
    ctx: Any = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    monitor = None
    watched: list[int] = []
    wake = asyncio.Event()
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, QUEUED_MESSAGES)
        sock.setsockopt(zmq.RECONNECT_IVL, 500)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        for s in (sock, monitor):
            fd = s.getsockopt(zmq.FD)
            loop.add_reader(fd, wake.set)
            watched.append(fd)
        sock.connect(endpoint)
        log.info("backend %s: reading its KV-cache events from %s", name, endpoint)
        while True:
            wake.clear()
            while monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
                if event["event"] == zmq.EVENT_CONNECTED:
                    cache.events_live = True  # from now on its changes arrive here
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    log.info("backend %s: its KV-cache events disconnected", name)
                    cache.note("disconnects")
                    cache.clear()
                    return
            read = 0
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                outcome = apply_message(cache, sock.recv_multipart(zmq.NOBLOCK))
                if outcome != "ok":
                    cache.note(outcome)
                    if outcome == "restart":
                        log.info(
                            "backend %s: its engine restarted (event sequence went back)", name
                        )
                read += 1
                if read % _BATCH == 0:
                    await asyncio.sleep(0)  # a flood of events never holds the loop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RECHECK_S):
                    await wake.wait()
    finally:
        cache.events_live = False
        for fd in watched:
            loop.remove_reader(fd)
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(0)
        sock.close(0)
