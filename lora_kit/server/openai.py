"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

``model`` names the base or an adapter (``NAME``, ``NAME@V``, ``NAME:ALIAS``, id); a ``lora``
body field (``extra_body={"lora": ...}`` in the SDK) also picks the adapter when ``model`` is
the base. Errors use OpenAI's ``{"error": {...}}`` body, which the openai SDK reads.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from lora_kit import chat
from lora_kit.engine import GenerationOutput, GenerationRequest
from lora_kit.server import errors, sse
from lora_kit.server.auth import require_token
from lora_kit.server.bodies import read_json
from lora_kit.server.errors import ApiError
from lora_kit.server.generation import (
    Completion,
    disconnect_waiter,
    engine_error,
    model_matches,
    openai_tool_calls,
    sampling_params,
)
from lora_kit.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAISampling, describe_validation_error
from lora_kit.server.state import ServerState

CHAT_DEFAULT_MAX_TOKENS = 256  # as Cloudflare's default; OpenAI's "until the context ends" is rarely wanted
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _validate(model: type[OpenAISampling], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise errors.bad_input(describe_validation_error(err)) from None


async def resolve_adapter(state: ServerState, model: str, lora: Optional[str]) -> Optional[str]:
    """The adapter a request names through ``model`` or ``lora``; 404 ``model_not_found`` if none fits."""
    if model_matches(model, state.served_model):
        return await state.resolve_lora(lora)
    if lora is not None and lora != model:
        raise errors.bad_input(
            f"model names {model!r} but lora names {lora!r}: name the adapter in one of them", "lora"
        )
    try:
        return await state.resolve_lora(model)
    except ApiError as err:
        if err.code != errors.FINETUNE_NOT_FOUND[0]:
            raise
        raise ApiError(
            errors.FINETUNE_NOT_FOUND,
            f"The model {model!r} does not exist: it is neither the base model {state.served_model!r} "
            f"nor an adapter in the registry ({err.message})",
            param="model",
            openai_code="model_not_found",
        ) from None


def _params(state: ServerState, req: OpenAISampling, default_max_tokens: int) -> Any:
    return sampling_params(
        max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        stop=req.stop_list(),
        ignore_eos=req.ignore_eos,
        max_tokens_cap=state.max_tokens_cap,
        default_max_tokens=default_max_tokens,
    )


def _response_format(req: OpenAISampling) -> Optional[dict]:
    try:
        return req.response_format.to_engine() if req.response_format else None
    except ValueError as err:
        raise errors.bad_input(f"response_format: {err}", "response_format") from err


def _finish_reason(done: Completion) -> str:
    if done.tool_calls:
        return "tool_calls"
    return done.finish_reason if done.finish_reason in ("stop", "length", "tool_calls") else "stop"


def chat_response(done: Completion, model: str, rid: str, created: int) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": done.text}
    if done.tool_calls:
        message["tool_calls"] = [
            {k: v for k, v in call.items() if k != "index"} for call in openai_tool_calls(done.tool_calls)
        ]
        message["content"] = done.text or None
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(done), "logprobs": None}],
        "usage": done.usage(),
    }


def completion_response(done: Completion, model: str, rid: str, created: int) -> dict[str, Any]:
    """A ``text_completion`` object."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": done.text, "finish_reason": _finish_reason(done), "logprobs": None}],
        "usage": done.usage(),
    }


async def chat_chunks(
    events: AsyncIterator[GenerationOutput], model: str, rid: str, created: int, include_usage: bool
) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: role, content deltas, tool calls, finish reason, [usage], [DONE]."""

    def chunk(delta: dict[str, Any], finish: Optional[str] = None) -> bytes:
        return sse.event(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
        )

    done = Completion()
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for out in events:
            done.add(out)
            if out.text:
                yield chunk({"content": out.text})
        if done.tool_calls:
            yield chunk({"tool_calls": openai_tool_calls(done.tool_calls)})
        yield chunk({}, _finish_reason(done))
        if include_usage:
            yield sse.event(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": done.usage(),
                }
            )
        yield sse.DONE
    except Exception as err:  # noqa: BLE001 - the status is already sent
        yield sse.event(errors.openai_body(engine_error(err)))
    finally:
        await events.aclose()


async def completion_chunks(
    events: AsyncIterator[GenerationOutput], model: str, rid: str, created: int, include_usage: bool
) -> AsyncIterator[bytes]:
    """``text_completion`` stream events, then [usage], then [DONE]."""

    def chunk(text: str, finish: Optional[str] = None) -> bytes:
        return sse.event(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }
        )

    done = Completion()
    try:
        async for out in events:
            done.add(out)
            if out.text:
                yield chunk(out.text)
        yield chunk("", _finish_reason(done))
        if include_usage:
            yield sse.event(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": done.usage(),
                }
            )
        yield sse.DONE
    except Exception as err:  # noqa: BLE001
        yield sse.event(errors.openai_body(engine_error(err)))
    finally:
        await events.aclose()


def router(state: ServerState) -> APIRouter:
    """The OpenAI-compatible routes, behind the bearer token when one is set."""
    api = APIRouter(prefix="/v1", dependencies=[Depends(require_token(state.api_token))])

    @api.get("/models")
    async def list_models() -> Any:
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
        versions = state.registry.list()
        latest: dict[str, Any] = {}
        for v in versions:
            latest[v.name] = v  # list() is ordered by name, then version
        for v in versions:
            if latest[v.name] is v:
                data.append(_adapter_model(v.name, v, state.served_model))
            data.append(_adapter_model(v.ref, v, state.served_model))
        return {"object": "list", "data": data}

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req: ChatCompletionRequest = _validate(ChatCompletionRequest, await read_json(request, state.max_body_bytes))
        adapter = await resolve_adapter(state, req.model, req.lora)
        request.state.adapter = adapter
        tools = [t.to_openai() for t in req.tools] if req.tools else None
        try:
            ids = chat.render(
                state.engine.tokenizer, [m.to_chat() for m in req.messages], add_generation_prompt=True, tools=tools
            ).input_ids
        except chat.ChatError as err:
            raise errors.bad_input(f"messages: {err}", "messages") from err
        gen = GenerationRequest(
            ids,
            _params(state, req, CHAT_DEFAULT_MAX_TOKENS),
            adapter=adapter,
            response_format=_response_format(req),
            tools=tools,
            tool_choice=req.tool_choice if tools else None,
        )
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            events = await state.runner.stream(gen)
            return StreamingResponse(
                chat_chunks(events, req.model, rid, created, req.include_usage()),
                media_type=sse.MEDIA_TYPE,
                headers=sse.HEADERS,
            )
        done = await state.runner.complete(gen, disconnect_waiter(request))
        return JSONResponse(chat_response(done, req.model, rid, created))

    @api.post("/completions")
    async def completions(request: Request) -> Any:
        req: CompletionRequest = _validate(CompletionRequest, await read_json(request, state.max_body_bytes))
        adapter = await resolve_adapter(state, req.model, req.lora)
        request.state.adapter = adapter
        try:
            ids = chat.render_prompt(state.engine.tokenizer, req.prompt_text(), raw=True)
        except chat.ChatError as err:
            raise errors.bad_input(f"prompt: {err}", "prompt") from err
        gen = GenerationRequest(
            ids,
            _params(state, req, COMPLETION_DEFAULT_MAX_TOKENS),
            adapter=adapter,
            response_format=_response_format(req),
        )
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            events = await state.runner.stream(gen)
            return StreamingResponse(
                completion_chunks(events, req.model, rid, created, req.include_usage()),
                media_type=sse.MEDIA_TYPE,
                headers=sse.HEADERS,
            )
        done = await state.runner.complete(gen, disconnect_waiter(request))
        return JSONResponse(completion_response(done, req.model, rid, created))

    return api


def _adapter_model(model_id: str, version: Any, served: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": _epoch(version.created_at),
        "owned_by": "lora-kit",
        "root": version.ref,
        "parent": served,
    }


def _epoch(stamp: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
