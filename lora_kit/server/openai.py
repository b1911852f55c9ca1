"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

``model`` names the base or an adapter (``NAME``, ``NAME@V``, ``NAME:ALIAS``, id); a ``lora``
body field (``extra_body={"lora": ...}`` in the SDK) also picks the adapter when ``model`` is
the base. Errors use OpenAI's ``{"error": {...}}`` body, which the openai SDK reads.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from lora_kit.server import errors
from lora_kit.server.auth import require_token
from lora_kit.server.bodies import read_json
from lora_kit.server.errors import ApiError
from lora_kit.server.generation import (
    ChosenAdapters,
    Completion,
    ResponseShape,
    adapter_label,
    engine_request,
    model_matches,
    openai_tool_calls,
    respond,
)
from lora_kit.server.openapi import errors_for, json_body
from lora_kit.server.schemas import ChatCompletionRequest, CompletionRequest, LoraWeight, describe_lora, parse
from lora_kit.server.state import ServerState


async def resolve_adapter(state: ServerState, model: str, lora: Union[str, list[LoraWeight], None]) -> ChosenAdapters:
    """The adapter a request names through ``model`` or ``lora``; 404 ``model_not_found`` if none fits."""
    if model_matches(model, state.served_model):
        return await state.resolve_lora(lora)
    if lora is not None and lora != model:
        raise errors.bad_input(
            f"model names the adapter {model!r} but lora names {describe_lora(lora)}: "
            "name the adapter in one of them (model the base model, lora the adapter or mix)",
            "lora",
        )
    try:
        return await state.resolve_lora(model)
    except ApiError as err:
        if err.code == errors.BAD_INPUT[0] and err.param == "lora":  # the adapter was named by ``model``
            raise errors.bad_input(f"model: {err.message.removeprefix('lora: ')}", "model") from None
        if err.code != errors.FINETUNE_NOT_FOUND[0]:
            raise
        raise ApiError(
            errors.FINETUNE_NOT_FOUND,
            f"The model {model!r} does not exist: it is neither the base model {state.served_model!r} "
            f"nor an adapter in the registry ({err.message})",
            param="model",
            openai_code="model_not_found",
        ) from None


def _finish_reason(done: Completion) -> str:
    if done.tool_calls:
        return "tool_calls"
    return done.finish_reason if done.finish_reason in ("stop", "length", "tool_calls") else "stop"


def _message(done: Completion) -> dict[str, Any]:
    """The assistant message of a ``chat.completion``."""
    message: dict[str, Any] = {"role": "assistant", "content": done.text}
    if done.tool_calls:
        message["tool_calls"] = [
            {k: v for k, v in call.items() if k != "index"} for call in openai_tool_calls(done.tool_calls)
        ]
        message["content"] = done.text or None
    return message


def _tool_call_deltas(done: Completion) -> list[dict[str, Any]]:
    return [{"delta": {"tool_calls": openai_tool_calls(done.tool_calls)}}] if done.tool_calls else []


@dataclass(frozen=True)
class Endpoint:
    """What differs between chat and text completions: the names, and how a choice carries the text.

    ``content``, ``delta``, ``finished``, ``opening`` and ``after`` give the part of a choice
    between its ``index`` and its ``finish_reason``; the rest of the objects is common.
    """

    id_prefix: str
    object: str  # the response's object
    chunk_object: str  # a stream chunk's object
    content: Callable[[Completion], dict[str, Any]]  # a response choice's
    delta: Callable[[str], dict[str, Any]]  # a chunk choice's, for a text delta
    finished: dict[str, Any]  # the finishing chunk choice's
    opening: tuple[dict[str, Any], ...] = ()  # chunk choices' before the first token
    after: Callable[[Completion], list[dict[str, Any]]] = lambda done: []  # chunk choices' after the last


CHAT = Endpoint(
    id_prefix="chatcmpl-",
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    content=lambda done: {"message": _message(done)},
    delta=lambda text: {"delta": {"content": text}},
    finished={"delta": {}},
    opening=({"delta": {"role": "assistant", "content": ""}},),
    after=_tool_call_deltas,
)
COMPLETION = Endpoint(
    id_prefix="cmpl-",
    object="text_completion",
    chunk_object="text_completion",
    content=lambda done: {"text": done.text},
    delta=lambda text: {"text": text},
    finished={"text": ""},
)


class OpenAIShape(ResponseShape):
    """A ``chat.completion``/``text_completion`` object, or its chunks: the deltas, the finish reason,
    [usage], then ``[DONE]``; an error after the status is OpenAI's error body."""

    def __init__(self, endpoint: Endpoint, model: str, include_usage: bool) -> None:
        self.endpoint, self.model, self.include_usage = endpoint, model, include_usage
        self.rid, self.created = f"{endpoint.id_prefix}{uuid.uuid4().hex}", int(time.time())

    def _object(self, name: str, choices: list[dict[str, Any]], **rest: Any) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **rest,
        }

    @staticmethod
    def _choice(content: dict[str, Any], finish: Optional[str]) -> dict[str, Any]:
        return {"index": 0, **content, "finish_reason": finish, "logprobs": None}

    def _chunk(self, content: dict[str, Any], finish: Optional[str] = None) -> dict[str, Any]:
        return self._object(self.endpoint.chunk_object, [self._choice(content, finish)])

    def body(self, done: Completion) -> dict[str, Any]:
        choice = self._choice(self.endpoint.content(done), _finish_reason(done))
        return self._object(self.endpoint.object, [choice], usage=done.usage())

    def opening(self) -> list[Any]:
        return [self._chunk(content) for content in self.endpoint.opening]

    def delta(self, text: str) -> Any:
        return self._chunk(self.endpoint.delta(text))

    def closing(self, done: Completion) -> list[Any]:
        out = [self._chunk(content) for content in self.endpoint.after(done)]
        out.append(self._chunk(self.endpoint.finished, _finish_reason(done)))
        if self.include_usage:
            out.append(self._object(self.endpoint.chunk_object, [], usage=done.usage()))
        return out

    def failure(self, err: ApiError) -> Any:
        return errors.openai_body(err)


async def _generate(
    state: ServerState, request: Request, req: Union[ChatCompletionRequest, CompletionRequest], endpoint: Endpoint
) -> Response:
    adapters = await resolve_adapter(state, req.model, req.lora)
    request.state.adapter = adapter_label(adapters.spec)
    gen = engine_request(state.engine.tokenizer, req, adapters, state.max_tokens_cap)
    return await respond(state.runner, request, gen, req.stream, OpenAIShape(endpoint, req.model, req.include_usage()))


def router(state: ServerState) -> APIRouter:
    """The OpenAI-compatible routes, behind the bearer token when one is set."""
    api = APIRouter(prefix="/v1", dependencies=[Depends(require_token(state.api_token))])

    @api.get("/models", responses=errors_for("openai"))
    async def list_models() -> Any:
        from lora_kit.registry.targets import version_json

        created = int(time.time())
        data: list[dict[str, Any]] = [
            {
                "id": state.served_model,
                "object": "model",
                "created": created,
                "owned_by": "lora-kit",
                "root": state.served_model,
                "parent": None,
            }
        ]
        versions = [v for v in state.registry.list() if state.runtime.is_served(v.name)]  # not the unloaded
        latest: dict[str, Any] = {}
        for v in versions:
            latest[v.name] = v  # list() is ordered by name, then version
        for v in versions:
            record = version_json(state.registry, v)  # export targets: cached by content, cheap per listing
            if latest[v.name] is v:
                data.append(_adapter_model(v.name, record, state.served_model))
            data.append(_adapter_model(v.ref, record, state.served_model))
        return {"object": "list", "data": data}

    @api.post("/chat/completions", openapi_extra=json_body(ChatCompletionRequest, api="openai"))
    async def chat_completions(request: Request) -> Any:
        req = parse(ChatCompletionRequest, await read_json(request, state.max_body_bytes))
        return await _generate(state, request, req, CHAT)

    @api.post("/completions", openapi_extra=json_body(CompletionRequest, api="openai"))
    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await read_json(request, state.max_body_bytes))
        return await _generate(state, request, req, COMPLETION)

    return api


def _adapter_model(model_id: str, record: dict[str, Any], served: str) -> dict[str, Any]:
    """A version (its JSON record, ``version_json``) as an OpenAI model named ``model_id``."""
    return {
        "id": model_id,
        "object": "model",
        "created": _epoch(record["created_at"]),
        "owned_by": "lora-kit",
        "root": record["ref"],
        "parent": served,
        "export_targets": list(record["export_targets"]),
    }


def _epoch(stamp: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
