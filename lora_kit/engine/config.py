"""The engine's user settings, and the CLI flags derived from them.

:class:`EngineConfig` is the one place an engine setting is declared: its type, default and
help (the docstring under the field). ``lora-kit serve`` and ``lora-kit generate`` derive
their flags from it with :meth:`EngineConfig.add_cli_args` and build it back with
:meth:`EngineConfig.from_cli_args` (:mod:`lora_kit.config_cli`), as vLLM derives its CLI from
``EngineArgs``: a new setting is a new field here, and every command that serves the engine gets
its flag.

Only user settings belong here. What a caller injects (a loaded model, a tokenizer, an
adapter resolver) is a keyword argument of :class:`~lora_kit.engine.Engine`; how the kernels
run is the backend's choice (:mod:`lora_kit.engine.backends`).

Importing this module is cheap (no torch): the CLI builds its parsers from it at start-up.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Literal

from lora_kit.adapters.format import MAX_RANK
from lora_kit.config_cli import add_dataclass_args, dataclass_from_args, field_types, literal_choices
from lora_kit.models import DEFAULT_MODEL, Quantization

AdapterDtype = Literal["float32", "bfloat16", "float16"]
WeightDtype = Literal["auto", "float32", "bfloat16", "int8"]
KvDtype = Literal["auto", "float32", "bfloat16", "float16"]


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

    prefix_cache_mib: int = 1024
    """MiB of prompt-prefix KV kept to be reused by later prompts that start the same way under the same adapter (a shared system prompt, earlier chat turns); least recently used blocks go first; at most a quarter of the memory available once the model is loaded; 0 turns prefix caching off"""

    weight_dtype: WeightDtype = "auto"
    """dtype the base model's dense weights are held in on the CPU: bfloat16 halves the bytes a decode step reads (weights, and each product's input and output, rounded to bf16; norms, attention, residuals and LoRA stay fp32); float32 is exact (results equal transformers'/PEFT's); auto: bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX) or where float32 weights would take more than half the free memory (a 7B base on a 24 GiB machine; read from a bf16 checkpoint as bf16, never copied to float32), else float32. int8: weight-only int8 in blocks of 32 inputs with a scale each (llama.cpp's Q8_0 blocks; activations stay fp32), half of bf16's bytes and the fastest on a CPU, never chosen by auto. A base that does not fit at all is refused before loading, naming the flag that fits it"""

    kv_dtype: KvDtype = "auto"
    """dtype the KV cache holds keys and values in: bfloat16 or float16 halve its memory (and what attention reads per step at long contexts), rounding each cached key and value; auto: bfloat16 where the base's weights are held in bf16 on the CPU (a model at bf16's precision already), else the model's compute dtype (exact)"""

    def __post_init__(self) -> None:
        # A torch dtype or "torch.bfloat16" names the same choice; this module does not import torch.
        if self.adapter_dtype is not None:
            self.adapter_dtype = str(self.adapter_dtype).removeprefix("torch.")  # type: ignore[assignment]
        self.preload = tuple(self.preload)
        for name in ("quantization", "adapter_dtype", "weight_dtype", "kv_dtype"):
            allowed = literal_choices(field_types(type(self))[name])
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
