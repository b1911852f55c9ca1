"""API errors and the two error bodies: Cloudflare's envelope and OpenAI's ``{"error": {...}}``.

Codes and statuses follow the error table of Cloudflare's Workers AI docs (5007/400 no such model,
3039/400 fine-tune missing files, 3006/413 request too large, 3040/429 out of capacity) and the
codes its API returns in practice (5006 bad input, 3037 fine-tune not found, 10000 auth, 3001 internal).
Cloudflare documents no code for a server that is going away; lora-kit's 3050/503 says "shutting down"
(SIGTERM: new requests, and those still unfinished when the grace period ends), and its 3051/403 says
"management is off on this server" (uploads and runtime load/unload without a token or ``--enable-management``), and 3052/403 refuses
a management request without a token that a web page could have sent (a foreign ``Origin`` or ``Host``).
Errors always carry a 4xx/5xx status: the official SDK ignores ``success: false`` on a 200.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi.responses import JSONResponse

# (code, HTTP status) pairs.
BAD_INPUT = (5006, 400)
NO_SUCH_MODEL = (5007, 400)
FINETUNE_NOT_FOUND = (3037, 404)
FINETUNE_MISSING_FILES = (3039, 400)
AUTH = (10000, 401)
TOO_LARGE = (3006, 413)
OVERLOADED = (3040, 429)
INTERNAL = (3001, 500)
NO_ROUTE = (7003, 404)
METHOD_NOT_ALLOWED = (7001, 405)
UNSUPPORTED_MEDIA_TYPE = (5006, 415)
SHUTTING_DOWN = (3050, 503)
MANAGEMENT_OFF = (3051, 403)
CROSS_SITE = (3052, 403)

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """An error answered to the client: ``kind`` is one of the (code, status) pairs above."""

    def __init__(
        self,
        kind: tuple[int, int],
        message: str,
        *,
        param: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
        openai_code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.code, self.status = kind
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.openai_code = openai_code


def with_request_id(err: ApiError, request_id: Optional[str]) -> ApiError:
    """``err``, naming ``request_id`` in its message when it is a 5xx (the log holds the details under it)."""
    if err.status < 500 or not request_id or request_id in err.message:
        return err
    kind = (err.code, err.status)
    message = f"{err.message} (request id {request_id})"
    return ApiError(kind, message, param=err.param, headers=err.headers, openai_code=err.openai_code)


def unsupported_media_type(message: str) -> ApiError:
    """5006/415: a management route's JSON body came without ``Content-Type: application/json``."""
    return ApiError(UNSUPPORTED_MEDIA_TYPE, message)


def bad_input(message: str, param: Optional[str] = None) -> ApiError:
    """5006/400: the body does not match the schema; ``message`` names the field and why."""
    return ApiError(BAD_INPUT, message, param=param)


def overloaded(retry_after_s: int = 1) -> ApiError:
    """3040/429 with ``Retry-After`` (the SDKs honour it for delays up to 60 s)."""
    return ApiError(
        OVERLOADED,
        "Capacity temporarily exceeded, please try again.",
        headers={"Retry-After": str(retry_after_s)},
        openai_code="rate_limit_exceeded",
    )


def shutting_down(message: str = "The server is shutting down; retry the request on another instance.") -> ApiError:
    """3050/503: the server got SIGTERM; the request was refused, or cut when the grace period ended."""
    return ApiError(SHUTTING_DOWN, message, openai_code="server_shutting_down")


def management_off() -> ApiError:
    """3051/403: a management route (fine-tune creation and uploads, runtime load/unload) on a server
    that has no API token and was not started with ``--enable-management``."""
    return ApiError(
        MANAGEMENT_OFF,
        "Management routes are off on this server: start it with an API token (LORA_KIT_API_TOKEN) "
        "or with --enable-management to create fine-tunes, upload their files or load/unload adapters",
        openai_code="management_disabled",
    )


def cross_site(why: str) -> ApiError:
    """3052/403: a management route on a server without a token, asked by what may be a web page."""
    return ApiError(
        CROSS_SITE,
        f"Management request refused: {why}. Without an API token, management routes answer only "
        "same-site requests to an IP address, localhost or an --allowed-host name",
        openai_code="cross_site_request",
    )


def envelope(result: Any) -> dict[str, Any]:
    """Cloudflare's success envelope."""
    return {"result": result, "success": True, "errors": [], "messages": []}


def cloudflare_body(err: ApiError) -> dict[str, Any]:
    """Cloudflare's failure envelope: ``result`` null, one ``{code, message}`` in ``errors``."""
    return {"result": None, "success": False, "errors": [{"code": err.code, "message": err.message}], "messages": []}


def openai_body(err: ApiError) -> dict[str, Any]:
    """OpenAI's error body; ``code`` keeps the Cloudflare code when no OpenAI one fits."""
    return {
        "error": {
            "message": err.message,
            "type": _OPENAI_TYPES.get(err.status, "server_error" if err.status >= 500 else "invalid_request_error"),
            "param": err.param,
            "code": err.openai_code or str(err.code),
        }
    }


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(err: ApiError, path: str) -> JSONResponse:
    """The error in the body shape of the API that ``path`` belongs to."""
    body = openai_body(err) if is_openai_path(path) else cloudflare_body(err)
    return JSONResponse(body, status_code=err.status, headers=err.headers)
