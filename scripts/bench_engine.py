"""Benchmark the multi-adapter engine against the base model, PEFT and plain transformers.

Everything runs side by side in one process on the embedded model with rank-8 all-linear
random adapters; every request generates exactly ``--tokens`` tokens (EOS ignored) so the
token counts are equal. Every round runs every measurement once; prints a table of
median tokens/s and the median of the per-round ratios, and the adapters' size.

    .venv/bin/python scripts/bench_engine.py [--quick] [--rounds N] [--json out.json]

The header states what really ran: the base's weights as the engine holds them after loading
(dtype; oneDNN-packed, tiled or dense), the adapters' dtype, the LoRA path, and the CPU's model and flags.

The engine runs on the backend chosen by platform (on the CPU: the BGMV kernel and packed
weights); compare with torch's bmm and transformers' kernels through the backend override:

    LORA_KIT_ENGINE_BACKEND=torch .venv/bin/python scripts/bench_engine.py --json /tmp/bench_torch.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from _harness import QUESTIONS, cpu_summary, random_adapters, timed_engine, weight_summary

from lora_kit import chat, models
from lora_kit.engine import Engine, EngineConfig, mapping_resolver
from lora_kit.engine.threads import dedicate_cpu_threads, run_in_thread
from lora_kit.engine.types import AdapterWeight


def make_adapters(base_dir: Path, out: Path, count: int, rank: int = 8) -> dict[str, Path]:
    """``count`` random rank-``rank`` all-linear PEFT adapters ``a0``, ``a1``, ... in ``out``."""
    return random_adapters(base_dir, out, [f"a{i}" for i in range(count)], rank=rank)


def padded(tokenizer, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def timed_generate(model, tokenizer, prompts: list[list[int]], tokens: int, **kwargs) -> float:
    """Seconds for one ``generate`` call, run (like the engine's loop) in a thread of its own."""
    return run_in_thread(lambda: _timed_generate(model, tokenizer, prompts, tokens, **kwargs))


def _timed_generate(model, tokenizer, prompts: list[list[int]], tokens: int, **kwargs) -> float:
    batch = {k: v.to(model.device) for k, v in padded(tokenizer, prompts).items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad, **kwargs
        )
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    took = time.perf_counter() - start
    assert out.shape[1] - batch["input_ids"].shape[1] == tokens
    return took


def baseline_placement(engine) -> tuple[torch.device, torch.dtype]:
    """Where PEFT and transformers run, to compare like with like: the engine's device, and on it
    the engine's dtype (bf16 on CUDA); on the CPU fp32, the engine's activations (its packed bf16
    weights are its own optimisation, measured against the fp32 reference)."""
    if engine.device.type == "cpu":
        return engine.device, torch.float32
    return engine.device, engine.dtype


def load_baselines(base_dir: Path, dirs: dict[str, Path], names: list[str], device: torch.device, dtype: torch.dtype):
    """PEFT with the adapters ``names`` loaded, and plain transformers: both on ``device`` in
    ``dtype``, loaded straight there (models.load_model)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(
        models.load_model(str(base_dir), "none", compute_dtype=dtype, device=device),
        dirs[names[0]],
        adapter_name=names[0],
    )
    for n in names[1:]:
        peft_model.load_adapter(dirs[n], adapter_name=n)
    plain = models.load_model(str(base_dir), "none", compute_dtype=dtype, device=device)
    return peft_model.eval(), plain.eval()


def adapter_bytes(adapter_dir: Path, element_size: int) -> int:
    """Bytes of an adapter's A and B matrices held with ``element_size`` bytes per weight."""
    from safetensors.torch import load_file

    return sum(t.numel() * element_size for t in load_file(adapter_dir / "adapter_model.safetensors").values())


def decode_step_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter, less the input embedding
    table when the output head has its own copy (a lookup reads a few rows, not the table)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - (embed.numel() * embed.element_size() if embed is not head else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (< 3 min on a 2-core CPU)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per request (default 64, quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds over all measurements (default 3, quick 1)")
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--mix-only", action="store_true", help="only the weighted-mix rows (2-adapter mixes vs single)")
    ap.add_argument(
        "--adapter-dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="the engine's adapter dtype (default: the model's, fp32)",
    )
    args = ap.parse_args()
    # As `lora-kit serve` does: every measured loop runs in a thread that owns the only
    # OpenMP pool (lora_kit/engine/threads.py); this thread only orchestrates.
    threads = dedicate_cpu_threads()
    tokens = args.tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.manual_seed(0)

    base_dir = Path(models.resolve(args.model))
    tokenizer = models.load_tokenizer(args.model)
    prompts = [chat.render_prompt(tokenizer, q) for q in QUESTIONS]
    p8, p32 = prompts[:8], (prompts * 2)[:32]
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        dirs = make_adapters(base_dir, tmp, 33)
        names = [f"a{i}" for i in range(32)]
        # No prefix cache: PEFT and transformers prefill every prompt of every round, and so does the
        # engine here (scripts/bench_prefix_cache.py measures the cache).
        config = EngineConfig(
            model=args.model, max_slots=40, max_batch=32, adapter_dtype=args.adapter_dtype, prefix_cache_mib=0
        )
        engine = Engine(config, tokenizer=tokenizer, adapter_resolver=mapping_resolver(dirs))
        for n in names:
            engine.check_adapter(n)
        timed_engine(engine, p8, names[:8], 2)  # warm-up

        # On the engine's device: on CUDA, PEFT and transformers on the same GPU, not on the CPU.
        peft_model, plain = load_baselines(base_dir, dirs, names[:8], *baseline_placement(engine))

        # Every round runs every measurement once, so a ratio compares runs minutes apart at
        # most; a shared CPU's speed drifts more than that between separate passes.
        # Each row a 50/50 mix of two adapters (its own and the next one's): every row reads two adapters.
        mixes = [[AdapterWeight(names[i], 0.5), AdapterWeight(names[(i + 1) % 8], 0.5)] for i in range(8)]
        runs = {
            "mixed8": lambda: timed_engine(engine, p8, names[:8], tokens),
            "mix2x8": lambda: timed_engine(engine, p8, mixes, tokens),
            "base8": lambda: timed_engine(engine, p8, [None] * 8, tokens),
            "peft8": lambda: timed_generate(peft_model, tokenizer, p8, tokens, adapter_names=names[:8]),
            "hf8": lambda: timed_generate(plain, tokenizer, p8, tokens),
            **{
                f"a{k}x32": (lambda k=k: timed_engine(engine, p32, [names[i % k] for i in range(32)], tokens))
                for k in (1, 8, 32)
            },
            "base32": lambda: timed_engine(engine, p32, [None] * 32, tokens),
        }
        if args.mix_only:
            runs = {key: runs[key] for key in ("mixed8", "mix2x8")}
        times: dict[str, list[float]] = {key: [] for key in runs}
        for r in range(rounds):
            for key, run in runs.items():
                times[key].append(run())
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
        runs.clear()  # the closures held the PEFT and transformers models
        peft_model = plain = None  # free them before the cold-load timing

        # cold adapter load (safetensors -> validated -> slot), ms
        start = time.perf_counter()
        engine.check_adapter("a32")
        cold_ms = (time.perf_counter() - start) * 1000
        one_adapter = adapter_bytes(dirs["a0"], engine.adapter_dtype.itemsize)
        base_bytes = decode_step_bytes(engine.model)
        weights, cpu = weight_summary(engine.model), cpu_summary()
        engine.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def row(label: str, ours: str, base: str, base_label: str, n: int, goal: str) -> dict:
        ratio = median([tb / to for to, tb in zip(times[ours], times[base])])
        return {"measurement": label, "lora_kit_tps": n * tokens / median(times[ours]), "baseline": base_label,
                "baseline_tps": n * tokens / median(times[base]), "ratio": ratio, "goal": goal}  # fmt: skip

    mix_row = row("8 req, each a 2-adapter mix vs 8 single adapters", "mix2x8", "mixed8", "8 adapters", 8, ">= 0.85")
    rows = (
        [mix_row]
        if args.mix_only
        else [
            row("8 req / 8 adapters vs base only (lora-kit)", "mixed8", "base8", "base only", 8, ">= 0.95"),
            row(
                "8 req / 8 adapters: lora-kit vs PEFT adapter_names", "mixed8", "peft8", "PEFT mixed batch", 8, ">= 2.5"
            ),
            row("32 req / 1 adapter vs base only", "a1x32", "base32", "base only", 32, ""),
            row("32 req / 8 adapters vs 1 adapter", "a8x32", "a1x32", "1 adapter", 32, ""),
            row("32 req / 32 adapters vs 1 adapter", "a32x32", "a1x32", "1 adapter", 32, ">= 0.9"),
            row("8 req base only: lora-kit vs transformers generate", "base8", "hf8", "HF generate", 8, ">= 1.0"),
            mix_row,
        ]
    )
    lora_path = f"{engine.backend.lora_path} ({engine.backend.name} backend)"
    adapter_dtype = str(engine.adapter_dtype).removeprefix("torch.")
    print(f"\nmodel {args.model} on {engine.device}, {str(engine.dtype).removeprefix('torch.')} activations, "
          f"PEFT and transformers on {engine.device} in {str(baseline_placement(engine)[1]).removeprefix('torch.')}, "
          f"base linear weights {weights}, "
          f"adapters {adapter_dtype} via {lora_path}, {threads} threads\nCPU: {cpu}\n"
          f"{tokens} tokens/request, {rounds} round(s); tok/s = median, ratio = median of per-round ratios")  # fmt: skip
    print("| measurement | lora-kit tok/s | baseline | tok/s | ratio | goal |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['measurement']} | {r['lora_kit_tps']:.1f} | {r['baseline']} | {r['baseline_tps']:.1f} | {r['ratio']:.2f} | {r['goal']} |"
        )
    print(f"| cold adapter load (rank 8, all-linear, disk -> slot) | {cold_ms:.1f} ms | | | | |")
    share = one_adapter / base_bytes
    print(f"\none adapter = {one_adapter / 2**20:.1f} MiB = {100 * share:.2f}% of the {base_bytes / 2**20:.0f} MiB of base "
          f"weights a decode step reads; 8 distinct adapters add {800 * share:.1f}%, 32 add {3200 * share:.1f}%")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"tokens": tokens, "rounds": rounds, "rows": rows, "cold_load_ms": cold_ms,
                                         "adapter_bytes": one_adapter, "base_bytes": base_bytes,
                                         "adapter_dtype": str(engine.adapter_dtype), "backend": engine.backend.name,
                                         "weights": weights, "cpu": cpu,
                                         "cpu_kernel": engine.cpu_kernel}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
