"""The pooling routes (``runner="pooling"``): embeddings, ``/v2/embed``, ``/pooling``,
``/classify``, ``/score``, ``/rerank``.

Each is an engine request whose body is computed on arrival and sent at ``ttft`` (the faults
apply as to a non-streamed chat). Prompt sizes come from the toy tokenizer; a text over
``max_model_len`` is a 400. vLLM's pooling server names no aliases in its 404 for a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vllm_gateway_tools.simulator import render, render_pooling
from vllm_gateway_tools.simulator.engine import Job
from vllm_gateway_tools.simulator.exchange import (
    Conn,
    Req,
    begin,
    context_error,
    reject,
    request_id,
    resolve_model,
)
from vllm_gateway_tools.simulator.tokenizer import count_text

__all__ = ["classify", "embeddings", "pooling", "rerank", "score", "v2_embed"]

Build = Callable[[str, str, int, list[str], int], bytes]  # id, model, created, texts, tokens


def _texts(value: Any, loc: str) -> list[str] | dict[str, Any]:
    """A str or a list of str (or of token ids) as texts, or the validation error."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    if value is None:
        return {"type": "missing", "loc": loc, "msg": "Field required", "input": None}
    return {"type": "string_type", "loc": loc, "msg": "Input should be a valid string",
            "input": value}  # fmt: skip


def _run(conn: Conn, req: Req, field: str, prefix: str, build: Build,
         texts_of: Callable[[dict[str, Any]], list[str] | dict[str, Any]] | None = None,
         check: Callable[[dict[str, Any], str], bytes | None] | None = None) -> None:  # fmt: skip
    """The steps every pooling route shares: validate, check the model and the lengths, then
    run a job that answers ``build(...)`` at ``ttft``."""
    started = begin(conn, req)
    if started is None:
        return
    record, body, cfg = started
    texts = texts_of(body) if texts_of is not None else _texts(body.get(field), f"body.{field}")
    if isinstance(texts, dict):
        if texts["type"] == "missing":
            texts["input"] = body
        reject(conn, req, record, 400, render.validation_body([texts]))
        return
    model = resolve_model(conn.state, body, record)
    if model is None:
        message = f"The model `{record['model']}` does not exist."
        reject(conn, req, record, 404, render.error_body(message, 404, err_type="NotFoundError"))
        return
    problem = check(body, model) if check is not None else None
    if problem is not None:
        reject(conn, req, record, 400, problem)
        return
    sizes = [count_text(t) for t in texts]
    if max(sizes) >= cfg.max_model_len + 1:
        message = context_error(cfg.max_model_len, max(sizes))
        reject(conn, req, record, 400, render.error_body(message, 400, param="input_tokens"))
        return
    rid = request_id(req, prefix)
    created = int(time.time())
    body_bytes = build(rid, model, created, texts, sum(sizes))
    script = render.BodyScript(request_id=rid, model=model, n=0, finish="stop",
                               prompt_tokens=sum(sizes), created=created, body=body_bytes)  # fmt: skip
    conn.run(Job(state=conn.state, cfg=cfg, record=record, script=script, route=req.route,
                 sink=conn, loop=conn.loop))  # fmt: skip


def embeddings(conn: Conn, req: Req) -> None:
    """``/v1/embeddings``: ``encoding_format`` float or base64; no ``dimensions``."""
    fmt: dict[str, str] = {}

    def check(body: dict[str, Any], model: str) -> bytes | None:
        fmt["encoding"] = "base64" if body.get("encoding_format") == "base64" else "float"
        dims = body.get("dimensions")
        if dims is None:
            return None
        message = (f"Model '{model}' does not support Matryoshka embeddings; dimensions must be "
                   f"unset (received dimensions={dims}).")  # fmt: skip
        return render.error_body(message, 400, err_type="BadRequestError")

    def build(rid: str, model: str, created: int, texts: list[str], tokens: int) -> bytes:
        vectors = [render_pooling.embed(t) for t in texts]
        return render_pooling.embeddings_body(request_id=rid, model=model, created=created,
                                              vectors=vectors, encoding_format=fmt["encoding"],
                                              prompt_tokens=tokens)  # fmt: skip

    _run(conn, req, "input", "embd-", build, check=check)


def v2_embed(conn: Conn, req: Req) -> None:
    """``/v2/embed`` (Cohere style): ``texts`` and ``embedding_types``."""
    types: list[str] = []

    def check(body: dict[str, Any], model: str) -> bytes | None:
        asked = body.get("embedding_types") or ["float"]
        allowed = ("float", "binary", "ubinary", "base64")
        if not isinstance(asked, list) or any(t not in allowed for t in asked):
            error = {"type": "literal_error", "loc": "body.embedding_types",
                     "msg": "Input should be 'float', 'binary', 'ubinary' or 'base64'",
                     "input": asked}  # fmt: skip
            return render.validation_body([error])
        types.extend(asked)
        return None

    def build(rid: str, model: str, created: int, texts: list[str], tokens: int) -> bytes:
        vectors = [render_pooling.embed(t) for t in texts]
        return render_pooling.v2_embed_body(request_id=rid, texts=texts, vectors=vectors,
                                            types=types, prompt_tokens=tokens)  # fmt: skip

    def texts_of(body: dict[str, Any]) -> list[str] | dict[str, Any]:
        texts = body.get("texts")
        if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
            return list(texts)
        return {"type": "value_error", "loc": "body",
                "msg": "Value error, Exactly one of texts, images, or inputs must be provided, "
                "and it must be non-empty", "input": body}  # fmt: skip

    _run(conn, req, "texts", "embd-", build, texts_of=texts_of, check=check)


def pooling(conn: Conn, req: Req) -> None:
    def build(rid: str, model: str, created: int, texts: list[str], tokens: int) -> bytes:
        vectors = [render_pooling.embed(t) for t in texts]
        return render_pooling.pooling_body(request_id=rid, model=model, created=created,
                                           vectors=vectors, prompt_tokens=tokens)  # fmt: skip

    _run(conn, req, "input", "pooling-", build)


def classify(conn: Conn, req: Req) -> None:
    def build(rid: str, model: str, created: int, texts: list[str], tokens: int) -> bytes:
        probs = [render_pooling.probability(t) for t in texts]
        return render_pooling.classify_body(request_id=rid, model=model, created=created,
                                            probs=probs, prompt_tokens=tokens)  # fmt: skip

    _run(conn, req, "input", "classify-", build)


def _pairs(body: dict[str, Any]) -> tuple[list[str], list[str]] | dict[str, Any]:
    """The (query, document) pairs of a score request, under any of vLLM's field names."""
    for first, second in (("queries", "documents"), ("queries", "items"), ("text_1", "text_2"),
                          ("data_1", "data_2")):  # fmt: skip
        if first in body and second in body:
            left = _texts(body[first], f"body.{first}")
            right = _texts(body[second], f"body.{second}")
            if isinstance(left, dict):
                return left
            if isinstance(right, dict):
                return right
            if len(left) == 1:
                left = left * len(right)
            if len(left) != len(right):
                return {"type": "value_error", "loc": "body",
                        "msg": f"Value error, {first} and {second} must have the same length "
                        "when both are lists", "input": body}  # fmt: skip
            return left, right
    return render.missing("body.queries", body)


def _score(query: str, document: str) -> float:
    a, b = render_pooling.embed(query), render_pooling.embed(document)
    return render_pooling.f32(sum(x * y for x, y in zip(a, b, strict=True)))


def score(conn: Conn, req: Req) -> None:
    """``/score`` and ``/v1/score``: the cosine of each (query, document) pair."""
    found: list[tuple[list[str], list[str]]] = []

    def texts_of(body: dict[str, Any]) -> list[str] | dict[str, Any]:
        pairs = _pairs(body)
        if isinstance(pairs, dict):
            return pairs
        found.append(pairs)
        return pairs[0] + pairs[1]

    def build(rid: str, model: str, created: int, texts: list[str], tokens: int) -> bytes:
        left, right = found[0]
        scores = [_score(q, d) for q, d in zip(left, right, strict=True)]
        return render_pooling.score_body(request_id=rid, model=model, created=created,
                                         scores=scores, prompt_tokens=tokens)  # fmt: skip

    _run(conn, req, "queries", "score-", build, texts_of=texts_of)


def rerank(conn: Conn, req: Req) -> None:
    """``/rerank``, ``/v1/rerank``, ``/v2/rerank``: documents by score, the first ``top_n``."""
    found: list[tuple[str, list[str], int]] = []

    def texts_of(body: dict[str, Any]) -> list[str] | dict[str, Any]:
        query = body.get("query")
        if not isinstance(query, str):
            return render.missing("body.query", body) if query is None else {
                "type": "string_type", "loc": "body.query", "msg": "Input should be a valid string",
                "input": query}  # fmt: skip
        raw = body.get("documents")
        if isinstance(raw, list):
            raw = [d["text"] if isinstance(d, dict) and isinstance(d.get("text"), str) else d
                   for d in raw]  # fmt: skip
        documents = _texts(raw, "body.documents")
        if isinstance(documents, dict):
            return documents
        top_n = body.get("top_n", 0)
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
            return {"type": "greater_than_equal", "loc": "body.top_n",
                    "msg": "Input should be greater than or equal to 0", "input": top_n,
                    "ctx": {"ge": 0}}  # fmt: skip
        found.append((query, documents, top_n))
        return [query, *documents]

    def build(rid: str, model: str, created: int, texts: list[str], tokens: int) -> bytes:
        query, documents, top_n = found[0]
        scores = [_score(query, d) for d in documents]
        return render_pooling.rerank_body(request_id=rid, model=model, documents=documents,
                                          scores=scores, top_n=top_n, prompt_tokens=tokens)  # fmt: skip

    _run(conn, req, "query", "score-", build, texts_of=texts_of)
