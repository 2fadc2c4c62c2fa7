"""The bytes of vLLM 0.32's pooling routes, and the toy model behind them. No I/O.

Routes and shapes (captures: /work/notes/samples/pool_*.txt, cls_*.txt): ``/v1/embeddings``,
``/v2/embed`` (Cohere style), ``/pooling``, ``/classify``, ``/score`` and ``/v1/score``, ``/rerank``
with ``/v1/rerank`` and ``/v2/rerank``.

The toy model: a text's embedding is ``DIM`` float32 numbers taken from the SHA-256 of its UTF-8
bytes, L2-normalised, so the same text always gets the same vector and ``score`` (the dot product,
a cosine) of a text with itself is 1.0. ``/classify`` reports one class, ``LABEL_0``, with a
probability taken from the same hash. As vLLM does, ``/v1/embeddings`` prints float32 numbers in
their shortest form, while ``/pooling`` and ``/v2/embed`` print them as doubles.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from collections.abc import Sequence
from typing import Any

import orjson

__all__ = [
    "DIM",
    "classify_body",
    "embed",
    "embeddings_body",
    "f32",
    "pooling_body",
    "probability",
    "rerank_body",
    "score_body",
    "usage",
    "v2_embed_body",
]

DIM = 8


def f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def embed(text: str) -> list[float]:
    """The text's unit vector (float32 values)."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = struct.unpack(f"<{DIM}i", digest[: 4 * DIM])
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [f32(v / norm) for v in raw]


def probability(text: str) -> float:
    """The toy classifier's probability for ``text`` (0..1)."""
    digest = hashlib.sha256(b"classify:" + text.encode()).digest()
    return f32(int.from_bytes(digest[:4], "little") / 0xFFFFFFFF)


def _short32(x: float) -> bytes:
    """The shortest decimal that reads back as the same float32, as numpy prints it."""
    packed = struct.pack("<f", x)
    for digits in range(1, 10):
        text = f"{x:.{digits}g}"
        if struct.pack("<f", float(text)) == packed:
            break
    if "e" in text or "." in text or "n" in text:
        return text.encode()
    return text.encode() + b".0"


def usage(prompt_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def embeddings_body(*, request_id: str, model: str, created: int, vectors: Sequence[list[float]],
                    encoding_format: str, prompt_tokens: int) -> bytes:  # fmt: skip
    """``/v1/embeddings``: ``float`` lists, or ``base64`` of little-endian float32."""
    data = []
    for index, vec in enumerate(vectors):
        if encoding_format == "base64":
            value: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        else:
            value = orjson.Fragment(b"[" + b",".join(_short32(x) for x in vec) + b"]")
        data.append({"index": index, "object": "embedding", "embedding": value})
    return orjson.dumps({"id": request_id, "object": "list", "created": created, "model": model,
                         "data": data, "usage": usage(prompt_tokens)})  # fmt: skip


def v2_embed_body(*, request_id: str, texts: list[str], vectors: Sequence[list[float]],
                  types: Sequence[str], prompt_tokens: int) -> bytes:  # fmt: skip
    """``/v2/embed``: an ``embeddings`` object with one list per asked type."""
    by_type: dict[str, Any] = {}
    for kind in types:
        if kind == "float":
            by_type["float"] = list(vectors)
        elif kind in ("binary", "ubinary"):
            packed = []
            for vec in vectors:
                row = []
                for start in range(0, len(vec), 8):
                    byte = 0
                    for x in vec[start : start + 8]:
                        byte = (byte << 1) | (x >= 0)
                    row.append(byte - 128 if kind == "binary" else byte)
                packed.append(row)
            by_type[kind] = packed
        elif kind == "base64":
            by_type["base64"] = [
                base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors
            ]
    return orjson.dumps(
        {
            "id": request_id,
            "embeddings": by_type,
            "texts": texts,
            "meta": {
                "api_version": {"version": "2"},
                "billed_units": {"input_tokens": prompt_tokens, "image_tokens": 0},
            },
            "response_type": "embeddings_by_type",
        }
    )


def pooling_body(*, request_id: str, model: str, created: int, vectors: Sequence[list[float]],
                 prompt_tokens: int) -> bytes:  # fmt: skip
    data = [{"index": i, "object": "pooling", "data": v} for i, v in enumerate(vectors)]
    return orjson.dumps({"id": request_id, "object": "list", "created": created, "model": model,
                         "data": data, "usage": usage(prompt_tokens)})  # fmt: skip


def classify_body(*, request_id: str, model: str, created: int, probs: Sequence[float],
                  prompt_tokens: int) -> bytes:  # fmt: skip
    data = [{"index": i, "label": "LABEL_0", "probs": [p], "num_classes": 1}
            for i, p in enumerate(probs)]  # fmt: skip
    return orjson.dumps({"id": request_id, "object": "list", "created": created, "model": model,
                         "data": data, "usage": usage(prompt_tokens)})  # fmt: skip


def score_body(*, request_id: str, model: str, created: int, scores: Sequence[float],
               prompt_tokens: int) -> bytes:  # fmt: skip
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return orjson.dumps({"id": request_id, "object": "list", "created": created, "model": model,
                         "data": data, "usage": usage(prompt_tokens)})  # fmt: skip


def rerank_body(*, request_id: str, model: str, documents: Sequence[str], scores: Sequence[float],
                top_n: int, prompt_tokens: int) -> bytes:  # fmt: skip
    """``/rerank``: results sorted by score, the first ``top_n`` (all when 0)."""
    ranked = sorted(enumerate(scores), key=lambda pair: pair[1], reverse=True)
    if 0 < top_n < len(ranked):
        ranked = ranked[:top_n]
    results = [
        {"index": i, "document": {"text": documents[i], "multi_modal": None}, "relevance_score": s}
        for i, s in ranked
    ]
    return orjson.dumps({"id": request_id, "model": model,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                         "results": results})  # fmt: skip
