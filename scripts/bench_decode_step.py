"""What a decode step costs with 8 distinct adapters vs the base: the LoRA path's overhead, per step.

Three engines on the embedded model in one process: the BGMV kernel with fp32 adapters (the
default), the kernel with bf16 adapters, and torch's bmm (the torch backend, ``backend="torch"``:
an engine argument, so that one process holds both). For each,
8 requests generate 72 and then 8 tokens, on the base and on 8 distinct rank-8 all-linear
adapters; the difference of the two runs divided by 64 is the time of one decode step,
without prefill. Rounds interleave every measurement; prints medians.

    .venv/bin/python scripts/bench_decode_step.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import median

from _harness import QUESTIONS, cpu_summary, random_adapters, timed_engine, weight_summary

from lora_kit import chat, models
from lora_kit.engine import Engine, EngineConfig, mapping_resolver
from lora_kit.engine.threads import dedicate_cpu_threads

LONG, SHORT = 72, 8
CONFIGS = {  # label -> (adapter dtype, backend; None: chosen by platform)
    "BGMV kernel, fp32 adapters": (None, None),
    "BGMV kernel, bf16 adapters": ("bfloat16", None),
    "torch bmm, fp32 adapters": (None, "torch"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    args = ap.parse_args()
    threads = dedicate_cpu_threads()
    tokenizer = models.load_tokenizer(args.model)
    prompts = [chat.render_prompt(tokenizer, q) for q in QUESTIONS[:8]]
    names = [f"a{i}" for i in range(8)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
    try:
        dirs = random_adapters(Path(models.resolve(args.model)), tmp, names)
        engines = {}
        for label, (dtype, backend) in CONFIGS.items():
            config = EngineConfig(model=args.model, max_slots=8, max_batch=8, adapter_dtype=dtype)
            engines[label] = Engine(
                config, tokenizer=tokenizer, adapter_resolver=mapping_resolver(dirs), backend=backend
            )
            for n in names:
                engines[label].check_adapter(n)
            timed_engine(engines[label], prompts, names, 2)  # warm-up
        steps: dict[tuple[str, str], list[float]] = {(c, w): [] for c in CONFIGS for w in ("base", "mixed")}
        for r in range(args.rounds):
            for label, engine in engines.items():
                for which, adapters in (("base", [None] * 8), ("mixed", names)):
                    long, short = (
                        timed_engine(engine, prompts, adapters, LONG),
                        timed_engine(engine, prompts, adapters, SHORT),
                    )
                    steps[label, which].append((long - short) / (LONG - SHORT))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    weights = {label: weight_summary(engine.model) for label, engine in engines.items()}
    print(f"\nmodel {args.model}, fp32 activations, {threads} threads, 8 requests, {args.rounds} rounds; "
          f"ms per decode step (median)\nCPU: {cpu_summary()}")  # fmt: skip
    for label, summary in weights.items():
        print(f"{label}: base linear weights {summary}")
    print("| LoRA path | base ms/step | 8 adapters ms/step | LoRA ms/step | 8 adapters vs base |")
    print("|---|---:|---:|---:|---:|")
    for label in CONFIGS:
        base, mixed = steps[label, "base"], steps[label, "mixed"]
        ratio = median(b / m for b, m in zip(base, mixed))
        print(f"| {label} | {1000 * median(base):.1f} | {1000 * median(mixed):.1f} | "
              f"{1000 * (median(mixed) - median(base)):.1f} | {ratio:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
