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
from lora_kit.training.recipe import LINEAR_TARGETS, Recipe, RecipeError

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


def _linear_params(shape: dict[str, Any]) -> int:
    """Weights of the quantizable linear layers (every projection of every decoder layer)."""
    return shape["num_hidden_layers"] * sum(a * b for a, b in module_dims(shape).values())


def _other_params(shape: dict[str, Any]) -> tuple[int, int]:
    """(embeddings + lm_head + final norm, the decoder layers' norms): kept unquantized."""
    L, h, V = shape["num_hidden_layers"], shape["hidden_size"], shape["vocab_size"]
    return V * h * (1 if shape["tie_word_embeddings"] else 2) + h, L * 2 * h


def _lora_params(recipe: Recipe, shape: dict[str, Any]) -> int:
    dims = module_dims(shape)
    targets = LINEAR_TARGETS if recipe.lora.target_modules == "all-linear" else list(recipe.lora.target_modules)
    return shape["num_hidden_layers"] * sum(recipe.lora.r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)


def _quant_bits(recipe: Recipe) -> float:
    """Bits per quantized weight: 4 + the block constants (absmax per 64 weights, double-quantized or fp32)."""
    return 4 + (8 / 64 + 32 / (64 * 256) if recipe.model.double_quant else 32 / 64)


def _replicated_weight_terms(recipe: Recipe, shape: dict[str, Any], compute_bytes: int) -> list[tuple[str, float, str]]:
    """Weights, LoRA weights + grads and optimizer state of a full replica (one process, or a ddp rank)."""
    linear, (root, norms) = _linear_params(shape), _other_params(shape)
    other = root + norms
    terms: list[tuple[str, float, str]] = []
    if recipe.model.quantization == "none":
        terms.append(
            ("base weights", (linear + other) * compute_bytes, f"{linear + other:,} params x {compute_bytes} B")
        )
    else:
        bits = _quant_bits(recipe)
        terms.append(
            (
                "4-bit linear weights",
                linear * bits / 8,
                f"{linear:,} params x {bits:.3f} bits (4-bit + block constants)",
            )
        )
        # prepare_model_for_kbit_training upcasts the non-quantized parts to fp32.
        terms.append(("embeddings, lm_head, norms (fp32)", other * 4, f"{other:,} params x 4 B"))
    lora = _lora_params(recipe, shape)
    opt_bytes = 2 if recipe.train.optimizer == "paged_adamw_8bit" else 8
    terms.append(("LoRA weights + grads (fp32)", lora * 8, f"{lora:,} params x (4 + 4) B"))
    terms.append(("optimizer states", lora * opt_bytes, f"{lora:,} params x {opt_bytes} B ({recipe.train.optimizer})"))
    return terms


def _sharded_weight_terms(
    recipe: Recipe, shape: dict[str, Any], compute_bytes: int, world: int
) -> list[tuple[str, float, str]]:
    """One fsdp rank (training/fsdp.py: every decoder layer one FSDP unit, the root another).

    Sharded 1/world: the packed 4-bit weights, the layer norms, LoRA weights, grads and AdamW
    state. Not sharded: the 4-bit block constants (bitsandbytes keeps them on the module, on every
    rank), and the root unit (embeddings, lm_head, final norm), which FSDP2 keeps gathered from
    forward to backward. Gathered for the step: two decoder layers (the running one, the prefetched).
    """
    L, (root, norms), lora = shape["num_hidden_layers"], _other_params(shape), _lora_params(recipe, shape)
    linear, n = _linear_params(shape), world
    other_bytes = compute_bytes if recipe.model.quantization == "none" else 4  # kbit preparation upcasts to fp32
    terms: list[tuple[str, float, str]] = []
    if recipe.model.quantization == "none":
        terms.append(("base linear weights (1/N)", linear * compute_bytes / n, f"{linear:,} x {compute_bytes} B / {n}"))
        layer_bytes = linear / L * compute_bytes
    else:
        extra = _quant_bits(recipe) - 4
        terms.append(("4-bit linear weights (1/N)", linear * 4 / 8 / n, f"{linear:,} params x 4 bits / {n}"))
        terms.append(("4-bit block constants (replicated)", linear * extra / 8, f"{linear:,} x {extra:.3f} bits"))
        layer_bytes = linear / L * 4 / 8
    terms.append(("embeddings, lm_head (root unit, gathered)", root * other_bytes, f"{root:,} x {other_bytes} B"))
    terms.append(("layer norms (1/N)", norms * other_bytes / n, f"{norms:,} x {other_bytes} B / {n}"))
    layer_bytes += (lora / L + 2 * shape["hidden_size"]) * 4
    terms.append(
        ("2 decoder layers gathered", 2 * layer_bytes * (n - 1) / n, f"2 x {layer_bytes:,.0f} B x {n - 1}/{n}")
    )
    opt_bytes = 8  # adamw (fsdp refuses paged_adamw_8bit)
    terms.append(("LoRA weights + grads (fp32, 1/N)", lora * 8 / n, f"{lora:,} params x (4 + 4) B / {n}"))
    terms.append(("optimizer states (1/N)", lora * opt_bytes / n, f"{lora:,} params x {opt_bytes} B / {n}"))
    return terms


def estimate(
    recipe: Recipe,
    shape: dict[str, Any],
    seq_len: int,
    cuda: bool,
    supervised_share: float = 1.0,
    strategy: str = "none",
    world_size: int = 1,
) -> list[tuple[str, float, str]]:
    """Peak-memory terms of one process (rank) as (name, bytes, formula).

    ``supervised_share`` (from the data audit) sizes the logits: the loss computes them only
    at positions whose next token is supervised in some row of the micro-batch. ``strategy``
    (none, ddp, fsdp) and ``world_size`` size the weights: each ddp rank holds a full replica,
    each fsdp rank 1/world of the base, LoRA weights, gradients and optimizer state.
    """
    V = shape["vocab_size"]
    compute_bytes = 2 if cuda else 4  # bf16 on CUDA, fp32 on the CPU
    B, T = recipe.train.micro_batch_size, seq_len
    if strategy == "fsdp":
        terms = _sharded_weight_terms(recipe, shape, compute_bytes, world_size)
    else:
        terms = _replicated_weight_terms(recipe, shape, compute_bytes)
        if strategy == "ddp" and world_size > 1:
            lora = _lora_params(recipe, shape)
            terms.append(("DDP gradient buckets (fp32)", lora * 4, f"{lora:,} params x 4 B (all-reduce copy)"))
    terms += _activation_terms(recipe, shape, B, T, compute_bytes, cuda)
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
        terms += _cpu_heap_terms(recipe, shape, terms)
    return terms


def _saved_per_token(recipe: Recipe, shape: dict[str, Any], act: int, cuda: bool) -> tuple[float, str]:
    """Bytes one decoder layer saves for backward per token, and the formula.

    Counted with saved-tensor hooks on the demo recipe: 4 (tokens x intermediate) values (gate,
    up, SiLU(gate), the down_proj input), 4 (tokens x hidden) (the norm outputs, the o_proj
    input, residuals) and sdpa's q, k, v, output (4 x hidden). On the CPU (fp32) the trainer's
    LoRA forward (training/fast_lora.py) saves one 1-byte dropout mask per projection input;
    under autocast (CUDA) PEFT's forward saves a dropped-out copy per projection instead.
    """
    h, i = shape["hidden_size"], shape["intermediate_size"]
    masks = 6 * h + i if recipe.lora.dropout > 0 else 0  # q, k, v, o, gate, up read h wide; down reads i
    if cuda:
        return (8 * h + 4 * i + masks) * act + masks, f"(8x{h} + 4x{i} + {masks} dropout copies) x {act} B + masks"
    return (8 * h + 4 * i) * act + masks, f"(8x{h} + 4x{i}) x {act} B + {masks} B dropout masks"


def _activation_terms(
    recipe: Recipe, shape: dict[str, Any], B: int, T: int, act: int, cuda: bool
) -> list[tuple[str, float, str]]:
    """What the forward keeps for backward: every layer's, or with gradient checkpointing the layer inputs
    and one layer recomputed. Attention: sdpa with the (block-diagonal) mask: on CUDA the math path
    (scores + softmax per head); on the CPU the flash kernel, which keeps only the fp32 mask per layer."""
    L, h, heads = shape["num_hidden_layers"], shape["hidden_size"], shape["num_attention_heads"]
    per_token, formula = _saved_per_token(recipe, shape, act, cuda)
    per_layer = B * T * per_token
    if cuda:
        attn, attn_formula = B * heads * T * T * 2 * act, f"attention {B}x{heads}x{T}^2 x {2 * act} B"
    else:
        attn, attn_formula = B * T * T * 4, f"fp32 mask {B}x{T}^2 x 4 B"
    if not recipe.train.gradient_checkpointing:
        return [("activations, all layers", L * (per_layer + attn), f"{L} x [{B}x{T} x {formula} + {attn_formula}]")]
    return [
        ("checkpointed layer inputs", L * B * T * h * act, f"{L} layers x {B}x{T} tokens x {h} x {act} B"),
        ("one layer recomputed for backward", per_layer + attn, f"{B}x{T} x {formula} + {attn_formula}"),
    ]


# Measured with scripts/bench_train_memory.py (demo recipe, micro batch 1, 4, 8): glibc's heap keeps
# the forward's freed temporaries, which lie between the saved tensors and are only partly reused.
HEAP_SLACK = 0.6


def _cpu_heap_terms(recipe: Recipe, shape: dict[str, Any], terms: list[tuple[str, float, str]]) -> list:
    """What the CPU process holds beyond live tensors: the allocator's slack over the activations, and
    the blocks freed after loading the base at full precision to quantize it (kept by the heap)."""
    activations = sum(b for name, b, _ in terms if name.startswith(("activations", "checkpointed", "one layer")))
    out = [
        (
            "allocator slack (glibc heap)",
            HEAP_SLACK * activations,
            f"{HEAP_SLACK} x activations (freed forward temporaries between saved tensors, measured)",
        )
    ]
    if recipe.model.quantization != "none" and _checkpoint(recipe)["stored"] == "float32":
        total = _checkpoint(recipe)["total"]
        out.append(
            (
                "fp32 checkpoint kept mapped",
                total,
                f"{total:,} B of checkpoint file: its embeddings and norms are views of it (fp32 as computed)",
            )
        )
    return out


def _checkpoint(recipe: Recipe) -> dict[str, Any]:
    """What the base's checkpoint files are: the dtype its tensors are stored in and its bytes. A
    base not on this machine (a hub id) is taken to be stored in bf16, as Mistral-7B is."""
    spec = recipe.model.base
    shards, numel = models.checkpoint_shard_bytes(spec), models.checkpoint_numel(spec)
    if shards is None or numel is None:
        shape = model_shape(spec)
        params = _linear_params(shape) + sum(_other_params(shape))
        return {"stored": "bfloat16", "total": params * 2, "known": False}
    return {"stored": models.checkpoint_float_dtype(spec), "total": sum(shards), "known": True}


# transformers (5.x) converts and quantizes up to min(4, CPUs) tensors at once while loading.
LOAD_WORKERS = min(4, os.cpu_count() or 4)


def loading_terms(recipe: Recipe, shape: dict[str, Any], cuda: bool) -> list[tuple[str, float, str]]:
    """The peak while a 16-bit checkpoint is quantized to 4 bits on the CPU, before training starts:
    the 4-bit weights and fp32 embeddings and norms made so far, the tensors being widened to fp32
    (one per loading thread), and the checkpoint's pages: transformers maps every shard at the
    start and unmaps them at the end, so each page read stays resident (clean page cache, which the
    kernel reclaims under pressure: counted in RSS, not a hard need). Empty where it is not the load
    that peaks this way (CUDA, full precision, an fp32 checkpoint)."""
    facts = _checkpoint(recipe) if recipe.model.quantization != "none" and not cuda else None
    if facts is None or facts["stored"] == "float32":
        return []
    terms = [t for t in _replicated_weight_terms(recipe, shape, 4) if t[0] in QUANTIZED_LOAD_TERMS]
    h, i, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    widest = max(h * i, h * vocab)
    terms.append(
        (
            "tensors widened to fp32 while loading",
            LOAD_WORKERS * widest * 4,
            f"{LOAD_WORKERS} loading threads x {widest:,} params x 4 B (the widest matrix)",
        )
    )
    terms.append(("runtime (Python, torch, libraries)", 0.5 * GiB, "as in training"))
    where = "" if facts["known"] else " (taken as bf16: not on this machine)"
    terms.append(
        (
            "checkpoint pages mapped while loading",
            facts["total"],
            f"{facts['total']:,} B of checkpoint{where}: reclaimable page cache, in RSS while memory allows",
        )
    )
    return terms


QUANTIZED_LOAD_TERMS = ("4-bit linear weights", "embeddings, lm_head, norms (fp32)")


def plan(recipe: Recipe, device: str | None = None, strategy: str | None = None, world_size: int = 1) -> dict[str, Any]:
    """Token counts and the per-rank memory estimate of a recipe, for ``device`` (default: this
    machine's), ``world_size`` processes and ``strategy`` (default: the recipe's train.distributed,
    else ddp for several processes); with several processes, the ddp and fsdp totals side by side."""
    import torch

    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    strategy = _plan_strategy(recipe, strategy, world_size)
    report: dict[str, Any] = {
        "base": recipe.model.base,
        "device": "cuda" if cuda else "cpu",
        "distributed": {"strategy": strategy, "world_size": world_size},
    }
    seq_len = recipe.data.max_seq_len
    share = 1.0
    try:
        tokenizer = models.load_tokenizer(recipe.model.base)
        train_records, eval_records = data.load_splits(recipe.data, recipe.train.seed)
        examples, audit = data.build(tokenizer, train_records, recipe.data, "train")
        rows = packing.rows_for(examples, recipe.data.max_seq_len, recipe.data.packing)
        micro = math.ceil(len(rows) / (recipe.train.micro_batch_size * world_size))
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
    terms = estimate(recipe, shape, seq_len, cuda, share, strategy, world_size)
    loading = loading_terms(recipe, shape, cuda) if strategy == "none" else []
    training, load_peak = sum(b for _, b, _ in terms), sum(b for _, b, _ in loading)
    total = max(training, load_peak)  # the process peaks while loading or while training
    report["memory"] = {
        "terms": [{"name": n, "bytes": int(b), "formula": f} for n, b, f in terms],
        "training_bytes": int(training),
        "loading_terms": [{"name": n, "bytes": int(b), "formula": f} for n, b, f in loading],
        "loading_bytes": int(load_peak),
        "total_bytes": int(total),
        "seq_len": seq_len,
    }
    if world_size > 1:  # what the other strategy would need per rank, to choose
        report["memory"]["per_rank_bytes"] = {
            s: int(sum(b for _, b, _ in estimate(recipe, shape, seq_len, cuda, share, s, world_size)))
            for s in ("ddp", "fsdp")
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


def _plan_strategy(recipe: Recipe, strategy: str | None, world_size: int) -> str:
    """The strategy planned for, refusing what the trainer would refuse."""
    if world_size < 1:
        raise RecipeError(f"--world-size must be 1 or more, not {world_size}")
    strategy = strategy or recipe.train.distributed or ("ddp" if world_size > 1 else "none")
    if strategy == "fsdp" and world_size < 2:
        raise RecipeError("fsdp shards across processes: plan it with --world-size 2 or more")
    if strategy == "fsdp" and recipe.train.optimizer == "paged_adamw_8bit":
        raise RecipeError("fsdp cannot checkpoint paged_adamw_8bit's state: plan with --set train.optimizer=adamw")
    if strategy == "none" and world_size > 1:
        raise RecipeError("strategy none runs one process: plan it with --world-size 1, or --strategy ddp/fsdp")
    return strategy


def format_report(report: dict[str, Any]) -> str:
    """The plan as a human-readable table."""
    dist = report.get("distributed", {"strategy": "none", "world_size": 1})
    lines = [f"plan for base '{report['base']}' on {report['device']}"]
    if dist["world_size"] > 1:
        lines[0] += f", {dist['strategy']} over {dist['world_size']} processes (memory per rank)"
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
    if m.get("loading_terms"):
        lines.append(f"  {m['training_bytes'] / GiB:8.3f} GiB  while training")
        lines.append("while loading (quantizing the 16-bit checkpoint, before training):")
        for t in m["loading_terms"]:
            lines.append(f"  {t['bytes'] / GiB:8.3f} GiB  {t['name']:<36} {t['formula']}")
        lines.append(f"  {m['loading_bytes'] / GiB:8.3f} GiB  while loading")
    lines.append(f"  {m['total_bytes'] / GiB:8.3f} GiB  total (peak)" + (" per rank" if dist["world_size"] > 1 else ""))
    if "per_rank_bytes" in m:
        per_rank = ", ".join(f"{s} {b / GiB:.3f} GiB" for s, b in m["per_rank_bytes"].items())
        lines.append(f"per rank at {dist['world_size']} processes: {per_rank}")
    if m["device_bytes"] is None:
        for gib in (16, 24, 40, 80):
            lines.append(f"a {gib} GiB GPU: {'fits' if m['total_bytes'] < gib * GiB * 0.95 else 'does NOT fit'}")
    else:
        verdict = "fits" if m["fits"] else "does NOT fit"
        lines.append(f"device memory {m['device_bytes'] / GiB:.1f} GiB: {verdict}")
    return "\n".join(lines)
