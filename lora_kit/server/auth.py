"""Bearer-token auth for the inference and management routes (constant-time comparison), and the
switch that keeps the management routes closed on a server without a token."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable
from typing import Optional
from urllib.parse import urlsplit

from fastapi import Request

from lora_kit.server.errors import AUTH, ApiError, cross_site, management_off


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


def require_management(
    expected: Optional[str], enabled: bool, allowed_hosts: Iterable[str] = ()
) -> Callable[[Request], None]:
    """A FastAPI dependency for the management routes: with a token, the token (as
    :func:`require_token`); without one, 3051/403 unless the operator ``enabled`` management, and
    then 3052/403 for a request a web page could have sent (:func:`check_same_site`)."""
    check_token = require_token(expected)
    hosts = frozenset(h.lower() for h in allowed_hosts) | LOOPBACK_NAMES

    def check(request: Request) -> None:
        if expected is None:
            if not enabled:
                raise management_off()
            check_same_site(request, hosts)
        check_token(request)

    return check


LOOPBACK_NAMES = frozenset({"localhost"})


def check_same_site(request: Request, hosts: frozenset[str]) -> None:
    """Refuse what a browser may send on a page's behalf to a server without a token.

    A bearer token is a header no page can add cross-site without a CORS preflight (which this
    server never grants); without one, a page the operator opens could post forms to a
    management route, and a DNS-rebinding page could even read the answers. So the ``Host`` must
    be an IP address, ``localhost`` or a name given with ``--allowed-host`` (a rebinding page
    sends its own name), and an ``Origin``, when a browser sends one, must be this same host."""
    host = request.headers.get("host", "").strip().lower()
    if not _host_allowed(_host_name(host), hosts):
        raise cross_site(f"the Host header names {_host_name(host)!r}, which is not this server's")
    origin = request.headers.get("origin")
    if origin is not None:
        parsed = urlsplit(origin.strip().lower())
        if origin.strip().lower() == "null" or parsed.netloc != host or parsed.scheme not in ("http", "https"):
            raise cross_site("the request comes from another site's page (its Origin is not this server)")


def _host_name(host: str) -> str:
    """``host`` without its port: ``[::1]:80`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _host_allowed(name: str, hosts: frozenset[str]) -> bool:
    if name in hosts:
        return True
    try:
        ipaddress.ip_address(name)  # an address is never a rebinding page's own name
    except ValueError:
        return False
    return True
