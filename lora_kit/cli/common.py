"""What every command module shares: the one-line error type and JSON printing."""

from __future__ import annotations

import json
from typing import Any

from lora_kit.errors import LoraKitError


class CliError(LoraKitError):
    """An expected failure of a command's arguments: printed as one line, exit status 2."""


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
