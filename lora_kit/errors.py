"""The base of every error whose message tells the user what to fix.

The CLI prints a ``LoraKitError`` as one line (exit status 2); anything else is a bug and
keeps its traceback. Each package subclasses it for its own failures (``RecipeError``,
``RegistryError``, ``EngineError``, ...), so this module imports nothing.
"""

from __future__ import annotations


class LoraKitError(Exception):
    """A failure the user can fix; the message says what to do."""


def is_user_error(err: BaseException) -> bool:
    """True for lora-kit's own error types, whose messages say what to do."""
    return isinstance(err, LoraKitError)
