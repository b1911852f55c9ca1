"""The ``lora-kit serve`` command (registered by :func:`add_parser`).

The engine's flags (``--model``, ``--quantization``, ``--slots``, ``--max-batch``, ...) are
derived from :class:`~lora_kit.engine.config.EngineConfig`; the ones written here are the
server's own.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

from lora_kit.cli.common import CliError
from lora_kit.engine.config import EngineConfig
from lora_kit.server.ray_config import ReplicaConfig

log = logging.getLogger(__name__)
TOKEN_FLAG_WARNING = (
    "--api-token puts the token on the command line, where any user of this machine can read it "
    "(ps, /proc); set LORA_KIT_API_TOKEN in the server's environment instead"
)


def cmd_serve(args: argparse.Namespace) -> int:
    from lora_kit.server.main import TOKEN_ENV, serve

    if getattr(args, "api_token", None):
        log.warning(TOKEN_FLAG_WARNING)
    token = getattr(args, "api_token", None) or os.environ.get(TOKEN_ENV)
    check_exposure(getattr(args, "host", "127.0.0.1"), token, getattr(args, "allow_unauthenticated", False))
    return serve(args)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or 0.0.0.0 / :: (every interface)


def check_exposure(host: str, token: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to listen beyond this machine without a token, unless told so by name."""
    if token or is_loopback(host):
        return
    if not allow_unauthenticated:
        raise CliError(
            f"refusing to serve on {host} without an API token: anyone who reaches the port could use it. "
            "Set LORA_KIT_API_TOKEN, or pass --allow-unauthenticated to serve it open"
        )
    log.warning("serving on %s without an API token (--allow-unauthenticated): anyone who reaches it can use it", host)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lora-kit serve`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="serve the base model and registry adapters over Cloudflare Workers AI- and OpenAI-compatible HTTP APIs",
    )
    EngineConfig.add_cli_args(p)
    ReplicaConfig.add_cli_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--api-token",
        default=None,
        metavar="T",
        help="require 'Authorization: Bearer T' on inference and management routes (default: $LORA_KIT_API_TOKEN; "
        "unset = no auth, management off, loopback only). Prefer LORA_KIT_API_TOKEN: a flag is visible to every user in `ps`",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve on a non-loopback --host without an API token (refused otherwise)",
    )
    p.add_argument(
        "--enable-management",
        action="store_true",
        help="open the management routes (fine-tune creation and uploads, /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter) on a server without an API token; with a token they are on and need it",
    )
    p.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        dest="adapter_roots",
        metavar="DIR",
        help="a directory whose adapters /v1/load_lora_adapter may register by lora_path (repeatable; "
        "symlinks resolved). Default: none, only registered names can be loaded",
    )
    p.add_argument(
        "--max-tokens-cap",
        type=int,
        default=4096,
        metavar="N",
        help="upper bound applied to max_tokens (default: 4096)",
    )
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds in-flight requests get on SIGTERM (default: 30)",
    )
    p.add_argument(
        "--no-ui",
        action="store_true",
        help="do not serve the playground page at / (the API is unchanged; / then answers 404)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    return p
