"""The OpenAPI document's entries for the two inference routes.

The front door serves those routes without FastAPI, so FastAPI cannot describe them; this module
adds them to the generated document, with the fields the gateway itself validates.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

__all__ = ["CHAT_SCHEMA", "COMPLETION_SCHEMA", "install_openapi"]

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

_ERROR = {
    "description": "An OpenAI-shaped error",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "object"}}}
        }
    },
}


def _operation(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
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


def install_openapi(api: FastAPI) -> None:
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            doc = generate()
            doc["paths"]["/v1/chat/completions"] = {
                "post": _operation("Chat completion", CHAT_SCHEMA)
            }
            doc["paths"]["/v1/completions"] = {"post": _operation("Completion", COMPLETION_SCHEMA)}
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
