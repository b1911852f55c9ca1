"""Multi-adapter inference: one base model, many LoRA adapters, mixed in every batch.

Modules: ``types`` (requests, outputs, errors), ``adapters`` (read/validate PEFT dirs),
``lora_layer`` (batched LoRA forward), ``bgmv`` (its CPU kernel, ``csrc/bgmv.cpp``),
``packed_linear`` (oneDNN-packed base weights), ``slots`` (stacked adapter weights, LRU, pins),
``sampling`` (per-request sampling), ``constraints`` (xgrammar JSON/tool grammars),
``batch``/``kv_cache`` (the running KV cache), ``threads`` (one OpenMP pool), ``scheduler`` (continuous batching), ``engine`` (facade).
"""

from lora_kit.engine.adapters import mapping_resolver, registry_resolver
from lora_kit.engine.engine import Engine
from lora_kit.engine.types import (
    AdapterError,
    EngineError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    SamplingParams,
    UnknownAdapter,
)

__all__ = [
    "AdapterError",
    "Engine",
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
