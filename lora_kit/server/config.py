"""The server's user settings, and the ``lora-kit serve`` flags derived from them.

:class:`ServerConfig` is the one place a setting of the HTTP server is declared (its type,
default and help, the docstring under the field), as :class:`~lora_kit.engine.config.EngineConfig`
is for the engine and :class:`~lora_kit.server.ray_config.ReplicaConfig` for Ray. ``lora-kit serve``
derives its flags from it (:mod:`lora_kit.config_cli`); :func:`~lora_kit.server.app.create_app`,
:func:`~lora_kit.server.main.serve` and every Ray Serve replica take it. A field with
``flag=None`` is set by code only (tests, embedders).

Importing this module is cheap (no FastAPI): the CLI builds its parsers from it at start-up.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_kit.config_cli import add_dataclass_args, dataclass_from_args, field_types, literal_choices

TOKEN_ENV = "LORA_KIT_API_TOKEN"
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # JSON bodies: 131072-character prompts with room to spare
DEFAULT_MAX_UPLOAD_BYTES = 300 * 1024 * 1024  # Cloudflare's limit on an adapter file
DEFAULT_MAX_TOKENS_CAP = 4096

LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass
class ServerConfig:
    """Settings of the HTTP server (one docstring per field: the flag's help)."""

    host: str = "127.0.0.1"
    """address to listen on"""

    port: int = field(default=8000, metadata={"metavar": "PORT"})
    """port (default: 8000; 0 picks a free one)"""

    api_token: str | None = field(default=None, metadata={"metavar": "T"})
    """require 'Authorization: Bearer T' on inference and management routes (default: $LORA_KIT_API_TOKEN; unset = no auth, management off, loopback only). Prefer LORA_KIT_API_TOKEN: a flag is visible to every user in `ps`"""

    allow_unauthenticated: bool = False
    """serve on a non-loopback --host without an API token (refused otherwise)"""

    enable_management: bool = False
    """open the management routes (fine-tune creation and uploads, /v1/load_lora_adapter and /v1/unload_lora_adapter) on a server without an API token; with a token they are on and need it"""

    adapter_roots: list[str] = field(default_factory=list, metadata={"flag": "--adapter-root", "metavar": "DIR"})
    """a directory whose adapters /v1/load_lora_adapter may register by lora_path (repeatable; symlinks resolved). Default: none, only registered names can be loaded"""

    allowed_hosts: list[str] = field(default_factory=list, metadata={"flag": "--allowed-host", "metavar": "NAME"})
    """a host name (besides IP addresses and localhost) under which the management routes answer on a server without an API token (repeatable); other Host headers are refused, against DNS rebinding"""

    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    """upper bound applied to max_tokens"""

    graceful_timeout: float = field(default=30.0, metadata={"metavar": "S"})
    """seconds in-flight requests get on SIGTERM (default: 30)"""

    # The flag turns the page off, so its help speaks of --no-ui.
    serve_ui: bool = field(default=True, metadata={"flag": "--no-ui"})
    """do not serve the playground page at / (the API is unchanged; / then answers 404)"""

    log_level: LogLevel = "info"
    """level of the server's and the engine's messages on stderr"""

    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata={"flag": None})
    """largest JSON request body, in bytes (413 beyond)"""

    max_upload_bytes: int = field(default=DEFAULT_MAX_UPLOAD_BYTES, metadata={"flag": None})
    """largest fine-tune asset upload, in bytes"""

    uploads_dir: Path | None = field(default=None, metadata={"flag": None})
    """where fine-tune uploads are staged (default: LORA_KIT_HOME/finetune-uploads)"""

    def __post_init__(self) -> None:
        self.api_token = self.api_token or None  # an empty token is no token
        self.adapter_roots = list(self.adapter_roots)
        self.allowed_hosts = list(self.allowed_hosts)
        allowed = literal_choices(field_types(type(self))["log_level"])
        if self.log_level not in allowed:
            raise ValueError(f"log_level must be one of {', '.join(allowed)}, not {self.log_level!r}")

    @property
    def management(self) -> bool:
        """Whether the management routes are open: with a token (they then need it) or when enabled."""
        return self.api_token is not None or self.enable_management

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """A flag per field that has one (``--host``, ``--port``, ``--api-token``, ...)."""
        add_dataclass_args(parser, cls)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> ServerConfig:
        """The config from parsed flags: the token from ``--api-token``, else from $LORA_KIT_API_TOKEN;
        fields without a flag keep their defaults unless in ``overrides``."""
        config = dataclass_from_args(cls, args, **overrides)
        config.api_token = config.api_token or os.environ.get(TOKEN_ENV) or None
        return config
