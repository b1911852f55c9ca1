"""`lora-kit plan`: count a recipe's tokens and estimate its peak memory before any run.

The estimate is a sum of named terms, each a formula of the model shape and the
recipe, so every number can be explained line by line (see ``format_report``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lora_kit import models
from lora_kit.training import data, packing
from lora_kit.training.recipe import LINEAR_TARGETS, Recipe

GiB = 1024**3

# Shapes of models whose config may not be reachable here (no hub): enough to plan.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "mistralai/Mistral-7B-Instruct-v0.1": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}
KNOWN_SHAPES["mistralai/Mistral-7B-Instruct-v0.2"] = KNOWN_SHAPES["mistralai/Mistral-7B-Instruct-v0.1"]


def model_shape(spec: str) -> dict[str, Any]:
    """Dimensions from the model's config.json (local) or the built-in table."""
    if spec in KNOWN_SHAPES and not Path(spec).exists():
        return dict(KNOWN_SHAPES[spec])
    path = Path(models.resolve(spec))
    cfg = json.loads((path / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
    }


def module_dims(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear module type in one decoder layer."""
    h, i, hd = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def estimate(
    recipe: Recipe, shape: dict[str, Any], seq_len: int, cuda: bool, supervised_share: float = 1.0
) -> list[tuple[str, float, str]]:
    """Peak-memory terms as (name, bytes, formula).

    ``supervised_share`` (from the data audit) sizes the logits: the loss computes them only
    at positions whose next token is supervised in some row of the micro-batch.
    """
    L, h, V = shape["num_hidden_layers"], shape["hidden_size"], shape["vocab_size"]
    heads, inter = shape["num_attention_heads"], shape["intermediate_size"]
    dims = module_dims(shape)
    linear = L * sum(a * b for a, b in dims.values())
    other = V * h * (1 if shape["tie_word_embeddings"] else 2) + L * 2 * h + h
    compute_bytes = 2 if cuda else 4  # bf16 on CUDA, fp32 on the CPU
    B, T = recipe.train.micro_batch_size, seq_len
    terms: list[tuple[str, float, str]] = []
    if recipe.model.quantization == "none":
        terms.append(
            ("base weights", (linear + other) * compute_bytes, f"{linear + other:,} params x {compute_bytes} B")
        )
    else:
        bits = 4 + (8 / 64 + 32 / (64 * 256) if recipe.model.double_quant else 32 / 64)
        terms.append(
            (
                "4-bit linear weights",
                linear * bits / 8,
                f"{linear:,} params x {bits:.3f} bits (4-bit + block constants)",
            )
        )
        # prepare_model_for_kbit_training upcasts the non-quantized parts to fp32.
        terms.append(("embeddings, lm_head, norms (fp32)", other * 4, f"{other:,} params x 4 B"))
    targets = LINEAR_TARGETS if recipe.lora.target_modules == "all-linear" else list(recipe.lora.target_modules)
    lora = L * sum(recipe.lora.r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)
    opt_bytes = 2 if recipe.train.optimizer == "paged_adamw_8bit" else 8
    terms.append(("LoRA weights + grads (fp32)", lora * 8, f"{lora:,} params x (4 + 4) B"))
    terms.append(("optimizer states", lora * opt_bytes, f"{lora:,} params x {opt_bytes} B ({recipe.train.optimizer})"))
    act = compute_bytes
    # Saved per layer for backward (inputs of the 7 projections, their LoRA dropout copies,
    # norms, residuals, the SwiGLU intermediates): ~ (16 h + 5 i) values per token.
    per_layer = B * T * (16 * h + 5 * inter) * act
    # sdpa with an explicit (block-diagonal) mask takes the math path: scores + softmax per head.
    attn = B * heads * T * T * (act + act)
    if recipe.train.gradient_checkpointing:
        terms.append(("checkpointed layer inputs", L * B * T * h * act, f"{L} layers x {B}x{T} tokens x {h} x {act} B"))
        terms.append(
            (
                "one layer recomputed for backward",
                per_layer + attn,
                f"{B}x{T} x (16x{h} + 5x{inter}) x {act} B + attention {B}x{heads}x{T}^2 x {2 * act} B",
            )
        )
    else:
        terms.append(
            (
                "activations, all layers",
                L * (per_layer + attn),
                f"{L} x [{B}x{T} x (16x{h} + 5x{inter}) x {act} B + attention {B}x{heads}x{T}^2 x {2 * act} B]",
            )
        )
    kept = min(T, max(1, math.ceil(B * T * supervised_share)))
    terms.append(
        (
            "logits + loss (fp32)",
            B * kept * V * 4 * 3,
            f"{B}x{kept} kept positions x {V} vocab x 4 B x 3 (logits, log-softmax, grad)",
        )
    )
    if cuda:
        terms.append(("runtime (CUDA context, kernels)", 0.5 * GiB, "typical CUDA context size"))
    else:
        terms.append(
            (
                "runtime (Python, torch, libraries)",
                0.5 * GiB,
                "RSS after importing torch/transformers/peft/bitsandbytes (0.46 GB measured)",
            )
        )
    return terms


def plan(recipe: Recipe, device: str | None = None) -> dict[str, Any]:
    """Token counts and the memory estimate of a recipe, for ``device`` (default: this machine's)."""
    import torch

    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    report: dict[str, Any] = {"base": recipe.model.base, "device": "cuda" if cuda else "cpu"}
    seq_len = recipe.data.max_seq_len
    share = 1.0
    try:
        tokenizer = models.load_tokenizer(recipe.model.base)
        train_records, eval_records = data.load_splits(recipe.data, recipe.train.seed)
        examples, audit = data.build(tokenizer, train_records, recipe.data, "train")
        rows = packing.rows_for(examples, recipe.data.max_seq_len, recipe.data.packing)
        micro = math.ceil(len(rows) / recipe.train.micro_batch_size)
        steps_per_epoch = math.ceil(micro / recipe.train.gradient_accumulation_steps)
        steps = recipe.train.max_steps or steps_per_epoch * recipe.train.epochs
        if not recipe.data.packing:
            seq_len = min(seq_len, audit.max_len)
        share = audit.supervised_share
        report["data"] = {
            "train_examples": audit.kept,
            "eval_examples": len(eval_records),
            "tokens": audit.tokens,
            "supervised_tokens": audit.supervised_tokens,
            "truncated": audit.truncated,
            "rows": len(rows),
            "steps_per_epoch": steps_per_epoch,
            "steps": steps,
            "tokens_to_train": audit.tokens * (steps / steps_per_epoch),
            "audit_failures": audit.failures,
        }
    except (models.ModelError, data.DataError, OSError) as err:
        report["data"] = {"error": str(err)}
    shape = model_shape(recipe.model.base)
    terms = estimate(recipe, shape, seq_len, cuda, share)
    total = sum(b for _, b, _ in terms)
    report["memory"] = {
        "terms": [{"name": n, "bytes": int(b), "formula": f} for n, b, f in terms],
        "total_bytes": int(total),
        "seq_len": seq_len,
    }
    if cuda and torch.cuda.is_available():
        free, capacity = torch.cuda.mem_get_info()
        report["memory"]["device_bytes"] = int(capacity)
        report["memory"]["fits"] = total < capacity * 0.95
    elif cuda:
        report["memory"]["device_bytes"] = None  # planning for a GPU this machine does not have
        report["memory"]["fits"] = None
    else:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        report["memory"]["device_bytes"] = int(capacity)
        report["memory"]["fits"] = total < capacity * 0.9
    return report


def format_report(report: dict[str, Any]) -> str:
    """The plan as a human-readable table."""
    lines = [f"plan for base '{report['base']}' on {report['device']}"]
    d = report["data"]
    if "error" in d:
        lines.append(f"data: could not count tokens: {d['error']}")
    else:
        lines.append(
            f"data: {d['train_examples']} train / {d['eval_examples']} eval examples, {d['tokens']:,} tokens "
            f"({d['supervised_tokens']:,} supervised), {d['rows']} rows, {d['steps_per_epoch']} steps/epoch, {d['steps']} steps"
        )
        for f in d["audit_failures"]:
            lines.append(f"  AUDIT FAILURE: {f}")
    m = report["memory"]
    lines.append(f"estimated peak memory (sequence length {m['seq_len']}):")
    for t in m["terms"]:
        lines.append(f"  {t['bytes'] / GiB:8.3f} GiB  {t['name']:<36} {t['formula']}")
    lines.append(f"  {m['total_bytes'] / GiB:8.3f} GiB  total")
    if m["device_bytes"] is None:
        for gib in (16, 24, 40, 80):
            lines.append(f"a {gib} GiB GPU: {'fits' if m['total_bytes'] < gib * GiB * 0.95 else 'does NOT fit'}")
    else:
        verdict = "fits" if m["fits"] else "does NOT fit"
        lines.append(f"device memory {m['device_bytes'] / GiB:.1f} GiB: {verdict}")
    return "\n".join(lines)
