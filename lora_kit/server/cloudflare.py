"""Cloudflare Workers AI routes: ``/ai/run/{model}`` and fine-tune management, in Cloudflare's envelope."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Optional, Union

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from lora_kit.server import errors
from lora_kit.server.auth import require_management, require_token
from lora_kit.server.bodies import drain_body, file_too_large, read_json, receive_upload
from lora_kit.server.errors import ApiError, envelope
from lora_kit.server.finetunes import FORM_OVERHEAD_BYTES, asset_limit, check_asset_name, missing_files, public_row
from lora_kit.server.generation import (
    Completion,
    ResponseShape,
    adapter_label,
    cloudflare_tool_calls,
    engine_request,
    model_matches,
    respond,
)
from lora_kit.server.openapi import errors_for, json_body, multipart_body
from lora_kit.server.schemas import FinetuneCreate, MessagesRequest, PromptRequest, parse
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
    parsed = parse(PromptRequest if has_prompt else MessagesRequest, body)
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


def _result(response: Any, done: Completion) -> dict[str, Any]:
    result: dict[str, Any] = {"response": response, "usage": done.usage()}
    if done.tool_calls:
        result["tool_calls"] = cloudflare_tool_calls(done.tool_calls)
    return result


class RunShape(ResponseShape):
    """Workers AI's result ``{response, usage, [tool_calls]}`` in the envelope, or its stream:
    ``data: {"response": delta}`` per event, a last event with ``usage`` (and tool calls), ``data: [DONE]``.

    In JSON mode ``response`` is the parsed object, as Workers AI does. An error after the status
    is an event with Cloudflare's ``errors`` list.
    """

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode

    def body(self, done: Completion) -> dict[str, Any]:
        response: Any = done.text
        if self.json_mode:
            try:
                response = json.loads(done.text)
            except ValueError:
                pass
        return envelope(_result(response, done))

    def delta(self, text: str) -> Any:
        return {"response": text}

    def closing(self, done: Completion) -> list[Any]:
        return [_result("", done)]

    def failure(self, err: ApiError) -> Any:
        return {"response": "", "errors": [{"code": err.code, "message": err.message}]}


def router(state: ServerState) -> APIRouter:
    """The Cloudflare-compatible routes, all behind the bearer token when one is set; creating a
    fine-tune and uploading its files are management (3051/403 while it is off)."""
    check_management = require_management(state.api_token, state.management, state.allowed_hosts)
    api = APIRouter(dependencies=[Depends(require_token(state.api_token))])
    api.include_router(run_routes(state))
    api.include_router(finetune_routes(state, check_management))
    combined = APIRouter()
    combined.include_router(api)
    # The upload route checks management and the token with its own dependency (before the body is
    # read, as FastAPI reads no body for a route without body parameters), so it lives outside ``api``.
    combined.include_router(upload_routes(state, check_management))
    return combined


def run_routes(state: ServerState) -> APIRouter:
    """``POST .../ai/run/{model}``: a prompt or chat completion, streamed or whole."""
    api = APIRouter()

    @api.post(
        PREFIX + "/run/{model_name:path}", openapi_extra=json_body(PromptRequest, MessagesRequest, api="cloudflare")
    )
    async def run(account_id: str, model_name: str, request: Request) -> Any:
        check_model(state, model_name)
        req = parse_run_body(await read_json(request, state.max_body_bytes))
        adapters = await state.resolve_lora(req.lora)
        request.state.adapter = adapter_label(adapters.spec)
        gen = engine_request(state.engine.tokenizer, req, adapters, state.max_tokens_cap)
        return await respond(state.runner, request, gen, req.stream, RunShape(gen.response_format is not None))

    return api


def finetune_routes(state: ServerState, check_management: Callable[[Request], None]) -> APIRouter:
    """Creating a fine-tune (management) and listing fine-tunes (``.../finetunes``, ``.../finetunes/public``)."""
    api = APIRouter()

    async def create_finetune(account_id: str, request: Request) -> Any:
        spec = parse(FinetuneCreate, await read_json(request, state.max_body_bytes, json_type_only=True))
        check_model(state, spec.model)
        base = state.engine.model_name
        meta = state.finetunes.create(spec.name, spec.model, spec.description or "", spec.public, base_model=base)
        return envelope(public_row(meta))

    async def list_finetunes(account_id: str) -> Any:
        return envelope(state.finetunes.list(state.served_model))

    async def list_public_finetunes(account_id: str) -> Any:
        return envelope([])  # no public (Cloudflare-hosted) LoRAs here

    # Cloudflare's docs put trailing slashes on these paths; the SDK and wrangler do not: serve both.
    for suffix in ("", "/"):
        api.add_api_route(
            PREFIX + "/finetunes" + suffix,
            create_finetune,
            methods=["POST"],
            dependencies=[Depends(check_management)],
            openapi_extra=json_body(FinetuneCreate, api="cloudflare"),
        )
        api.add_api_route(
            PREFIX + "/finetunes" + suffix, list_finetunes, methods=["GET"], responses=errors_for("cloudflare")
        )
        api.add_api_route(
            PREFIX + "/finetunes/public" + suffix,
            list_public_finetunes,
            methods=["GET"],
            responses=errors_for("cloudflare"),
        )
    return api


def upload_routes(state: ServerState, check_management: Callable[[Request], None]) -> APIRouter:
    """``POST .../finetunes/{id}/finetune-assets``: one file of a fine-tune, streamed to its staging
    directory. Management and the token are this router's own dependency, checked before the body is read."""

    async def check_management_then_close(request: Request) -> None:
        # A refused upload's connection is closed after at most a small drain (bodies.drain_body),
        # never after reading a large body.
        try:
            check_management(request)
        except ApiError as err:
            err.headers.setdefault("Connection", "close")
            await drain_body(request)
            raise

    async def upload_asset(account_id: str, finetune_id: str, request: Request) -> Any:
        """Auth (this route's dependency) and the fine-tune id are checked before a byte of the body is
        read; the file part is then streamed to the fine-tune's staging directory under its cap
        (:func:`asset_limit`) and moved into place by path. Every refusal closes the connection after
        reading at most 1 MiB more (so a small refused upload still gets its answer, see drain_body)."""
        try:
            return await _upload(state, finetune_id, request)
        except ApiError as err:
            err.headers.setdefault("Connection", "close")
            await drain_body(request)
            raise

    uploads = APIRouter(dependencies=[Depends(check_management_then_close)])
    for suffix in ("", "/"):
        uploads.add_api_route(
            PREFIX + "/finetunes/{finetune_id}/finetune-assets" + suffix,
            upload_asset,
            methods=["POST"],
            openapi_extra=multipart_body(),
        )
    return uploads


async def _upload(state: ServerState, finetune_id: str, request: Request) -> Any:
    """Receive one asset of ``finetune_id`` under its cap and hand it to the fine-tune store; the
    received file is discarded in any case (moved into place already, or refused)."""
    form = None
    try:
        stage = state.finetunes.staging_dir(finetune_id)

        def file_limit(fields: dict[str, str], filename: Optional[str]) -> int:
            name = fields["file_name"].strip() if "file_name" in fields else filename
            if name and "file_name" in fields:
                check_asset_name(name)  # a wrong name is refused before its file is read
            return asset_limit(name or "", state.max_upload_bytes)

        form = await receive_upload(
            request, stage, file_limit=file_limit, body_limit=state.max_upload_bytes + FORM_OVERHEAD_BYTES
        )
        file_name = form.fields["file_name"].strip() if "file_name" in form.fields else form.filename
        if form.path is None or not file_name:
            raise missing_files(finetune_id, ["the multipart fields 'file_name' and 'file'"])
        check_asset_name(file_name)
        limit = asset_limit(file_name, state.max_upload_bytes)
        if form.size > limit:  # the name came after the file
            raise file_too_large(limit, file_name)
        meta = await run_in_threadpool(state.finetunes.upload, finetune_id, file_name, form.path)
        return envelope(public_row(meta))
    finally:
        if form is not None:
            form.discard()
