"""Bearer-token auth for the inference and management routes (constant-time comparison), and the
switch that keeps the management routes closed on a server without a token."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Optional

from fastapi import Request

from lora_kit.server.errors import AUTH, ApiError, management_off


def bearer_token(request: Request) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: Optional[str], expected: str) -> bool:
    """Compare in constant time, so the answer time does not leak how much of a guess was right."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def require_token(expected: Optional[str]) -> Callable[[Request], None]:
    """A FastAPI dependency: 10000/401 unless the request carries ``expected``; a no-op when it is None."""

    def check(request: Request) -> None:
        if expected is None:
            return
        if not token_matches(bearer_token(request), expected):
            raise ApiError(AUTH, "Authentication error", openai_code="invalid_api_key")

    return check


def require_management(expected: Optional[str], enabled: bool) -> Callable[[Request], None]:
    """A FastAPI dependency for the management routes: with a token, the token (as
    :func:`require_token`); without one, 3051/403 unless the operator ``enabled`` management."""
    check_token = require_token(expected)

    def check(request: Request) -> None:
        if expected is None and not enabled:
            raise management_off()
        check_token(request)

    return check
