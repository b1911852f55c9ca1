"""The FastAPI application: routes, error handling, the access log and request metrics."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, MutableSet
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_kit.server import cloudflare, errors, openai, registry_api, runtime_adapters, ui
from lora_kit.server import openapi as openapi_doc
from lora_kit.server.config import ServerConfig
from lora_kit.server.errors import ApiError, error_response
from lora_kit.server.finetunes import FinetuneStore
from lora_kit.server.generation import Runner
from lora_kit.server.metrics import CONTENT_TYPE, Metrics
from lora_kit.server.runtime_adapters import RuntimeAdapters
from lora_kit.server.serving import ServingEngine
from lora_kit.server.state import ServerState

access_log = logging.getLogger("lora_kit.access")
error_log = logging.getLogger("lora_kit.server")


def route_label(path: str) -> str:
    """A low-cardinality name for a path (no account ids or model names) for logs and metrics."""
    if path.startswith("/client/v4/accounts/"):
        if "/ai/run/" in path:
            return "cloudflare.run"
        if "/finetune-assets" in path:
            return "cloudflare.finetune_assets"
        if "/ai/finetunes" in path:
            return "cloudflare.finetunes"
        return "cloudflare.other"
    return {
        "/v1/chat/completions": "openai.chat_completions",
        "/v1/completions": "openai.completions",
        "/v1/models": "openai.models",
        "/healthz": "healthz",
        "/metrics": "metrics",
        "/openapi.json": "openapi",
    }.get(path, "other")


INFERENCE_ROUTES = {"cloudflare.run", "openai.chat_completions", "openai.completions"}


class AccessLog:
    """ASGI middleware: a request id, one JSON log line per request, and request metrics.

    It is pure ASGI (not ``BaseHTTPMiddleware``) so streamed responses are not buffered and the
    logged duration covers the whole stream.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status: dict[str, Any] = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:  # noqa: BLE001 - answered here, inside the access log, so it carries the id
            error_log.exception(
                "internal error on %s %s (request %s)", scope.get("method"), scope.get("path"), request_id
            )
            if status.get("started"):
                return  # a response is under way (a stream): its client sees it end early
            err = errors.with_request_id(ApiError(errors.INTERNAL, "Internal server error"), request_id)
            state["error_code"] = err.code
            await error_response(err, scope.get("path", ""))(scope, receive, send_wrapper)
        finally:
            seconds = time.monotonic() - started
            route = route_label(scope.get("path", ""))
            adapter = state.get("adapter")
            if route in INFERENCE_ROUTES:
                self.metrics.record_request(route, adapter, status["code"], seconds)
            if status["code"] >= 400:
                self.metrics.record_error(route, int(state.get("error_code") or status["code"]))
            client = scope.get("client") or ("", 0)
            access_log.info(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "request_id": request_id,
                        "client": client[0],
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "route": route,
                        "status": status["code"],
                        "error_code": state.get("error_code"),
                        "adapter": adapter,
                        "duration_ms": round(seconds * 1000, 1),
                    }
                )
            )


class ShutdownGate:
    """ASGI middleware: once the server is shutting down (:func:`begin_shutdown`), a new inference
    request is refused with 3050/503 in its API's error body; requests already running go on."""

    def __init__(self, app: Any, closing: threading.Event) -> None:
        self.app = app
        self.closing = closing

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and self.closing.is_set() and route_label(path) in INFERENCE_ROUTES:
            state = scope.setdefault("state", {})
            err = errors.with_request_id(errors.shutting_down(), state.get("request_id"))
            state["error_code"] = err.code
            await error_response(err, path)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def begin_shutdown(app: FastAPI) -> None:
    """The server is going away (SIGTERM): refuse new inference requests with 3050/503."""
    app.state.shutting_down.set()


def create_app(
    engine: ServingEngine,
    registry: Any,
    config: Optional[ServerConfig] = None,
    *,
    unloaded: Optional[MutableSet[str]] = None,
    peer_metrics: Optional[Callable[[], Iterable[dict[str, Any]]]] = None,
) -> FastAPI:
    """The HTTP app over a started ``engine`` and a ``registry``, set up by ``config`` (default: ServerConfig()).

    With ``config.api_token`` set, every inference and management route needs
    ``Authorization: Bearer <api_token>``; ``/healthz`` and ``/metrics`` stay open. Without one,
    the management routes (fine-tune creation and uploads, runtime load/unload) answer 3051/403
    unless ``config.enable_management``. ``config.adapter_roots``: where a runtime load's
    ``lora_path`` may lie. ``config.serve_ui`` serves the playground page at ``/`` (static, open:
    every call it makes carries the token).

    Where several processes serve one API (engine replicas on Ray Serve), ``unloaded`` is the
    runtime-unloaded names they share and ``peer_metrics`` the other processes' metric snapshots,
    summed into ``/metrics``.
    """
    config = config or ServerConfig()
    metrics = Metrics(stats=engine.stats, peers=peer_metrics)
    state = ServerState(
        engine=engine,
        registry=registry,
        runner=Runner(engine, metrics),
        metrics=metrics,
        finetunes=FinetuneStore(registry, config.uploads_dir),
        api_token=config.api_token,
        max_body_bytes=config.max_body_bytes,
        max_upload_bytes=config.max_upload_bytes,
        max_tokens_cap=config.max_tokens_cap,
        runtime=RuntimeAdapters(registry, engine, config.adapter_roots, unloaded),
        management=config.enable_management,
        allowed_hosts=tuple(config.allowed_hosts),
    )
    # The schema is served open, as /healthz is: it describes the public, documented API (no
    # adapter names, paths or settings), and clients and tools fetch it before they hold a token.
    app = FastAPI(
        title="lora-kit",
        description="Cloudflare Workers AI-compatible and OpenAI-compatible routes over a multi-LoRA engine.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.lora_kit = state
    app.state.shutting_down = threading.Event()

    def _fail(request: Request, err: ApiError) -> JSONResponse:
        request.state.error_code = err.code
        return error_response(errors.with_request_id(err, getattr(request.state, "request_id", None)), request.url.path)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError) -> JSONResponse:
        return _fail(request, err)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, err: RequestValidationError) -> JSONResponse:
        return _fail(request, errors.bad_input(str(err)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            api = ApiError(errors.NO_ROUTE, f"No route for {request.method} {request.url.path}")
        elif err.status_code == 405:
            api = ApiError(errors.METHOD_NOT_ALLOWED, f"Method {request.method} not allowed for {request.url.path}")
        else:
            api = ApiError((err.status_code, err.status_code), str(err.detail))
        return _fail(request, api)

    # An unexpected exception is answered by AccessLog (3001/500 naming the request id, which its
    # X-Request-Id carries too): Starlette would answer it outside every middleware, without the id.

    @app.get("/healthz")
    async def healthz() -> Any:
        stats = engine.stats()
        return {"status": "ok", "model": state.served_model, **_jsonable(stats)}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(cloudflare.router(state))
    app.include_router(openai.router(state))
    app.include_router(runtime_adapters.router(state))
    app.include_router(registry_api.router(state))
    if config.serve_ui:
        app.include_router(ui.router())
    app.openapi = lambda: openapi_doc.build(app, secured=state.api_token is not None)  # type: ignore[method-assign]
    app.add_middleware(ShutdownGate, closing=app.state.shutting_down)
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: it logs what the gate refuses too
    return app


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in stats.items():
        out[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
    return out
