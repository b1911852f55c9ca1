"""The playground: a static page served at ``/`` (compare adapters, browse the registry, watch the server).

The page and its assets hold no data, so they are served without auth; every call the page makes
goes through the API with the bearer token the user typed in (kept in memory by the page only).
The files ship in the package (``lora_kit/server/static``): no CDN, no build step.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from lora_kit.server import errors
from lora_kit.server.errors import ApiError

STATIC_DIR = "static"  # inside the lora_kit.server package (package data, see pyproject.toml)
# The only files served, with their media types: a fixed list, so no request path reaches the disk.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# The page loads nothing from elsewhere; this keeps it so even if a reply were to carry markup.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def static_bytes(name: str) -> bytes:
    """The content of one shipped static file (``index.html`` or a name in :data:`ASSETS`)."""
    return resources.files("lora_kit.server").joinpath(STATIC_DIR, name).read_bytes()


def router() -> APIRouter:
    """``GET /`` (the page) and ``GET /ui/{name}`` (its script and style sheet); not in the OpenAPI document."""
    ui = APIRouter(include_in_schema=False)

    @ui.get("/")
    async def page() -> Response:
        return Response(static_bytes("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @ui.get("/ui/{name}")
    async def asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise ApiError(errors.NO_ROUTE, f"No route for GET /ui/{name}")
        return Response(static_bytes(name), media_type=media_type, headers=SECURITY_HEADERS)

    return ui
