"""The published OpenAPI document (``GET /openapi.json``).

The routes read their bodies themselves (size caps, nesting limits, Cloudflare's ``oneOf``), so
FastAPI sees no body parameters; each route declares its body here with ``openapi_extra``, built
from the pydantic models in :mod:`lora_kit.server.schemas`, and :func:`build` adds those models
and the two error bodies to ``components``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from lora_kit.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FinetuneCreate,
    LoadLoraAdapter,
    MessagesRequest,
    PromptRequest,
    UnloadLoraAdapter,
)

REF = "#/components/schemas/{model}"
BODY_MODELS: tuple[type[BaseModel], ...] = (
    PromptRequest,
    MessagesRequest,
    ChatCompletionRequest,
    CompletionRequest,
    FinetuneCreate,
    LoadLoraAdapter,
    UnloadLoraAdapter,
)

CLOUDFLARE_ERROR = {
    "type": "object",
    "description": "Cloudflare's failure envelope: one {code, message} in errors.",
    "required": ["result", "success", "errors", "messages"],
    "properties": {
        "result": {"type": "null"},
        "success": {"const": False},
        "errors": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
            },
        },
        "messages": {"type": "array"},
    },
}
OPENAI_ERROR = {
    "type": "object",
    "description": "OpenAI's error body.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_STATUSES = {  # lora_kit.server.errors
    "400": "5006 invalid input (names the field), 5007 no such model, 3039 missing fine-tune files",
    "401": "10000 missing or wrong bearer token",
    "403": "3051 management routes are off (no API token and no --enable-management)",
    "404": "3037 no such fine-tune or adapter, 7003 no such route",
    "405": "7001 method not allowed",
    "413": "3006 body or file too large",
    "429": "3040 queue full (Retry-After)",
    "500": "3001 internal error",
    "503": "3050 shutting down",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def errors_for(api: str) -> dict[str, Any]:
    """The error responses of a route of ``api`` (``"cloudflare"`` or ``"openai"``)."""
    name = "CloudflareError" if api == "cloudflare" else "OpenAIError"
    content = {"application/json": {"schema": {"$ref": REF.format(model=name)}}}
    return {code: {"description": text, "content": content} for code, text in ERROR_STATUSES.items()}


def json_body(*models: type[BaseModel], api: str) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is one of ``models`` (``oneOf`` for several)."""
    schema = _ref(models[0]) if len(models) == 1 else {"oneOf": [_ref(m) for m in models]}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": errors_for(api),
    }


def multipart_body(api: str = "cloudflare") -> dict[str, Any]:
    """``openapi_extra`` for the fine-tune asset upload (``multipart/form-data``)."""
    schema = {
        "type": "object",
        "required": ["file_name", "file"],
        "properties": {
            "file_name": {"type": "string", "enum": ["adapter_config.json", "adapter_model.safetensors"]},
            "file": {"type": "string", "format": "binary"},
        },
    }
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}},
        "responses": errors_for(api),
    }


def build(app: FastAPI, *, secured: bool) -> dict[str, Any]:
    """The OpenAPI document of ``app``: its routes plus the body models and error bodies."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in BODY_MODELS], ref_template=REF)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    # FastAPI lists a 422 for routes with path parameters; this app answers invalid input with 400.
    for item in doc["paths"].values():
        for operation in item.values():
            operation.get("responses", {}).pop("422", None)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(defs.get("$defs", {}))
    schemas["CloudflareError"] = CLOUDFLARE_ERROR
    schemas["OpenAIError"] = OPENAI_ERROR
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        open_paths = {"/healthz", "/metrics", "/openapi.json"}
        for path, item in doc["paths"].items():
            if path not in open_paths:
                for operation in item.values():
                    operation["security"] = [{"bearer": []}]
    app.openapi_schema = doc
    return doc
