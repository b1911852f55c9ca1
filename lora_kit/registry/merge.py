"""Merge a registered adapter into its base: one Hugging Face model directory, no LoRA at run time.

The output holds safetensors weights, config.json, generation_config.json, the base's tokenizer
and chat template, and ``lineage.json`` (the registry's lineage builder, plus the merge's facts).
``transformers`` loads it and ``lora-kit serve --model OUT`` serves it.

The base is never loaded 4-bit: it is loaded in the output dtype, so an adapter trained on an NF4
(QLoRA) base is merged into the dequantized weights (adding a delta to 4-bit weights would round
most of it away). PEFT adds each delta to its weight once (on the CPU it computes the delta in float32).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_kit.adapters.format import CONFIG_FILE, WEIGHTS_FILE, parse_config
from lora_kit.registry import lineage as lineage_mod
from lora_kit.registry.store import AdapterVersion, Registry, RegistryError, local_base_dir

logger = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")
LINEAGE_FILE = "lineage.json"


class MergeError(RegistryError):
    """An adapter cannot be merged into its base; the message says why and what to do."""


@dataclass
class MergeResult:
    path: Path
    dtype: str
    notes: list[str] = field(default_factory=list)  # lines to show the user


def trained_quantization(av: AdapterVersion) -> str | None:
    """The 4-bit quantization the adapter's base was trained in (``nf4``/``fp4``), from its lineage."""
    recipe = av.lineage.get("recipe") if isinstance(av.lineage, dict) else None
    model = recipe.get("model") if isinstance(recipe, dict) else None
    quant = model.get("quantization") if isinstance(model, dict) else None
    return quant if quant in ("nf4", "fp4") else None


def _default_dtype(base_spec: str) -> str:
    """The dtype the base is stored in (its config's ``torch_dtype``/``dtype``), else float32."""
    base_dir = local_base_dir(base_spec)
    if base_dir is not None:
        try:
            config = json.loads((base_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        stored = (config.get("torch_dtype") or config.get("dtype")) if isinstance(config, dict) else None
        if stored in DTYPES:
            return stored
    return "float32"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"merge output '{out}' exists and is not an empty directory; choose a new path")


def merge_adapter(
    registry: Registry,
    ref: str,
    out: Path | str,
    dtype: str | None = None,
    log: Callable[[str], None] | None = None,
) -> MergeResult:
    """Merge the adapter ``ref`` into its base and save the result as the new directory ``out``.

    ``dtype`` (bfloat16, float16, float32) is the saved weights' dtype; None: the base's own.
    The merge is written into a sibling temp directory and renamed, so a failure leaves nothing.
    """
    log = log or logger.info
    out = Path(out)
    _check_out(out)
    av = registry.resolve(ref)
    if not av.base_model:
        raise MergeError(f"{av.ref} records no base model; re-register it with `lora-kit adapters add DIR --base SPEC`")
    dtype = dtype or _default_dtype(av.base_model)
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    src = registry.adapter_path(av.id)
    config = parse_config(src / CONFIG_FILE)
    notes = []
    quant = trained_quantization(av)
    if quant:
        notes.append(
            f"{av.ref} was trained on a {quant.upper()} base: merging into the dequantized (full-precision) base "
            f"weights, since merging into {quant.upper()} weights would lose the adapter's precision"
        )
        log(notes[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _merge_into(av, src, tmp, dtype, log)
        _write_lineage(av, src, config, tmp, dtype, quant)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes.append(f"serve it with: lora-kit serve --model {out}")
    return MergeResult(path=out, dtype=dtype, notes=notes)


def _merge_into(av: AdapterVersion, src: Path, tmp: Path, dtype: str, log: Callable[[str], None]) -> None:
    """Load the base (full precision), apply and merge the adapter with PEFT, save it into ``tmp``."""
    import torch
    from peft import PeftModel

    from lora_kit import models

    torch_dtype = getattr(torch, dtype)
    log(f"loading the base '{av.base_model}' in {dtype}...")
    base = models.load_model(av.base_model, quantization="none", compute_dtype=torch_dtype)
    tokenizer = models.load_tokenizer(av.base_model)
    peft_model = PeftModel.from_pretrained(base, str(src), is_trainable=False)
    # safe_merge: PEFT checks the merged weights for NaN/inf before replacing the base's.
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged.config.name_or_path = str(av.base_model)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    log(f"merged {av.ref} into '{av.base_model}' ({dtype})")


def _write_lineage(
    av: AdapterVersion, src: Path, config: dict[str, Any], tmp: Path, dtype: str, quant: str | None
) -> None:
    """``lineage.json``: the registry's lineage builder on the source adapter, plus the merge's facts."""
    facts = {
        "merge": {
            "adapter_ref": av.ref,
            "adapter_id": av.id,
            "adapter_sha256": av.files[WEIGHTS_FILE]["sha256"],
            "dtype": dtype,
            "dequantized_base": quant,
        },
        "adapter_lineage": av.lineage,
    }
    record = lineage_mod.build(
        src,
        config,
        av.base_model,
        local_base_dir(av.base_model),
        parent={"ref": av.ref, "id": av.id},
        facts=facts,
    )
    (tmp / LINEAGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
