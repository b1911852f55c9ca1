"""CLI flags derived from a settings dataclass, and the dataclass built back from parsed flags.

A settings class (:class:`~lora_kit.engine.config.EngineConfig`,
:class:`~lora_kit.server.config.ServerConfig`, :class:`~lora_kit.server.ray_config.ReplicaConfig`)
declares each setting once: its type, default and help (the docstring under the field). The
commands derive their flags from it with :func:`add_dataclass_args` and build it back with
:func:`dataclass_from_args`, as vLLM derives its CLI from ``EngineArgs``.

A field's ``metadata`` may name its ``flag`` (``None``: the field has no flag, it is set by
code only) and its ``metavar``. Importing this module is cheap (standard library only).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal


def flag_of(f: dataclasses.Field) -> str | None:
    """The CLI flag of a field: ``metadata["flag"]`` (``None``: no flag), else ``--field-name``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls`` (or per field named in ``only``): its default, its docstring as
    help, choices from a ``Literal``.

    Supported types: ``str``, ``int``, ``float``, a ``Literal`` of strings, ``tuple[str, ...]``
    (``nargs="*"``), ``list[str]`` (a repeatable flag, ``action="append"``), each optionally
    ``| None``; and ``bool``: an on switch (``store_true``) when the default is False; when it is
    True, a ``--no-...`` flag named in the metadata turns it off (``store_false``), else the pair
    ``--x/--no-x`` (``BooleanOptionalAction``).
    """
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = flag_of(f)
        if flag is None or (only is not None and f.name not in only):
            continue
        kwargs = _flag_kwargs(cls, f, docs.get(f.name, ""))
        parser.add_argument(flag, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def _flag_kwargs(cls: type, f: dataclasses.Field, doc: str) -> dict[str, Any]:
    """``add_argument``'s keywords for field ``f`` of ``cls`` (see :func:`add_dataclass_args`)."""
    hint = field_types(cls)[f.name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    help_ = doc.replace("%", "%%")
    if default not in (None, (), "", []) and not isinstance(default, bool) and "(default:" not in help_:
        help_ += f" (default: {default})"
    kwargs: dict[str, Any] = {"dest": f.name, "help": help_, "default": default}
    choices = literal_choices(hint)
    base = without_none(hint)
    metavar = f.metadata.get("metavar")
    if choices:
        kwargs["choices"] = list(choices)
    elif base is bool:
        kwargs["action"] = _bool_action(f, default)
    elif typing.get_origin(base) is tuple:
        kwargs.update(nargs="*", default=list(default), metavar=metavar or "VALUE")
    elif typing.get_origin(base) is list:
        kwargs.update(action="append", default=list(default), metavar=metavar or "VALUE")
    elif base in (int, float, str):
        kwargs.update(type=base, metavar=metavar or ("N" if base is not str else None))
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: no CLI flag for type {hint!r}")
    return kwargs


def _bool_action(f: dataclasses.Field, default: bool) -> Any:
    if not default:
        return "store_true"
    if str(f.metadata.get("flag", "")).startswith("--no-"):
        return "store_false"
    return argparse.BooleanOptionalAction


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of ``cls`` from the fields ``args`` has (by name), then ``overrides``; fields
    without a value in ``args`` keep their defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under the fields of ``cls`` (read from its source, as vLLM does;
    Python keeps no attribute docstrings at run time). Empty when the source is unavailable."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of ``cls`` (string annotations evaluated)."""
    return typing.get_type_hints(cls)


def without_none(hint: Any) -> Any:
    """``X`` for ``X | None``, else ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` (optionally ``| None``); empty for any other type."""
    base = without_none(hint)
    return typing.get_args(base) if typing.get_origin(base) is Literal else ()
