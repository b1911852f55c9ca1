"""What a base model's weights are held in on this machine, and whether they fit, decided before
loading (a 7B base in fp32 is 29 GB: loading it on a 24 GiB machine would end in the OOM killer
minutes later, not in an error that says what to do).

On the CPU, ``weight_dtype="auto"`` holds the base's linear weights in fp32 (exact: results equal
transformers'/PEFT's) where that is fast and fits, and in bf16 where the CPU multiplies bf16
natively or where fp32 would take more than :data:`FP32_SHARE` of the available memory: a 7B base
is then 14.5 GB, read straight from a bf16 checkpoint (no fp32 copy on the way). Every choice must
leave a reserve free for the KV cache, adapters and the runtime (:func:`with_reserve`); one that
does not is refused before loading, naming the flags that make it fit. The sizes come from the
checkpoint's safetensors headers and the memory from :func:`lora_kit.models.available_memory_bytes`
(``$LORA_KIT_MEMORY_LIMIT`` overrides it, e.g. to plan for a smaller machine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lora_kit import models
from lora_kit.engine.types import EngineError

logger = logging.getLogger(__name__)

FP32_SHARE = 0.5  # fp32 weights may take at most this share of the available memory under "auto"
# Any base must leave room for the KV cache, adapters, Python and torch: a tenth of its own size,
# and at least this much. A heuristic: a 7B in bf16 then needs 16 GB available; serving it with 8
# adapters and 8 requests peaked at 15.6 GiB (16.8 GB) of RSS, the checkpoint's mapped pages
# (reclaimable page cache, counted in MemAvailable) included (BENCHMARKS.md, issue 23).
RESERVE_SHARE = 0.10
RESERVE_MIN = 1 << 30
# Bytes per parameter held: 4-bit weights with their block constants (the embeddings and norms,
# a few percent of a 7B, stay wider: rounded up here).
# int8: one byte and a 4-byte scale per block of 32 (engine.backends.int8_linear).
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.13, "nf4": 0.6, "fp4": 0.6}


class DoesNotFit(EngineError):
    """The base, as asked, would not fit in this machine's memory; the message names the fix."""


@dataclass(frozen=True)
class BaseFit:
    """How the base will be held: ``weight_dtype`` (float32, bfloat16, or nf4/fp4 when quantized)
    and the facts behind it (None where unknown: a hub id, or no /proc)."""

    weight_dtype: str
    numel: int | None
    available: int | None

    @property
    def needed(self) -> int | None:
        return None if self.numel is None else int(self.numel * BYTES_PER_PARAM[self.weight_dtype])


def _gb(n: float) -> str:
    """Bytes for a reader: ``14.5 GB``, ``380 MB``, ``12 kB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if unit == "GB" else f"{n / size:.0f} {unit}"
    return f"{n / 1e3:.0f} kB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**8 else f"{n / 1e6:.1f}M"


def cpu_weight_dtype(weight_dtype: str, numel: int | None, available: int | None) -> str:
    """The dtype ``weight_dtype`` (auto, float32, bfloat16) means for a base of ``numel`` parameters
    on this CPU with ``available`` bytes free."""
    from lora_kit.engine.backends.packed_linear import native_bf16

    if weight_dtype != "auto":
        return weight_dtype
    if native_bf16():
        return "bfloat16"
    if numel is None or available is None or numel * 4 <= FP32_SHARE * available:
        return "float32"
    return "bfloat16"


def base_fit(spec: str, quantization: str, weight_dtype: str = "auto") -> BaseFit:
    """How a CPU engine holds the base ``spec`` (see the module), checked to fit: DoesNotFit otherwise."""
    numel, available = models.checkpoint_numel(spec), models.available_memory_bytes()
    chosen = quantization if quantization != "none" else cpu_weight_dtype(weight_dtype, numel, available)
    fit = BaseFit(chosen, numel, available)
    check_fits(fit, spec)
    if chosen == "bfloat16" and weight_dtype == "auto" and numel is not None and available is not None:
        logger.info(
            "holding the base's weights in bf16 (%s): fp32 (%s) would take more than %d%% of the %s available"
            " (--weight-dtype int8 reads about half of bf16's bytes per token: faster on a CPU)",
            _gb(numel * 2),
            _gb(numel * 4),
            int(FP32_SHARE * 100),
            _gb(available),
        )
    return fit


def half_precision_linears(spec: str, weight_dtype: str) -> Any:
    """The dtype to load ``spec``'s linear weights in when they will be held in bf16 or int8: the
    checkpoint's own 16-bit dtype (read as stored, the rest widened exactly to fp32, never an fp32
    copy of the weights), or None (an fp32 checkpoint is mapped from its file as it is; packing
    narrows it layer by layer)."""
    import torch

    stored = models.checkpoint_float_dtype(spec)
    if weight_dtype not in ("bfloat16", "int8") or stored not in ("bfloat16", "float16"):
        return None
    return getattr(torch, stored)


def with_reserve(needed: float) -> float:
    """The memory a base of ``needed`` bytes needs free: itself and its reserve."""
    return needed + max(RESERVE_MIN, RESERVE_SHARE * needed)


def check_fits(fit: BaseFit, spec: str) -> None:
    """DoesNotFit when ``fit`` and its reserve (:func:`with_reserve`) exceed the available memory."""
    needed = fit.needed
    if needed is None or fit.available is None or with_reserve(needed) <= fit.available:
        return
    fixes = []
    for dtype, flag in (
        ("bfloat16", "--weight-dtype bfloat16"),
        ("int8", "--weight-dtype int8"),
        ("nf4", "--quantization nf4"),
    ):
        size = fit.numel * BYTES_PER_PARAM[dtype]  # type: ignore[operator]
        if BYTES_PER_PARAM[dtype] < BYTES_PER_PARAM[fit.weight_dtype] and with_reserve(size) <= fit.available:
            slower = " (4-bit: slower per token on a CPU)" if dtype == "nf4" else ""
            fixes.append(f"{flag} ({_gb(size)}){slower}")
    fix = "; it fits with " + " or ".join(fixes) if fixes else "; no precision lora-kit offers fits it here"
    raise DoesNotFit(
        f"the base model {spec!r} has {_count(fit.numel)} parameters: {_gb(needed)} in {fit.weight_dtype}, "
        f"and with room for the KV cache and runtime ({_gb(with_reserve(needed))}) more than the "
        f"{_gb(fit.available)} of memory available{fix} (${models.MEMORY_ENV} overrides the available memory)"
    )
