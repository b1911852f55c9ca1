"""What both APIs share: model-name matching, the engine request of a body, running it, shaping the response.

Errors are mapped to :class:`ApiError` *before* anything is sent: a stream is primed with
its first engine event, so an unknown adapter or a full queue is a 4xx status, not a
broken stream. Closing a request's iterator (client gone) cancels it in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lora_kit import chat
from lora_kit.engine import (
    AdapterError,
    GenerationOutput,
    GenerationRequest,
    Overloaded,
    UnknownAdapter,
)
from lora_kit.engine.constraints import GrammarError
from lora_kit.engine.types import AdapterSpec, InvalidAdapterReference, RequestFailed, ResolvedAdapter, ShuttingDown
from lora_kit.server import errors, sse
from lora_kit.server.errors import ApiError
from lora_kit.server.metrics import Metrics
from lora_kit.server.schemas import ChatCompletionRequest, GenerationBody, MessagesRequest, PromptRequest
from lora_kit.server.serving import ServingEngine

CLOUDFLARE_MODEL_PREFIXES = ("@cf/", "@hf/")

logger = logging.getLogger(__name__)


def model_matches(name: str, served: str) -> bool:
    """True for the served model's own name and for ``@cf/<author>/<served name>``-style names.

    Only the served model is accepted: ``@cf/mistral/mistral-7b-instruct-v0.1`` names this
    server's base only if the base *is* served under that last path segment.
    """
    if name == served:
        return True
    if not name.startswith(CLOUDFLARE_MODEL_PREFIXES):
        return False
    if name.endswith("/" + served):
        return True
    return name.rsplit("/", 1)[-1].lower() == served.rstrip("/").rsplit("/", 1)[-1].lower()


@dataclass
class ServerRequest(GenerationRequest):
    """An engine request whose prompt is rendered at submission (``render``), in a worker thread:
    tokenizing a body of megabytes takes seconds, which the event loop must not wait for."""

    render: Optional[Callable[[], list[int]]] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ChosenAdapters:
    """What a request runs with: ``spec`` in canonical references (None: the base), and the
    resolution of each (``NAME@VERSION``, its directory and files), carried with the request to
    the engine (``GenerationRequest.resolved_adapters``) so nothing is resolved twice."""

    spec: AdapterSpec
    resolved: Mapping[str, ResolvedAdapter] = field(default_factory=dict)


def engine_request(
    tokenizer: Any, req: GenerationBody, adapters: ChosenAdapters, max_tokens_cap: int
) -> GenerationRequest:
    """The engine request for a validated body of either API; 5006/400 for what the engine cannot take.

    Checked in this order: ``response_format``, the sampling settings, then the prompt's rendering,
    which is deferred to :meth:`Runner.stream` (off the event loop): until then ``prompt_ids`` is empty.
    """
    try:
        response_format = req.response_format.to_engine() if req.response_format else None
    except ValueError as err:
        raise errors.bad_input(f"response_format: {err}", "response_format") from err
    try:
        params = req.to_sampling_params(max_tokens_cap=max_tokens_cap)
    except ValueError as err:  # InvalidRequest: a value the engine cannot honour
        raise errors.bad_input(str(err)) from err
    tools, tool_choice = req.engine_tools()
    return ServerRequest(
        [],
        params,
        adapter=adapters.spec,
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        resolved_adapters=dict(adapters.resolved),
        render=lambda: prompt_ids(tokenizer, req, tools),
    )


def prompt_ids(tokenizer: Any, req: GenerationBody, tools: Optional[list[dict]]) -> list[int]:
    """Token ids of a body, rendered only through :mod:`lora_kit.chat`; ChatError -> 5006 naming the field.

    The messages forms always get the chat template (as Workers AI did); Cloudflare's ``raw``
    passes a prompt through untouched, as OpenAI's ``/v1/completions`` always does.
    """
    try:
        if isinstance(req, (MessagesRequest, ChatCompletionRequest)):
            messages = [m.to_chat() for m in req.messages]
            return chat.render(tokenizer, messages, add_generation_prompt=True, tools=tools).input_ids
        if isinstance(req, PromptRequest):
            return chat.render_prompt(tokenizer, req.prompt, raw=req.raw)
        return chat.render_prompt(tokenizer, req.prompt_text(), raw=True)
    except chat.ChatError as err:
        raise errors.bad_input(f"{req.PROMPT_FIELD}: {err}", req.PROMPT_FIELD) from err


def adapter_label(spec: AdapterSpec) -> Optional[str]:
    """How metrics and the access log name what a request ran with: its canonical reference, or a
    mix's canonical references sorted and joined by ``+`` (no scales, no order: one series per set
    of adapter versions, whatever the weighting or the order the client gave)."""
    if spec is None or isinstance(spec, str):
        return spec
    return "+".join(sorted({entry.ref for entry in spec}))


def engine_error(err: Exception, adapter: Optional[str] = None, request_id: Optional[str] = None) -> ApiError:
    """The API error for an engine exception.

    User errors keep their message (they say what to change). An internal failure tells the
    client only its request id: the details (exception class, message) go to the log under it.
    """
    if isinstance(err, ApiError):
        return err
    if isinstance(err, Overloaded):
        return errors.overloaded()
    if isinstance(err, ShuttingDown):
        return errors.shutting_down()
    if isinstance(err, UnknownAdapter):
        return ApiError(
            errors.FINETUNE_NOT_FOUND,
            f"Finetune {adapter!r} not found: {err}" if adapter else f"Finetune not found: {err}",
            param="lora",
            openai_code="model_not_found",
        )
    if isinstance(err, InvalidAdapterReference):
        return errors.bad_input(f"lora: {err}", param="lora")
    if isinstance(err, AdapterError):
        return errors.bad_input(f"lora: adapter {adapter!r} cannot be served on this base model: {err}", param="lora")
    if isinstance(err, ValueError):
        return errors.bad_input(str(err))
    request_id = getattr(err, "request_id", None) or request_id
    if not isinstance(err, RequestFailed):  # the engine logged a RequestFailed's cause already
        logger.error(
            "request %s failed: %s: %s", request_id, err.__class__.__name__, err, exc_info=(type(err), err, None)
        )
    suffix = f" (request id {request_id})" if request_id else ""
    return ApiError(errors.INTERNAL, f"Internal server error{suffix}")


@dataclass
class Completion:
    """A finished generation, gathered from the engine's events."""

    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[dict] = field(default_factory=list)
    replica: Optional[str] = None  # the engine replica that served it (Ray Serve), sent as a header

    def add(self, out: GenerationOutput) -> None:
        self.text += out.text
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens or self.completion_tokens
        if out.tool_calls:
            self.tool_calls = list(out.tool_calls)
        if out.finished:
            self.finish_reason = out.finish_reason

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _submit(engine: ServingEngine, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
    """Render a deferred prompt, then submit (building the grammar): blocking, for a worker thread."""
    if isinstance(request, ServerRequest) and request.render is not None:
        request.prompt_ids, request.render = request.render(), None
    return engine.generate(request)


class Started(NamedTuple):
    """A request's primed event stream, and the engine replica serving it (Ray Serve; else None)."""

    events: AsyncIterator[GenerationOutput]
    replica: Optional[str]


class Runner:
    """Runs requests on the engine and records their token metrics."""

    def __init__(self, engine: ServingEngine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    async def stream(self, request: GenerationRequest) -> Started:
        """The engine's events for ``request``, primed: engine errors before the first event raise
        here, and the replica serving it is known (from that first event).

        The returned iterator must be closed (``aclose``) or exhausted; closing cancels the request.
        """
        started = time.monotonic()
        try:
            # Overloaded, UnknownAdapter and InvalidRequest raise here, at submission. The prompt
            # renders and a grammar compiles (up to its time budget) in a worker thread, off the event loop.
            if isinstance(request, ServerRequest) or request.response_format or request.tools:
                events = (await asyncio.to_thread(_submit, self.engine, request)).__aiter__()
            else:
                events = self.engine.generate(request).__aiter__()
        except GrammarError as err:
            raise errors.bad_input(str(err), err.field) from err
        except Exception as err:  # noqa: BLE001
            raise engine_error(err, adapter_label(request.adapter), request.request_id) from err
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as err:  # noqa: BLE001
            await _close(events)
            raise engine_error(err, adapter_label(request.adapter), request.request_id) from err
        label = adapter_label(request.adapter)
        self.metrics.record_first_token(label, time.monotonic() - started)
        return Started(self._follow(first, events, label), first.replica if first is not None else None)

    async def _follow(
        self, first: Optional[GenerationOutput], events: AsyncIterator[GenerationOutput], adapter: Optional[str]
    ) -> AsyncIterator[GenerationOutput]:
        last: Optional[GenerationOutput] = first
        try:
            if first is not None:
                yield first
            async for out in events:
                last = out
                yield out
        finally:
            await _close(events)
            if last is not None:
                self.metrics.record_tokens(adapter, last.prompt_tokens, last.completion_tokens)

    async def complete(
        self, request: GenerationRequest, disconnected: Optional[Callable[[], Any]] = None
    ) -> Completion:
        """Run ``request`` to the end. If ``disconnected`` (an awaitable factory) finishes first, cancel it."""
        events, replica = await self.stream(request)

        async def gather() -> Completion:
            done = Completion(replica=replica)
            try:
                async for out in events:
                    done.add(out)
            except ApiError:
                raise
            except Exception as err:  # noqa: BLE001
                raise engine_error(err, adapter_label(request.adapter), request.request_id) from err
            finally:
                await _close(events)
            return done

        if disconnected is None:
            return await gather()
        work = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()  # the client is gone: free its batch place
                await asyncio.gather(work, return_exceptions=True)
            watch.cancel()
        if work.cancelled():
            raise ApiError(errors.INTERNAL, "client disconnected")
        return work.result()


class ResponseShape(ABC):
    """How one API shapes a generation: the whole JSON body, or the payloads of an SSE stream.

    :func:`respond` and :func:`sse_stream` drive it; each API fills in its payloads.
    """

    @abstractmethod
    def body(self, done: Completion) -> dict[str, Any]:
        """The JSON body of a response that is not streamed."""

    def opening(self) -> list[Any]:
        """Stream payloads before the first token."""
        return []

    @abstractmethod
    def delta(self, text: str) -> Any:
        """The stream payload of one text delta."""

    @abstractmethod
    def closing(self, done: Completion) -> list[Any]:
        """Stream payloads after the last token (finish reason, usage, tool calls), before ``[DONE]``."""

    @abstractmethod
    def failure(self, err: ApiError) -> Any:
        """The payload of an error once the status is sent; the stream then ends without ``[DONE]``
        (but for a shutdown: see :func:`sse_stream`)."""


async def sse_stream(events: AsyncIterator[GenerationOutput], shape: ResponseShape) -> AsyncIterator[bytes]:
    """The SSE body of a primed event stream in ``shape``'s payloads, then ``data: [DONE]``.

    An engine failure after the stream has started cannot change the status any more: it is sent
    in-band (``shape.failure``). A shutdown (3050) is sent in-band too, then ``[DONE]``: the
    stream ends as the documented contract says, only not with a finish. Closing this iterator
    (client gone) cancels the request.
    """
    done = Completion()
    try:
        for payload in shape.opening():
            yield sse.event(payload)
        async for out in events:
            done.add(out)
            if out.text:
                yield sse.event(shape.delta(out.text))
        for payload in shape.closing(done):
            yield sse.event(payload)
        yield sse.DONE
    except Exception as err:  # noqa: BLE001 - reported in-band; the status is already sent
        failure = engine_error(err)
        yield sse.event(shape.failure(failure))
        if (failure.code, failure.status) == errors.SHUTTING_DOWN:
            yield sse.DONE
    finally:
        await _close(events)


async def respond(
    runner: Runner, request: Request, gen: GenerationRequest, stream: bool, shape: ResponseShape
) -> Response:
    """Run ``gen``: an SSE stream, or the whole JSON body at the end (cancelled if the client leaves first)."""
    if gen.request_id is None:  # the engine logs under the id of the access log and X-Request-Id
        gen.request_id = getattr(request.state, "request_id", None)
    if stream:
        events, replica = await runner.stream(gen)  # primed: the first event (and the replica) is known
        headers = sse.HEADERS | _replica_header(replica)
        return StreamingResponse(sse_stream(events, shape), media_type=sse.MEDIA_TYPE, headers=headers)
    done = await runner.complete(gen, disconnect_waiter(request))
    return JSONResponse(shape.body(done), headers=_replica_header(done.replica))


def _replica_header(replica: Optional[str]) -> dict[str, str]:
    return {"X-Lora-Kit-Replica": replica} if replica else {}


async def _close(events: Any) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - closing must never mask the real outcome
            pass


def disconnect_waiter(request: Any) -> Callable[[], Any]:
    """An awaitable factory that returns when the HTTP client disconnects (body already read)."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return

    return wait


# -- tool calls in the two wire shapes -------------------------------------------------------------


def _name_and_arguments(call: dict[str, Any]) -> tuple[str, Any]:
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    return str(fn.get("name", "")), fn.get("arguments", {})


def cloudflare_tool_calls(calls: list[dict]) -> list[dict[str, Any]]:
    """Cloudflare's ``[{name, arguments: object}]``."""
    import json

    out = []
    for call in calls:
        name, args = _name_and_arguments(call)
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        out.append({"name": name, "arguments": args})
    return out


def openai_tool_calls(calls: list[dict]) -> list[dict[str, Any]]:
    """OpenAI's ``[{id, type: "function", function: {name, arguments: JSON string}}]``."""
    import json
    import uuid

    out = []
    for i, call in enumerate(calls):
        name, args = _name_and_arguments(call)
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
        out.append({"index": i, "id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
    return out
