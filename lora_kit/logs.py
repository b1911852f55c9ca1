"""Logging for the ``lora-kit`` command (the library itself only creates loggers).

Library modules log to loggers under ``lora_kit`` and install nothing at import time; an
application that embeds lora-kit configures logging as it likes. The CLI calls
:func:`configure` once: plain messages on stderr, and one third-party notice dropped.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_configured = False


class _OptionalKernelNotice(logging.Filter):
    """Drops one bitsandbytes notice. On an AVX512-bf16 CPU, importing bitsandbytes tries to
    fetch an optional fused 4-bit kernel from the Hugging Face hub (the `kernels` package)
    and warns when it cannot; it then uses its built-in kernels, which is what lora-kit
    runs on. Shown on every command, the notice read like a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


class StderrHandler(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is when a record is emitted, not as it
    was when the handler was made: in-process callers (tests, embedding apps) swap and close
    ``sys.stderr``, and a handler bound to a closed stream fails on every later record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


def configure(level: str = "info") -> None:
    """Send ``lora_kit.*`` records at ``level`` and above to stderr as plain lines (idempotent)."""
    global _configured
    root = logging.getLogger("lora_kit")
    root.setLevel(level.upper())
    if _configured:
        return
    _configured = True
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.propagate = False
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())
