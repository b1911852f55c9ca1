"""Write a registered adapter as a GGUF LoRA file that llama.cpp loads (``llama-server --lora x.gguf``).

The file follows llama.cpp's ``convert_lora_to_gguf.py``:

- metadata: ``general.architecture`` (the base's GGUF architecture, ``llama`` for Llama and
  Mistral bases), ``general.type = adapter``, ``adapter.type = lora`` and ``adapter.lora.alpha``
  (float32, stored raw: llama.cpp scales each module by ``alpha / rank``, the rank read from the
  tensor shapes, as PEFT does);
- tensors: ``<base GGUF tensor name>.lora_a`` and ``.lora_b`` (e.g. ``blk.0.attn_q.weight.lora_a``),
  float32. ``lora_a`` keeps PEFT's ``(r, in)`` row-major layout and ``lora_b`` its ``(out, r)``,
  which GGUF records (innermost first) as ``ne = [in, r]`` and ``[r, out]``: llama.cpp requires
  ``lora_a.ne[0]`` to equal the base weight's ``ne[0]`` and ``lora_b.ne[1]`` its ``ne[1]``.
- the rows of ``lora_b`` of ``q_proj`` and ``k_proj`` are permuted as llama.cpp's converter permutes
  the base's q/k weights (Hugging Face's rotary layout -> GGML's interleaved one), so the delta
  ``lora_b @ lora_a`` lines up with the GGUF base weight.

GGUF has one alpha for the whole file. PEFT may scale modules differently (``rank_pattern`` with
``alpha_pattern``, or rsLoRA's ``alpha / sqrt(r)``); the per-module ratio between PEFT's scale and
llama.cpp's ``alpha / rank`` is folded into that module's ``lora_b``, so every delta is exact.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from lora_kit.adapters.format import CONFIG_FILE, WEIGHTS_FILE, config_alpha, module_rank, module_scale
from lora_kit.adapters.validation import AdapterInfo
from lora_kit.registry.store import AdapterVersion, RegistryError, local_base_dir

logger = logging.getLogger(__name__)

# Hugging Face architectures -> the GGUF architecture llama.cpp's converter writes for them.
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
SUFFIX = ".gguf"


class GgufExportError(RegistryError):
    """An adapter cannot be written as a GGUF LoRA file; the message says why and what to do."""


def base_config(av: AdapterVersion) -> dict[str, Any] | None:
    """The base model's config.json when the base is on this machine (None: it is not)."""
    base_dir = local_base_dir(av.base_model)
    if base_dir is None:
        return None
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError, RecursionError):  # unreadable now: as if the base were not here
        return None
    return config if isinstance(config, dict) else None


def base_architecture(config: dict[str, Any] | None) -> str | None:
    """The first entry of ``architectures`` in a base config (e.g. ``MistralForCausalLM``)."""
    archs = (config or {}).get("architectures") or []
    return archs[0] if archs and isinstance(archs[0], str) else None


def gguf_problems(info: AdapterInfo, config: dict[str, Any] | None) -> list[str]:
    """Why this adapter cannot become a GGUF LoRA file for its base ``config`` (empty: it can)."""
    if config is None:
        return ["its base model is not on this machine (llama.cpp's tensor layout is read from its config.json)"]
    arch = base_architecture(config)
    problems = []
    if arch not in GGUF_ARCHITECTURES:
        problems.append(
            f"its base is a {arch or 'model of unknown architecture'}; GGUF export supports "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))} bases"
        )
    flags = info.flags
    for flag, why in (
        ("dora", "it uses DoRA, which llama.cpp does not apply"),
        ("modules_to_save", "it saves whole modules (modules_to_save), which a GGUF LoRA cannot carry"),
        ("bias", "it trains biases, which llama.cpp's LoRA does not apply"),
    ):
        if flags[flag]:
            problems.append(why)
    if flags["lm_head"] and config.get("tie_word_embeddings"):
        problems.append("it adapts lm_head, which this base ties to the embeddings (llama.cpp has no separate output)")
    return problems


def _gguf_name(module: str, n_layers: int) -> str | None:
    """``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight`` (gguf's own name map for llama)."""
    import gguf

    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(module)
    return f"{name}.weight" if name else None


def _rope_permute_rows(b: Any, n_head: int) -> Any:
    """Reorder the rows of ``b`` (out, r) per head from Hugging Face's rotary layout (first half,
    second half) to GGML's interleaved one, as llama.cpp's converter does to q/k weights."""
    out = b.shape[0]
    return b.reshape(n_head, 2, out // n_head // 2, -1).swapaxes(1, 2).reshape(b.shape)


def gguf_tensors(adapter_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """GGUF tensor name -> float32 numpy array for the adapter in ``adapter_dir`` on a base with
    HF ``config``: ``*.lora_a`` (r, in), ``*.lora_b`` (out, r) with the module's scale ratio folded in."""
    import torch
    from safetensors.torch import load_file

    from lora_kit.adapters.format import parse_config, parse_tensor_name

    lora_config = parse_config(adapter_dir / CONFIG_FILE)
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv_head = int(config.get("num_key_value_heads") or n_head)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(adapter_dir / WEIGHTS_FILE).items():
        key = parse_tensor_name(name)
        if key is None or key.kind == "dora":
            raise GgufExportError(f"tensor {name} is not a LoRA A/B weight; a GGUF LoRA file cannot carry it")
        pairs.setdefault(key.module, {})[key.part] = tensor.to(torch.float32)
    out: dict[str, Any] = {}
    for module, parts in sorted(pairs.items()):
        target = _gguf_name(module, n_layers)
        if target is None:
            raise GgufExportError(f"module {module} has no llama.cpp tensor name; GGUF export cannot place it")
        a, b = parts["A"], parts["B"]
        rank = module_rank(lora_config, module)
        b = b * (module_scale(lora_config, module) / (config_alpha(lora_config) / rank))
        if module.endswith("q_proj"):
            b = _rope_permute_rows(b, n_head)
        elif module.endswith("k_proj"):
            b = _rope_permute_rows(b, n_kv_head)
        if target.startswith("token_embd"):
            a = a.T  # llama.cpp's embedding LoRA wants A as (vocab, r); see its llm_build_inp_embd
        out[f"{target}.lora_a"] = a.contiguous().numpy()
        out[f"{target}.lora_b"] = b.contiguous().numpy()
    return out


def write_gguf(
    adapter_dir: Path, config: dict[str, Any], dest: Path, *, alpha: float, name: str, base: str | None
) -> Path:
    """Write the GGUF LoRA file ``dest`` (a temp file renamed at the end: never half written);
    ``name`` is the adapter's reference, ``base`` the base model's spec (recorded as metadata)."""
    import gguf

    tensors = gguf_tensors(adapter_dir, config)
    arch = GGUF_ARCHITECTURES[base_architecture(config) or ""]
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name)
        if base:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, base)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, array in tensors.items():
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    logger.info("wrote %d GGUF LoRA tensors to %s", len(tensors), dest)
    return dest
