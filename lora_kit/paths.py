"""Where lora-kit keeps its state: the registry, converted models, runs."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The lora-kit home: ``$LORA_KIT_HOME`` or a per-user cache directory."""
    env = os.environ.get("LORA_KIT_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "lora-kit"


def models_dir() -> Path:
    return home() / "models"


def registry_dir() -> Path:
    return home() / "registry"


def runs_dir() -> Path:
    return home() / "runs"


def kernels_dir() -> Path:
    return home() / "kernels"
