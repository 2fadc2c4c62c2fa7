"""The OpenAPI document's entries for the relayed routes.

The front door serves them without FastAPI, so FastAPI cannot describe them; ``relayed_paths``
gives their entries, with the fields the gateway itself validates (the backend judges the rest),
and the app of the routes off the hot path (``api.py``) adds them to the document FastAPI generates
for its own routes. Admin routes are left out: they are for operators holding the admin key.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CHAT_SCHEMA", "COMPLETION_SCHEMA", "relayed_paths"]

# Each may also be null, which the gateway (like vLLM) reads as "not given".
_COMMON: dict[str, Any] = {
    "model": {"type": ["string", "null"], "minLength": 1},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"]},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 16},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
}

CHAT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        **_COMMON,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
            },
        },
    },
}

COMPLETION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {**_COMMON, "prompt": {"type": "string", "minLength": 1}},
}

RESPONSES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "model": {"type": ["string", "null"], "minLength": 1},
        "input": {"type": ["string", "array"]},
        "stream": {"type": ["boolean", "null"]},
        "background": {"type": ["boolean", "null"]},
        "store": {"type": ["boolean", "null"]},
        "max_output_tokens": {"type": ["integer", "null"], "minimum": 1},
        "previous_response_id": {"type": ["string", "null"], "minLength": 1},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    },
}

_MESSAGES_LIST = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "object", "required": ["role"], "properties": {"role": {"type": "string"}}},
}

MESSAGES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages", "max_tokens"],
    "properties": {
        "model": {"type": ["string", "null"], "minLength": 1},
        "messages": _MESSAGES_LIST,
        "max_tokens": {"type": "integer", "minimum": 1},
        "stream": {"type": ["boolean", "null"]},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    },
}

COUNT_TOKENS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "model": {"type": ["string", "null"], "minLength": 1},
        "messages": _MESSAGES_LIST,
    },
}

_OBJECT: dict[str, Any] = {
    "type": "object",
    "properties": {"model": {"type": ["string", "null"], "minLength": 1}},
}

# The gateway forwards an upload's form as it came (the backend judges its fields): the document
# says only what the gateway checks, that it is a multipart form.
_UPLOAD: dict[str, Any] = {
    "type": "object",
    "properties": {"file": {"type": "string", "format": "binary"}},
}

_ERROR = {
    "description": "An OpenAI-shaped error",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "object"}}}
        }
    },
}


def _operation(
    summary: str, schema: dict[str, Any], media: str = "application/json"
) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {media: {"schema": schema}}},
        "responses": {
            "200": {
                "description": "JSON, or an SSE stream when stream is true",
                "content": {"application/json": {}, "text/event-stream": {}},
            },
            **{
                code: _ERROR
                for code in ("400", "401", "404", "413", "415", "429", "502", "503", "504")
            },
        },
    }


_OTHER_JSON = [
    ("/v1/chat/completions/batch", "Several conversations in one request"),
    ("/generative_scoring", "Label probabilities for query and item pairs"),
    ("/v1/embeddings", "Embeddings"),
    ("/v2/embed", "Embeddings (Cohere's shape)"),
    ("/pooling", "Pooled hidden states"),
    ("/classify", "Classification"),
    ("/v1/score", "Scores of query and document pairs"),
    ("/v1/rerank", "Documents reranked against a query"),
    ("/tokenize", "Token ids of a prompt or conversation"),
    ("/detokenize", "The text of token ids"),
]
_UPLOADS = [
    ("/v1/audio/transcriptions", "Speech to text"),
    ("/v1/audio/translations", "Speech to English text"),
]


def relayed_paths() -> dict[str, Any]:
    """The document's ``paths`` entries of the relayed routes, in the document's order."""
    paths: dict[str, Any] = {
        "/v1/chat/completions": {"post": _operation("Chat completion", CHAT_SCHEMA)},
        "/v1/completions": {"post": _operation("Completion", COMPLETION_SCHEMA)},
        "/v1/responses": {"post": _operation("Responses", RESPONSES_SCHEMA)},
        "/v1/messages": {"post": _operation("Anthropic Messages", MESSAGES_SCHEMA)},
        "/v1/messages/count_tokens": {
            "post": _operation("Anthropic token count", COUNT_TOKENS_SCHEMA)
        },
    }
    for path, summary in _OTHER_JSON:
        paths[path] = {"post": _operation(summary, _OBJECT)}
    for path, summary in _UPLOADS:
        paths[path] = {"post": _operation(summary, _UPLOAD, "multipart/form-data")}
    return paths
