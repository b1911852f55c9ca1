"""Cloudflare Workers AI routes: ``/ai/run/{model}`` and fine-tune management, in Cloudflare's envelope."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from lora_kit import chat
from lora_kit.engine import GenerationOutput, GenerationRequest
from lora_kit.server import errors, sse
from lora_kit.server.auth import require_token
from lora_kit.server.bodies import parse_multipart, read_body, read_json
from lora_kit.server.errors import ApiError, envelope
from lora_kit.server.finetunes import missing_files, public_row
from lora_kit.server.generation import (
    Completion,
    cloudflare_tool_calls,
    disconnect_waiter,
    engine_error,
    model_matches,
    sampling_params,
)
from lora_kit.server.schemas import FinetuneCreate, MessagesRequest, PromptRequest, describe_validation_error
from lora_kit.server.state import ServerState

PREFIX = "/client/v4/accounts/{account_id}/ai"

RunRequest = Union[PromptRequest, MessagesRequest]


def parse_run_body(body: dict[str, Any]) -> RunRequest:
    """Validate a body against the prompt form or the messages form (``oneOf``); 5006 names the field."""
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt and has_messages:
        raise errors.bad_input("give either 'prompt' or 'messages', not both")
    if not has_prompt and not has_messages:
        raise errors.bad_input("required properties at '/' are 'prompt' (prompt form) or 'messages' (messages form)")
    model = PromptRequest if has_prompt else MessagesRequest
    try:
        parsed = model.model_validate(body)
    except ValidationError as err:
        raise errors.bad_input(describe_validation_error(err)) from None
    if isinstance(parsed, MessagesRequest) and parsed.functions:
        raise errors.bad_input(
            "functions: embedded function calling is deprecated and not supported; use 'tools'", "functions"
        )
    return parsed


def check_model(state: ServerState, model_name: str) -> None:
    """5007/400 unless ``model_name`` names the served base model."""
    if not model_matches(model_name, state.served_model):
        raise ApiError(
            errors.NO_SUCH_MODEL,
            f"No such model {model_name!r}: this server serves {state.served_model!r} "
            f"(also accepted as '@cf/<author>/{state.served_model.rsplit('/', 1)[-1]}'); pick an adapter with 'lora'",
            openai_code="model_not_found",
        )


def prompt_ids(tokenizer: Any, req: RunRequest, tools: Optional[list[dict]]) -> list[int]:
    """Token ids of the request, rendered only through :mod:`lora_kit.chat`; ChatError -> 5006.

    In the messages form the chat template is always applied (as Workers AI did); ``raw``
    applies to the prompt form, where it passes the text through untouched.
    """
    try:
        if isinstance(req, PromptRequest):
            return chat.render_prompt(tokenizer, req.prompt, raw=req.raw)
        messages = [m.to_chat() for m in req.messages]
        return chat.render(tokenizer, messages, add_generation_prompt=True, tools=tools).input_ids
    except chat.ChatError as err:
        raise errors.bad_input(f"{'prompt' if isinstance(req, PromptRequest) else 'messages'}: {err}") from err


def build_request(state: ServerState, req: RunRequest, adapter: Optional[str]) -> GenerationRequest:
    """The engine request for a validated Cloudflare body."""
    tools = [t.to_openai() for t in req.tools] if isinstance(req, MessagesRequest) and req.tools else None
    try:
        response_format = req.response_format.to_engine() if req.response_format else None
    except ValueError as err:
        raise errors.bad_input(f"response_format: {err}", "response_format") from err
    params = sampling_params(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        ignore_eos=req.ignore_eos,
        max_tokens_cap=state.max_tokens_cap,
    )
    ids = prompt_ids(state.engine.tokenizer, req, tools)
    tool_choice = req.tool_choice if isinstance(req, MessagesRequest) and tools else None
    return GenerationRequest(
        ids, params, adapter=adapter, response_format=response_format, tools=tools, tool_choice=tool_choice
    )


def result_of(done: Completion, json_mode: bool) -> dict[str, Any]:
    """``{response, usage, [tool_calls]}``. In JSON mode ``response`` is the parsed object, as Workers AI does."""
    response: Any = done.text
    if json_mode:
        try:
            response = json.loads(done.text)
        except ValueError:
            pass
    result: dict[str, Any] = {"response": response, "usage": done.usage()}
    if done.tool_calls:
        result["tool_calls"] = cloudflare_tool_calls(done.tool_calls)
    return result


async def sse_events(events: AsyncIterator[GenerationOutput]) -> AsyncIterator[bytes]:
    """``data: {"response": delta}`` per event, a last event with ``usage`` (and tool calls), ``data: [DONE]``.

    An engine failure after the stream has started cannot change the status any more: it is sent
    as an event with Cloudflare's ``errors`` list, and the stream ends without ``[DONE]``.
    """
    done = Completion()
    try:
        async for out in events:
            done.add(out)
            if out.text:
                yield sse.event({"response": out.text})
        final: dict[str, Any] = {"response": "", "usage": done.usage()}
        if done.tool_calls:
            final["tool_calls"] = cloudflare_tool_calls(done.tool_calls)
        yield sse.event(final)
        yield sse.DONE
    except Exception as err:  # noqa: BLE001 - reported in-band; the status is already sent
        api = engine_error(err)
        yield sse.event({"response": "", "errors": [{"code": api.code, "message": api.message}]})
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def router(state: ServerState) -> APIRouter:
    """The Cloudflare-compatible routes, all behind the bearer token when one is set."""
    api = APIRouter(dependencies=[Depends(require_token(state.api_token))])

    @api.post(PREFIX + "/run/{model_name:path}")
    async def run(account_id: str, model_name: str, request: Request) -> Any:
        check_model(state, model_name)
        req = parse_run_body(await read_json(request, state.max_body_bytes))
        adapter = await state.resolve_lora(req.lora)
        request.state.adapter = adapter
        gen = build_request(state, req, adapter)
        if req.stream:
            events = await state.runner.stream(gen)
            return StreamingResponse(sse_events(events), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        done = await state.runner.complete(gen, disconnect_waiter(request))
        return JSONResponse(envelope(result_of(done, gen.response_format is not None)))

    async def create_finetune(account_id: str, request: Request) -> Any:
        body = await read_json(request, state.max_body_bytes)
        try:
            spec = FinetuneCreate.model_validate(body)
        except ValidationError as err:
            raise errors.bad_input(describe_validation_error(err)) from None
        check_model(state, spec.model)
        base = getattr(state.engine, "model_spec", None) or state.served_model
        meta = state.finetunes.create(spec.name, spec.model, spec.description or "", spec.public, base_model=base)
        return envelope(public_row(meta))

    async def list_finetunes(account_id: str) -> Any:
        return envelope(state.finetunes.list(state.served_model))

    async def list_public_finetunes(account_id: str) -> Any:
        return envelope([])  # no public (Cloudflare-hosted) LoRAs here

    async def upload_asset(account_id: str, finetune_id: str, request: Request) -> Any:
        body = await read_body(request, state.max_upload_bytes)
        parts = parse_multipart(body, request.headers.get("content-type", ""))
        file_part = parts.get("file")
        name_part = parts.get("file_name")
        file_name = name_part.text().strip() if name_part else (file_part.filename if file_part else None)
        if file_part is None or not file_name:
            raise missing_files(finetune_id, ["the multipart fields 'file_name' and 'file'"])
        meta = state.finetunes.upload(finetune_id, file_name, file_part.data)
        return envelope(public_row(meta))

    # Cloudflare's docs put trailing slashes on these paths; the SDK and wrangler do not: serve both.
    for suffix in ("", "/"):
        api.add_api_route(PREFIX + "/finetunes" + suffix, create_finetune, methods=["POST"])
        api.add_api_route(PREFIX + "/finetunes" + suffix, list_finetunes, methods=["GET"])
        api.add_api_route(PREFIX + "/finetunes/public" + suffix, list_public_finetunes, methods=["GET"])
        api.add_api_route(PREFIX + "/finetunes/{finetune_id}/finetune-assets" + suffix, upload_asset, methods=["POST"])
    return api
