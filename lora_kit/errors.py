"""Which exceptions are the user's to fix (printed as one line) rather than bugs (tracebacks)."""

from __future__ import annotations


def is_user_error(err: BaseException) -> bool:
    """True for lora-kit's own error types, whose messages say what to do."""
    from lora_kit.chat import ChatError
    from lora_kit.engine.types import EngineError
    from lora_kit.models import ModelError
    from lora_kit.recipe import RecipeError
    from lora_kit.registry import RegistryError

    return isinstance(err, (ChatError, EngineError, ModelError, RecipeError, RegistryError))
