"""The gateway's HTTP/1.1 server: one ``asyncio.Protocol`` per client connection, parsed by
httptools, with a bound on everything a client controls.

Why its own server: the promise ("every request ends within bounds the settings give; nothing is
held") must hold against clients that are slow or hostile, and uvicorn's httptools server gives no
bound on reading a request's headers or body, none on the size of its headers, and none on a send
to a client that stops reading: the permit of a stream waited in that send for as long as the
client liked. Owning the connection also takes the ASGI message per chunk off the hot path.

Bounds (each a field of ``Limits``, each a setting; docs/reliability.md lists them with their tests):

- ``header_timeout``: from a connection's open, or a request's first byte, to the end of its
  headers; then 408 and the connection closes (slowloris, and connections that never send a byte);
- ``body_timeout``: from the end of the headers to the end of the body; then 408 and close;
- ``idle_timeout``: a keep-alive connection between requests; then it is closed;
- ``send_timeout``: how long the connection's write buffer may stay above its high-water mark (the
  client does not take what it is sent); then the connection is aborted, which ends the request
  (its permit is released and its upstream request aborted). A connection that is closing with
  bytes still buffered gets the same bound. Nothing ever awaits a send without it;
- ``max_header_bytes`` and ``max_header_count``: a request's line and headers, and apart its
  trailer fields (counted, never kept); beyond them 431 and close. Counted per request, never per
  read: what the parser holds of an unfinished line is bounded from the reads (``http1``);
- ``max_connections``: open client connections; one more gets a canned 503 and is closed at once;
- request bodies: a cap per route (413, as soon as the length says so or the bytes pass it) and a
  budget for all bodies held by the process together (``BufferBudget``; 503 beyond it);
- pipelining: at most ``max_pipelined`` requests are read ahead of the one being answered, and
  reading pauses while any waits. Answers go strictly in request order: a request refused while
  read ahead (malformed bytes, its head refused, one too many, its body past a bound) keeps its
  turn, is answered after the requests before it, runs nowhere, and ends the connection; nothing
  after it is read. Every body read ahead is given back to the budget on every path.

Exchanges: a request and its response are one ``Exchange``. The handler's ``admit`` sees it when
its headers are complete and may refuse it at once (the server sends the answer and closes without
reading the body); ``handle`` runs as a task once the body is in. The handler answers with
``start``/``write``/``end`` (no await: bytes go to the transport's buffer) and awaits ``drain()``
only when ``paused``. When the client goes away before the response is complete, ``on_gone`` is
called once.

A client that half-closes after a complete request may still be reading. Once its response has
started, the gateway keeps writing (a client that has really gone shows at the next write). Before
that, on Linux, the gateway tells the two apart by sending an interim ``100 Continue`` (legal for an
HTTP/1.1 client at any time) and looking at the socket a couple of round trips later: a closed peer
has answered with a reset. Elsewhere, and for HTTP/1.0, a half-close before the response is a
client gone.
"""

from vllm_gateway.edge.http.contract import Handler, Limits
from vllm_gateway.edge.http.exchange import Exchange
from vllm_gateway.edge.http.server import HttpServer

__all__ = ["Exchange", "Handler", "HttpServer", "Limits"]
