"""Multi-adapter inference: one base model, many LoRA adapters, mixed in every batch.

Layout, from the facade down:

- ``engine`` (:class:`Engine`, the facade) and ``config`` (:class:`EngineConfig`: the user
  settings, from which ``serve``/``generate`` derive their flags);
- ``loop`` (the decode loop: scheduler -> runner -> output, one step at a time);
  ``scheduler`` (admission and the running batch's membership); ``runner`` (the prefill and
  decode forwards, grammar-masked sampling, the model lock); ``output`` (incremental
  detokenization, stop strings, tool calls -> :class:`GenerationOutput` events);
  ``sequence`` (one request in flight);
- ``slots`` (stacked adapter weights, LRU, pins), ``adapters`` (read/validate PEFT dirs),
  ``lora_layer`` (the batched LoRA forward), ``batch``/``kv_cache`` (the running KV cache),
  ``sampling`` (per-request sampling), ``constraints`` (xgrammar JSON/tool grammars),
  ``threads`` (one OpenMP pool), ``types`` (requests, outputs, errors);
- ``backends`` (chosen by platform: the CPU BGMV kernel ``backends/bgmv.py`` +
  ``backends/csrc/bgmv.cpp`` and oneDNN-packed weights ``backends/packed_linear.py``, or torch).

Names are imported on first use, so that ``lora_kit.engine.config`` (which the CLI reads at
start-up) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_kit.engine.adapters import mapping_resolver, registry_resolver
    from lora_kit.engine.config import EngineConfig
    from lora_kit.engine.engine import Engine
    from lora_kit.engine.types import (
        AdapterError,
        AdapterWeight,
        EngineError,
        GenerationOutput,
        GenerationRequest,
        InvalidRequest,
        Overloaded,
        SamplingParams,
        UnknownAdapter,
    )

_HOMES = {
    "Engine": "engine",
    "EngineConfig": "config",
    "mapping_resolver": "adapters",
    "registry_resolver": "adapters",
    **dict.fromkeys(
        [
            "AdapterError",
            "AdapterWeight",
            "EngineError",
            "GenerationOutput",
            "GenerationRequest",
            "InvalidRequest",
            "Overloaded",
            "SamplingParams",
            "UnknownAdapter",
        ],
        "types",
    ),
}

__all__ = [
    "AdapterError",
    "AdapterWeight",
    "Engine",
    "EngineConfig",
    "EngineError",
    "GenerationOutput",
    "GenerationRequest",
    "InvalidRequest",
    "Overloaded",
    "SamplingParams",
    "UnknownAdapter",
    "mapping_resolver",
    "registry_resolver",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
