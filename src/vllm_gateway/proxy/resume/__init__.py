"""Resumable streams and exactly-once retries: requests that carry an ``Idempotency-Key``.

A keyed request is registered under (scope, key), the scope being its tenant. The first such
request runs the generation as a ``ProxyCall`` of its own whose answer goes into an event log
(``recorder.py``) instead of a socket; every request with that key, the first included, is a
reader of that log (``serving.py``): it relays the events after its ``Last-Event-ID`` (each with
an ``id:`` line, its sequence number), then the rest live, to the protocol's end. A client that
leaves does not stop the generation; nobody reading for the grace period does.

- ``store.py``: the registry and the logs behind one protocol (``Store``), kept in this process
  (``LocalStore``, within a byte budget: finished entries are evicted oldest first, counted);
- ``redis_store.py``: the same in Redis Streams, shared by replicas (``VLLM_REDIS_URL``);
- ``recorder.py``: the generation's side, a ``Responder`` that writes to the log;
- ``serving.py``: a keyed request from its headers to its answer.

A request without the header never comes here: the front door hands it to ``ProxyCall`` as
before, and a client that leaves aborts its upstream request at once.
"""
