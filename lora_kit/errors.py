"""Which exceptions are the user's to fix (printed as one line) rather than bugs (tracebacks)."""

from __future__ import annotations


def is_user_error(err: BaseException) -> bool:
    """True for lora-kit's own error types, whose messages say what to do."""
    from lora_kit.chat import ChatError
    from lora_kit.models import ModelError

    user_errors: tuple[type[BaseException], ...] = (ChatError, ModelError)
    try:
        from lora_kit.registry import RegistryError

        user_errors += (RegistryError,)
    except ImportError:
        pass
    try:
        from lora_kit.recipe import RecipeError

        user_errors += (RecipeError,)
    except ImportError:
        pass
    return isinstance(err, user_errors)
