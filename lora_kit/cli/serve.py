"""The ``lora-kit serve`` command (registered by :func:`add_parser`).

Every flag is derived from a settings dataclass: the engine's (``--model``, ``--quantization``,
``--slots``, ...) from :class:`~lora_kit.engine.config.EngineConfig`, Ray's (``--replicas``, ...)
from :class:`~lora_kit.server.ray_config.ReplicaConfig`, the server's (``--host``, ``--port``,
``--api-token``, ...) from :class:`~lora_kit.server.config.ServerConfig`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging

from lora_kit.cli.common import CliError
from lora_kit.engine.config import EngineConfig
from lora_kit.server.config import ServerConfig
from lora_kit.server.ray_config import ReplicaConfig

log = logging.getLogger(__name__)
TOKEN_FLAG_WARNING = (
    "--api-token puts the token on the command line, where any user of this machine can read it "
    "(ps, /proc); set LORA_KIT_API_TOKEN in the server's environment instead"
)


def cmd_serve(args: argparse.Namespace) -> int:
    from lora_kit.server.main import serve

    if getattr(args, "api_token", None):
        log.warning(TOKEN_FLAG_WARNING)
    config = ServerConfig.from_cli_args(args)  # the token: --api-token, else $LORA_KIT_API_TOKEN
    check_exposure(config.host, config.api_token, config.allow_unauthenticated)
    return serve(config, EngineConfig.from_cli_args(args), ReplicaConfig.from_cli_args(args))


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
    ServerConfig.add_cli_args(p)
    p.set_defaults(func=cmd_serve)
    return p
