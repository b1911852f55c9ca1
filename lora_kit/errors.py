"""The base of every error whose message tells the user what to fix.

The CLI prints a ``LoraKitError`` as one line (exit status 2); anything else is a bug and
keeps its traceback. Each package subclasses it for its own failures (``RecipeError``,
``RegistryError``, ``EngineError``, ...), so this module imports nothing of lora-kit.
:func:`hide_paths` is the one way a message loses the server's paths before a client sees it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

# An absolute POSIX path inside a string: a "/" that starts a token (not "a/b", not "http://").
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"()\[\]{},;]+")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s'\"()\[\]{},;]*")
# A file: URL (file:///srv/x, file:/srv/x): cut like a path, not left whole for "://" to shield it.
_FILE_URL = re.compile(r"(?<![\w.:/~-])file:[^\s'\"()\[\]{},;]*", re.IGNORECASE)


class LoraKitError(Exception):
    """A failure the user can fix; the message says what to do."""


def is_user_error(err: BaseException) -> bool:
    """True for lora-kit's own error types, whose messages say what to do."""
    return isinstance(err, LoraKitError)


def not_utf8(err: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, for an error message: ``byte 0xe9 at offset 46``."""
    bad = err.object[err.start : err.start + 1]
    return f"byte 0x{bad.hex()} at offset {err.start}" if isinstance(bad, bytes) and bad else str(err.reason)


def hide_paths(value: Any, known: Iterable[str | os.PathLike[str]] = ()) -> Any:
    """``value`` (a message, or JSON-like data) fit for a client: every absolute path cut to its last
    component (``/srv/reg/blobs/ab/abcd`` -> ``abcd``, ``file:///srv/x`` -> ``x``). The ``known`` directories are cut first, in
    their plain and resolved forms, so one holding spaces or quotes goes too (a file under one keeps
    its name: ``/srv/up/1/adapter_config.json`` -> ``adapter_config.json``)."""
    if isinstance(value, dict):
        return {str(k): hide_paths(v, known) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [hide_paths(v, known) for v in value]
    if not isinstance(value, str):
        return value
    dirs = [os.fspath(p) for p in known]
    forms = {d.rstrip("/") for d in dirs} | {os.path.realpath(d) for d in dirs}
    for form in sorted((f for f in forms if len(f) > 1), key=len, reverse=True):
        value = value.replace(form + "/", "").replace(form, os.path.basename(form))
    value = _FILE_URL.sub(_last_part, value)
    return _WINDOWS_PATH.sub(_last_part, _ABS_PATH.sub(_last_part, value))


def _last_part(match: re.Match[str]) -> str:
    text = match.group(0)
    if text[:5].lower() == "file:":
        text = unquote(text[5:])
    parts = [p for p in re.split(r"[/\\]", text) if p]
    return parts[-1] if parts else ""
