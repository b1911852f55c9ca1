"""The KV cache's dtype: a decode step's time, the cache's bytes and the answers' closeness, fp32 vs 16-bit.

Engines on one model in one process, the same base weights (``--weight-dtype``, default
``auto``), differing only in ``kv_dtype`` (float32, and the 16-bit dtypes asked for). For 1 and
8 rows and prompts of a few lengths (the chat questions, and slices of this repository's README
of 512 and 1536 tokens), each engine's model prefills the rows once, then 32 decode steps (the
engine's lean step, greedy) are timed per round and the cache cropped back. Rounds interleave the
engines; prints the median ms per step and the median of the per-round ratios to the fp32 cache.

Closeness: the README's first 600 tokens fed one by one (teacher forcing) through the engine's
decode step after a 32-token prefill; every position's next-token distribution compared with
an fp32-weights, fp32-cache reference: mean and p99 KL divergence, and how often the top token
agrees. The fp32 cache's own row shows what the weights' dtype costs.

    .venv/bin/python scripts/bench_kv_cache.py [--rounds N] [--kv bfloat16 float16] [--weight-dtype auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch
from _harness import QUESTIONS, cpu_summary, weight_summary

from lora_kit import chat, models
from lora_kit.engine import Engine, EngineConfig
from lora_kit.engine.threads import dedicate_cpu_threads, run_in_thread

STEPS = 32
CONTEXTS = (0, 512, 1536)  # 0: the chat questions (~36 tokens)
README = Path(__file__).resolve().parents[1] / "README.md"


def prompts_for(tokenizer, context: int, rows: int) -> list[list[int]]:
    """``rows`` distinct prompts of ``context`` tokens (the chat questions for 0)."""
    if not context:
        return [chat.render_prompt(tokenizer, q) for q in QUESTIONS[:rows]]
    ids = tokenizer(README.read_text())["input_ids"]
    if len(ids) < context + 8 * rows:
        sys.exit(f"README.md has {len(ids)} tokens: too few for {rows} prompts of {context}")
    return [ids[8 * r : 8 * r + context] for r in range(rows)]


@torch.inference_mode()
def step_times(engines: dict[str, Engine], tokenizer, rounds: int) -> dict[tuple[str, int, int], list[float]]:
    """Seconds per decode step, per (kv dtype, rows, context), one entry per round: each engine's
    model prefills the rows once, the cache is narrowed to its ``kv_dtype`` as the engine's batch
    holds it, then every round times ``STEPS`` lean decode steps and crops the cache back
    (prefill's time, large and variable at long contexts, never enters the figure)."""
    from transformers import DynamicCache

    from lora_kit.engine.decode_step import LeanDecoder
    from lora_kit.engine.kv_cache import growing_cache, layer_kv

    times: dict[tuple[str, int, int], list[float]] = {}
    for rows in (1, 8):
        for ctx in CONTEXTS:
            prompts = prompts_for(tokenizer, ctx, rows)
            width = max(map(len, prompts))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            state = {}
            for kv, engine in engines.items():
                out = engine.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=DynamicCache()
                )
                cache = growing_cache(layer_kv(out.past_key_values), extra=STEPS, dtype=engine.kv_dtype)
                state[kv] = (LeanDecoder.for_model(engine.model), cache)
            for _ in range(rounds):
                for kv, (lean, cache) in state.items():
                    step_mask, pos, token = mask, positions[:, -1:] + 1, ids[:, -1:]
                    start = time.perf_counter()
                    for _ in range(STEPS):
                        step_mask = torch.cat([step_mask, step_mask.new_ones(rows, 1)], dim=1)
                        token = lean(token, step_mask, pos, cache).argmax(-1, keepdim=True)
                        pos = pos + 1
                    times.setdefault((kv, rows, ctx), []).append((time.perf_counter() - start) / STEPS)
                    for layer in cache.layers:
                        layer.crop(-STEPS)
            print(f"{rows} rows, context {ctx or 'chat'} done", file=sys.stderr)
    return times


@torch.inference_mode()
def teacher_forced_logits(engine: Engine, ids: torch.Tensor, prefill: int = 32) -> torch.Tensor:
    """fp32 logits (N, V) of every position after the first ``prefill`` - 1 of ``ids`` (1, L):
    the prefill's last position, then each decode step's, fed the text's own next token."""
    from transformers import DynamicCache

    from lora_kit.engine.decode_step import LeanDecoder
    from lora_kit.engine.kv_cache import growing_cache, layer_kv

    lean = LeanDecoder.for_model(engine.model)
    if lean is None:
        sys.exit(f"{engine.model_name} has no lean decode step: nothing to compare")
    first = engine.model(input_ids=ids[:, :prefill], past_key_values=DynamicCache(), use_cache=True)
    cache = growing_cache(layer_kv(first.past_key_values), dtype=engine.kv_dtype)  # as the engine's batch holds it
    out = [first.logits[:, -1].float()]
    mask = torch.ones(1, prefill, dtype=torch.long)
    for t in range(prefill, ids.shape[1] - 1):
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        out.append(lean(ids[:, t : t + 1], mask, torch.tensor([[t]]), cache).float())
    return torch.cat(out)


def closeness(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """Mean and p99 KL(ref || logits) over positions, and the share of positions whose top token agrees."""
    lref, lgot = torch.log_softmax(ref, -1), torch.log_softmax(logits, -1)
    kl = (lref.exp() * (lref - lgot)).sum(-1)
    return float(kl.mean()), float(kl.quantile(0.99)), float((logits.argmax(-1) == ref.argmax(-1)).float().mean())


def kv_bytes_per_token(engine: Engine) -> int:
    config = engine.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim
    return per * torch.empty(0, dtype=engine.kv_dtype).element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--weight-dtype", default="auto")
    ap.add_argument("--kv", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16"], help="16-bit caches")
    args = ap.parse_args()
    threads = dedicate_cpu_threads()
    tokenizer = models.load_tokenizer(args.model)
    kinds = ["float32", *args.kv]
    settings = dict(model=args.model, max_batch=8, prefix_cache_mib=0, weight_dtype=args.weight_dtype)
    engines = {kv: Engine(EngineConfig(**settings, kv_dtype=kv), tokenizer=tokenizer) for kv in kinds}
    times = run_in_thread(lambda: step_times(engines, tokenizer, args.rounds), threads)  # the engine's threads

    ids = tokenizer(README.read_text(), return_tensors="pt")["input_ids"][:, :600]
    close = {
        kv: run_in_thread(lambda e=engine: teacher_forced_logits(e, ids), threads) for kv, engine in engines.items()
    }
    for engine in engines.values():
        engine.stop()
    reference = Engine(EngineConfig(**{**settings, "weight_dtype": "float32"}, kv_dtype="float32"), tokenizer=tokenizer)
    ref = run_in_thread(lambda: teacher_forced_logits(reference, ids), threads)

    sample = next(iter(engines.values()))
    print(f"\nmodel {args.model}, base weights {weight_summary(sample.model)}, {threads} threads, "
          f"{args.rounds} rounds; ms per decode step (median)\nCPU: {cpu_summary()}")  # fmt: skip
    print("| rows | context | " + " | ".join(f"{kv} cache ms/step" for kv in kinds) + " | "
          + " | ".join(f"{kv} vs fp32 (step time)" for kv in args.kv) + " |")  # fmt: skip
    print("|---:|---|" + "---:|" * (2 * len(kinds) - 1))
    for rows in (1, 8):
        for ctx in CONTEXTS:
            label = f"{ctx} tokens" if ctx else "chat question (~36 tokens)"
            cells = [f"{1000 * median(times[kv, rows, ctx]):.1f}" for kv in kinds]
            ratios = [
                f"{median(a / b for a, b in zip(times[kv, rows, ctx], times['float32', rows, ctx])):.3f}"
                for kv in args.kv
            ]
            print(f"| {rows} | {label} | " + " | ".join(cells + ratios) + " |")
    print("\n| KV cache | bytes per token | KL mean vs fp32 weights+cache | KL p99 | top token agrees |")
    print("|---|---:|---:|---:|---:|")
    for kv in kinds:
        mean, p99, agree = closeness(close[kv], ref)
        print(f"| {kv} | {kv_bytes_per_token(engines[kv])} | {mean:.2e} | {p99:.2e} | {100 * agree:.1f}% |")
    print(f"({ref.shape[0]} positions of README.md, teacher-forced after a 32-token prefill)")


if __name__ == "__main__":
    main()
