"""The OpenAPI 3.1 document of what the shim serves (GET /openapi.json), built as plain data."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document", "SERVED_PATHS"]

_ERROR = {"$ref": "#/components/schemas/Error"}

_DARKBLOOM_OPTIONS = {
    "type": "object",
    "description": "Darkbloom routing options; unknown keys are a 400.",
    "properties": {
        "region": {"type": "string"},
        "node_class": {"type": "string"},
        "max_price": {"type": "number", "description": "micro-credits per 1M tokens, input and output"},
        "digest": {"type": "string", "description": "weights digest pin"},
        "prefer": {"enum": ["latency", "cost"]},
    },
    "additionalProperties": False,
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "items": {"type": "object"}},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "max_tokens": {"type": "integer"},
        "max_completion_tokens": {"type": "integer"},
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "n": {"type": "integer", "minimum": 1, "maximum": 16},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "seed": {"type": "integer"},
        "presence_penalty": {"type": "number"},
        "frequency_penalty": {"type": "number"},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer"},
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]},
        "parallel_tool_calls": {"type": "boolean"},
        "response_format": {"type": "object", "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}}},
        "user": {"type": "string"},
        "darkbloom": _DARKBLOOM_OPTIONS,
    },
}

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string"},
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                                   "maxItems": 16}]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object"},
        "max_tokens": {"type": "integer"},
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "n": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "seed": {"type": "integer"},
        "logprobs": {"type": "integer"},
        "darkbloom": _DARKBLOOM_OPTIONS,
    },
}

_EMBEDDING_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "encoding_format": {"enum": ["float", "base64"]},
        "user": {"type": "string"},
        "darkbloom": _DARKBLOOM_OPTIONS,
    },
}


def _op(summary: str, *, request: dict[str, Any] | None = None, stream: bool = False,
        errors: tuple[int, ...] = (400, 401, 404, 413, 429, 503)) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if stream:
        ok["text/event-stream"] = {"schema": {"type": "string", "description": "chunks, then data: [DONE]"}}
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {
                "description": "OK",
                "headers": {
                    "x-darkbloom-node": {"schema": {"type": "string"}, "description": "serving node's peer id"},
                    "x-darkbloom-route": {"schema": {"enum": ["direct", "relayed", "hole-punched"]}},
                },
                "content": ok,
            },
            **{str(code): {"description": "error", "content": {"application/json": {"schema": _ERROR}}} for code in errors},
        },
    }
    if request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": request}}}
    return op


def openapi_document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Darkbloom OpenAI-compatible API", "version": version},
        "paths": {
            "/v1/models": {"get": _op("List models served by the network now", errors=(401,))},
            "/v1/models/{model}": {
                "get": {**_op("One model", errors=(401, 404)),
                        "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]},
            },
            "/v1/chat/completions": {"post": _op("Chat completion", request=_CHAT_REQUEST, stream=True)},
            "/v1/completions": {"post": _op("Text completion", request=_COMPLETION_REQUEST, stream=True)},
            "/v1/embeddings": {"post": _op("Embeddings (float or base64)", request=_EMBEDDING_REQUEST)},
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "OK"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "OK", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OK"}}}},
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "null"]},
                            },
                        }
                    },
                }
            }
        },
    }


SERVED_PATHS = ("/v1/models", "/v1/models/{model}", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                "/health", "/metrics", "/openapi.json")
