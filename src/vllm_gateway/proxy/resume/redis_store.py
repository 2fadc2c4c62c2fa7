"""Keyed generations in Redis, shared by gateway replicas (``VLLM_REDIS_URL``).

Per key (its scope and name hashed: no key reaches Redis as sent), three Redis keys:

- ``…:meta``, a hash: the body's fingerprint, ``state`` (``run``, ``done``, ``lost``), the
  answer's head (status and headers) and, for a whole answer, its body;
- ``…:log``, a stream: one entry per event, its id ``0-N`` (N its number in the stream), the last
  with an ``end`` field; ``XREAD`` from ``0-N`` is "the events after N";
- ``…:alive``, the running replica's heartbeat (``_ALIVE_MS``, refreshed every ``_BEAT``), and
  ``…:seen``, touched by every read: a generation nobody read for the grace period is stopped.

The replica that claims a key (``HSETNX``) runs the generation and is the only writer; its writes
are queued and sent in order by one task per generation, so the generation never waits for Redis.
Any replica reads. A read waits at most its timeout (``XREAD BLOCK``), and a read that finds no
new event while the heartbeat has expired finds the log ``lost``: a reader of a killed replica's
generation gets an error, not a hang. Every Redis call is bounded by the client's socket timeout.
The keys of a running generation expire after the longest it may run plus the grace period; a
finished one's, the grace period after its end. A stream keeps at most ``_MAX_EVENTS`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import orjson

from vllm_gateway.errors import Unavailable
from vllm_gateway.proxy.resume.store import STAT_EVENTS, Batch, Claim, Head, Tasks, transient

__all__ = ["RedisStore"]

log = logging.getLogger("vllm_gateway.proxy.resume")

_ALIVE_MS = 3000  # a heartbeat older than this: the running replica is gone
_BEAT = 1.0
_MAX_EVENTS = 100_000
_TIMEOUT = 2.0  # every Redis call but a blocking read
_GONE = "the gateway replica running the generation is gone"


# The claim, atomic: the first to set the fingerprint runs generation ARGV[2] (its heartbeat and
# the "seen" mark set with it, so that no other claim takes it for a dead one).
_CLAIM = """
if redis.call('HSETNX', KEYS[1], 'fp', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'state', 'run', 'gen', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[5])
  return 1
end
return 0
"""


def _head_json(head: Head) -> bytes:
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in head.headers]
    return orjson.dumps({"status": head.status, "headers": headers})


def _head_from(raw: bytes, body: bytes | None) -> Head:
    data = orjson.loads(raw)
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in data["headers"]]
    return Head(int(data["status"]), headers, body)


class _Keys:
    """A key's Redis keys; the log's and the heartbeat's name the generation (a generation run
    again after its replica died writes elsewhere than the one its old readers read)."""

    __slots__ = ("alive", "base", "log", "meta", "seen")

    def __init__(self, scope: str, key: str) -> None:
        digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()[:40]
        self.base = f"vllm_gateway:idem:{digest}"
        self.meta = self.base + ":meta"
        self.seen = self.base + ":seen"
        self.log = self.alive = ""

    def of(self, generation: bytes | str) -> _Keys:
        gen = generation.decode() if isinstance(generation, bytes) else generation
        self.log = f"{self.base}:{gen}:log"
        self.alive = f"{self.base}:{gen}:alive"
        return self


class _RedisWriter:
    """The generation's writes, queued and sent in order by one task; its heartbeat."""

    def __init__(self, store: RedisStore, keys: _Keys, task_name: str) -> None:
        self._store = store
        self._keys = keys
        self.on_abandon: Callable[[], None] | None = None
        self._queue: list[tuple[str, Any]] = []
        self._wake = asyncio.Event()
        self._seq = 0
        self._pending = 0  # bytes queued, counted in the store's ``used`` until sent
        self._finished = False
        self._abandoned = False
        self._closed = False
        store.spawn(self._run(), task_name)

    def _take(self, n: int) -> bool:
        """Count ``n`` queued bytes; past the budget (Redis is behind), cut the generation."""
        if not self._store.take(n):
            self._store.counts["cut"] += 1
            self._abandon()
            return False
        self._pending += n
        return True

    def head(self, head: Head) -> None:
        if self._finished or not self._take(len(head.body or b"") + 256):
            return
        if head.body is not None:
            self._finished = True
        self._queue.append(("head", head))
        self._wake.set()

    def append(self, events: list[bytes], ended: bool) -> None:
        if self._finished or not self._take(sum(len(e) for e in events)):
            return
        numbered = []
        for event in events:
            self._seq += 1
            numbered.append((self._seq, event))
        if ended:
            self._finished = True
            if not numbered:  # the end needs an entry to carry it
                self._seq += 1
                numbered.append((self._seq, b""))
        self._queue.append(("events", (numbered, ended)))
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def _run(self) -> None:
        redis = self._store.redis
        keys = self._keys
        grace_ms = int(self._store.grace * 1000)
        loop = asyncio.get_running_loop()
        next_beat = 0.0
        try:
            while True:
                if loop.time() >= next_beat:
                    await self._beat(redis, keys)
                    next_beat = loop.time() + _BEAT
                queue, self._queue = self._queue, []
                if queue:
                    sent, self._pending = self._pending, 0
                    try:
                        await self._send(redis, keys, queue, grace_ms)
                    finally:
                        self._store.give(sent)
                if self._closed and not self._queue:
                    break
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_beat - loop.time())):
                        await self._wake.wait()
            if self._abandoned or not self._finished:
                await redis.hset(keys.meta, "state", "lost")
                self._store.counts["lost"] += 1
        except Exception:
            log.exception("writing a kept generation to Redis failed")
            self._abandon()
        finally:
            self._store.give(self._pending)
            self._pending = 0
            with contextlib.suppress(Exception):
                await redis.delete(keys.alive)

    async def _beat(self, redis: Any, keys: _Keys) -> None:
        pipe = redis.pipeline(transaction=False)
        pipe.set(keys.alive, b"1", px=_ALIVE_MS)
        pipe.exists(keys.seen)
        _, seen = await pipe.execute()
        if not seen and not self._finished:
            self._store.counts["abandoned"] += 1
            self._abandon()

    def _abandon(self) -> None:
        self._finished = self._abandoned = True
        callback, self.on_abandon = self.on_abandon, None
        if callback is not None and not self._closed:
            callback()

    async def _send(
        self, redis: Any, keys: _Keys, queue: list[tuple[str, Any]], grace_ms: int
    ) -> None:
        pipe = redis.pipeline(transaction=False)
        done = False
        for kind, item in queue:
            if kind == "head":
                head: Head = item
                mapping = {"head": _head_json(head)}
                if head.body is not None:
                    mapping["body"] = head.body
                    mapping["state"] = b"lost" if transient(head.status) else b"done"
                    done = True
                pipe.hset(keys.meta, mapping=mapping)
            else:
                numbered, ended = item
                for i, (seq, event) in enumerate(numbered):
                    fields = {"e": event}
                    if ended and i == len(numbered) - 1:
                        fields["end"] = b"1"
                    pipe.xadd(keys.log, fields, id=f"0-{seq}", maxlen=_MAX_EVENTS)
                if ended:
                    pipe.hset(keys.meta, "state", "done")
                    done = True
        # A finished log lives for the grace period; a running one as long as its meta.
        life_ms = grace_ms if done else int((self._store.longest + self._store.grace) * 1000)
        for key in (keys.meta, keys.log) if done else (keys.log,):
            pipe.pexpire(key, life_ms)
        await pipe.execute()


class _RedisReader:
    def __init__(self, store: RedisStore, keys: _Keys) -> None:
        self._store = store
        self._keys = keys
        self._head: Head | None = None

    async def read(self, after: int, timeout: float) -> Batch:
        store = self._store
        keys = self._keys
        grace_ms = int(store.grace * 1000)
        try:
            pipe = store.redis.pipeline(transaction=False)
            pipe.hmget(keys.meta, "state", "head", "body")
            pipe.set(keys.seen, b"1", px=grace_ms)
            pipe.exists(keys.alive)
            (state, head, body), _, alive = await pipe.execute()
            if head is not None and (self._head is None or body is not None):
                self._head = _head_from(head, body)
            if body is not None:
                return Batch(self._head)
            found = await store.reader_redis.xread(
                {keys.log: f"0-{after}"}, count=1000, block=max(1, int(timeout * 1000))
            )
        except Exception as exc:
            log.warning("reading a kept generation from Redis failed: %r", exc)
            return Batch(self._head, lost="the store of kept answers is unreachable")
        events: list[tuple[int, bytes]] = []
        ended = False
        for _, entries in found or []:
            for entry_id, fields in entries:
                seq = int(entry_id.split(b"-", 1)[1])
                if not events and seq != after + 1:
                    return Batch(self._head, lost="the events after that id are no longer kept")
                if fields.get(b"e"):
                    events.append((seq, fields[b"e"]))
                if b"end" in fields:
                    ended = True
        if self._head is None and events:
            # The head is written before the first event: read it again.
            head = await store.redis.hget(keys.meta, "head")
            if head is not None:
                self._head = _head_from(head, None)
        lost = None
        if not events and not ended:
            if state == b"lost" or state is None:
                lost = "the generation ended without an answer" if state else _GONE
            elif state == b"run" and not alive:
                lost = _GONE
            if lost is not None:
                store.counts["lost"] += 1
        return Batch(self._head, events, ended, lost)

    def close(self) -> None:
        return None


class RedisStore(Tasks):
    """Keyed generations in Redis: the registry and the logs every replica reads."""

    def __init__(self, url: str, limit: int, grace: float, longest: float) -> None:
        super().__init__()
        self.url = url
        self.limit = limit
        self.grace = grace
        self.longest = longest  # the longest a generation may run (its keys' first lifetime)
        self.counts = dict.fromkeys(STAT_EVENTS, 0)
        self._used = 0
        self.redis: Any = None
        self._claim: Any = None
        self.reader_redis: Any = None  # blocking reads: a socket timeout past their block

    @property
    def used(self) -> int:
        """Bytes queued for Redis and not yet sent: the kept bytes themselves live in Redis,
        bounded there by length and age."""
        return self._used

    def take(self, n: int) -> bool:
        if self._used + n > self.limit:
            return False
        self._used += n
        return True

    def give(self, n: int) -> None:
        self._used -= n

    @property
    def entries(self) -> int:
        return 0

    async def start(self) -> None:
        import redis.asyncio as aioredis  # imported only when a Redis is configured

        self.redis = aioredis.Redis.from_url(
            self.url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT
        )
        self._claim = self.redis.register_script(_CLAIM)
        self.reader_redis = aioredis.Redis.from_url(
            self.url, socket_timeout=_TIMEOUT + 2.0, socket_connect_timeout=_TIMEOUT
        )

    async def aclose(self) -> None:
        await self.cancel_all()
        for client in (self.redis, self.reader_redis):
            if client is not None:
                await client.aclose()

    async def claim(self, scope: str, key: str, fingerprint: str, create: bool = True) -> Claim:
        keys = _Keys(scope, key)
        life_ms = int((self.longest + self.grace) * 1000)
        try:
            for _ in range(2):
                gen = secrets.token_hex(6)
                keys.of(gen)
                grace_ms = int(self.grace * 1000)
                made = create and await self._claim(
                    keys=[keys.meta, keys.seen, keys.alive],
                    args=[fingerprint, gen, life_ms, grace_ms, _ALIVE_MS],
                )
                if made:
                    self.counts["started"] += 1
                    writer = _RedisWriter(self, keys, f"redis-log-{gen}")
                    return Claim(_RedisReader(self, keys), writer)
                held, state, held_gen = await self.redis.hmget(keys.meta, "fp", "state", "gen")
                if held is None or held_gen is None:
                    return Claim(missing=True)
                if held != fingerprint.encode():
                    self.counts["conflicts"] += 1
                    return Claim()
                keys.of(held_gen)
                alive = await self.redis.exists(keys.alive)
                if create and (state == b"lost" or (state == b"run" and not alive)):
                    # Its replica is gone, or it was stopped: run it again.
                    await self.redis.delete(keys.meta, keys.log)
                    continue
                replayed = state == b"done"
                self.counts["replayed" if replayed else "attached"] += 1
                return Claim(_RedisReader(self, keys), replayed=replayed)
        except Exception as exc:
            log.warning("claiming an Idempotency-Key in Redis failed: %r", exc)
            raise Unavailable(
                "The store of kept answers is unreachable; retry later.", retry_after=1.0
            ) from None
        raise Unavailable("The Idempotency-Key is being claimed; retry.", retry_after=1.0)
