"""The engine's user settings, and the CLI flags derived from them.

:class:`EngineConfig` is the one place an engine setting is declared: its type, default and
help (the docstring under the field). ``lora-kit serve`` and ``lora-kit generate`` derive
their flags from it with :meth:`EngineConfig.add_cli_args` and build it back with
:meth:`EngineConfig.from_cli_args`, as vLLM derives its CLI from ``EngineArgs``: a new setting
is a new field here, and every command that serves the engine gets its flag.

Only user settings belong here. What a caller injects (a loaded model, a tokenizer, an
adapter resolver) is a keyword argument of :class:`~lora_kit.engine.Engine`; how the kernels
run is the backend's choice (:mod:`lora_kit.engine.backends`).

Importing this module is cheap (no torch): the CLI builds its parsers from it at start-up.
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
from dataclasses import dataclass, field
from typing import Any, Literal

from lora_kit.adapters.format import MAX_RANK
from lora_kit.models import DEFAULT_MODEL, Quantization

AdapterDtype = Literal["float32", "bfloat16", "float16"]
WeightDtype = Literal["auto", "float32", "bfloat16"]


@dataclass
class EngineConfig:
    """User settings of an :class:`~lora_kit.engine.Engine` (one docstring per field: the flag's help)."""

    model: str = DEFAULT_MODEL
    """base model: embedded name, local dir or hub id"""

    quantization: Quantization = "none"
    """load the base in 4-bit with bitsandbytes (NF4 or FP4) or in full precision"""

    max_slots: int = field(default=8, metadata={"flag": "--slots"})
    """adapters resident at once"""

    preload: tuple[str, ...] = field(default=(), metadata={"metavar": "REF"})
    """adapters to load at start, pinned in their slots"""

    max_queue: int = 64
    """waiting requests before 429"""

    max_batch: int = 16
    """requests decoded together"""

    max_rank: int = MAX_RANK
    """largest LoRA rank accepted; a higher-rank adapter is refused"""

    threads: int | None = None
    """CPU threads of the decode loop (default: the cores torch sees)"""

    adapter_dtype: AdapterDtype | None = None
    """dtype adapters are held in (default: the model's, or bfloat16 when the base's weights are held in bf16; bfloat16 halves the bytes an adapter row reads per step, rounding its weights to bf16)"""

    weight_dtype: WeightDtype = "auto"
    """dtype the base model's dense weights are held in on the CPU: bfloat16 halves the bytes a decode step reads (weights, and each product's input and output, rounded to bf16; norms, attention, residuals and LoRA stay fp32); float32 is exact (results equal transformers'/PEFT's); auto: bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), else float32"""

    def __post_init__(self) -> None:
        # A torch dtype or "torch.bfloat16" names the same choice; this module does not import torch.
        if self.adapter_dtype is not None:
            self.adapter_dtype = str(self.adapter_dtype).removeprefix("torch.")  # type: ignore[assignment]
        self.preload = tuple(self.preload)
        for name in ("quantization", "adapter_dtype", "weight_dtype"):
            allowed = _choices(_field_types(type(self))[name])
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
        """Add a flag per field (or per field named in ``only``) to ``parser``."""
        add_dataclass_args(parser, cls, only)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        """The config from parsed flags; fields without a flag keep their defaults unless in ``overrides``."""
        return dataclass_from_args(cls, args, **overrides)


# -- deriving argparse flags from a dataclass ------------------------------------------------


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of a field: ``metadata["flag"]``, else ``--field-name``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls``: its default, its docstring as help, choices from a ``Literal``.

    Supported types: ``str``, ``int``, ``float``, a ``Literal`` of strings, ``tuple[str, ...]``
    (``nargs="*"``), each optionally ``| None``.
    """
    docs = field_docs(cls)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = docs.get(f.name, "").replace("%", "%%")
        if default not in (None, (), ""):
            help_ += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_, "default": default}
        choices = _choices(hint)
        base = _without_none(hint)
        if choices:
            kwargs["choices"] = list(choices)
        elif typing.get_origin(base) is tuple:
            kwargs.update(nargs="*", default=list(default), metavar=f.metadata.get("metavar", "VALUE"))
        elif base in (int, float, str):
            kwargs.update(type=base, metavar=f.metadata.get("metavar", "N" if base is not str else None))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no CLI flag for type {hint!r}")
        parser.add_argument(flag_of(f), **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of ``cls`` from the fields ``args`` has (by name), then ``overrides``."""
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
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _without_none(hint: Any) -> Any:
    """``X`` for ``X | None``, else ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _choices(hint: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` (optionally ``| None``); empty for any other type."""
    base = _without_none(hint)
    return typing.get_args(base) if typing.get_origin(base) is Literal else ()
