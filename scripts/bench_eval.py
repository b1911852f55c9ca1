"""Benchmark `lora-kit eval`'s throughput: one REF, three REFs one at a time, three REFs in one pass.

Runs on the embedded model (full precision, as `lora-kit serve` loads it on a CPU) with three
random rank-8 all-linear adapters, over held-out chat data (default: the sentiment eval set),
through the same engine path as `lora-kit eval` (:func:`lora_kit.evaluation.runner.score`).
The model loads once; every round times each variant once (greedy, ``--max-tokens``). Prints
the median seconds of each variant and its throughput in examples/s, where one example is one
(REF, case) answer: three REFs over 40 cases are 120 examples.

    .venv/bin/python scripts/bench_eval.py [--max-examples N] [--max-tokens N] [--rounds N] [--json out.json]

Smoke check (seconds): ``--max-examples 2 --max-tokens 4 --rounds 1``. Run the real figures on
an otherwise idle machine and record them in BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from statistics import median

from _harness import ROOT, cpu_summary, random_adapters

from lora_kit import models
from lora_kit.engine import mapping_resolver
from lora_kit.engine.threads import dedicate_cpu_threads
from lora_kit.evaluation import cases as cases_mod
from lora_kit.evaluation import runner

REFS = ["a0", "a1", "a2"]


def timed(engine, refs: list[str], cases: list, max_tokens: int) -> float:
    t0 = time.perf_counter()
    runner.score(engine, refs, cases, "exact_match", max_tokens)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "sentiment" / "eval.jsonl"))
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures here")
    args = parser.parse_args()

    dedicate_cpu_threads()
    cases = cases_mod.load_cases(args.data, args.max_examples)
    spec = models.DEFAULT_MODEL
    precision = runner.serving_precision()
    with tempfile.TemporaryDirectory() as tmp:
        # small weights (std 0.01): the answers stay text-like
        resolver = mapping_resolver(random_adapters(Path(models.resolve(spec)), Path(tmp), REFS, std=0.01))
        engine = runner.load_engine(
            spec, precision, adapter_resolver=resolver, adapters=len(REFS), requests=len(REFS) * len(cases)
        )
        variants = {
            "1 REF": lambda: timed(engine, REFS[:1], cases, args.max_tokens),
            "3 REFs one at a time": lambda: sum(timed(engine, [r], cases, args.max_tokens) for r in REFS),
            "3 REFs in one pass": lambda: timed(engine, REFS, cases, args.max_tokens),
        }
        answers = {"1 REF": 1, "3 REFs one at a time": 3, "3 REFs in one pass": 3}
        timed(engine, REFS, cases[:2], args.max_tokens)  # warm-up: adapters into their slots, kernels built
        seconds = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                seconds[name].append(run())
        engine.stop()
    rows = {
        name: {"seconds": median(s), "examples_per_s": answers[name] * len(cases) / median(s)}
        for name, s in seconds.items()
    }
    print(
        f"{len(cases)} cases of {args.data}, {spec} at {precision}, max {args.max_tokens} tokens, {args.rounds} rounds"
    )
    print(f"CPU: {cpu_summary()}")
    print(f"{'variant':<24}{'seconds':>10}{'examples/s':>12}")
    for name, row in rows.items():
        print(f"{name:<24}{row['seconds']:>10.2f}{row['examples_per_s']:>12.2f}")
    one_pass = rows["3 REFs in one pass"]["examples_per_s"] / rows["3 REFs one at a time"]["examples_per_s"]
    print(f"3 REFs in one pass vs one at a time: {one_pass:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": len(cases), "max_tokens": args.max_tokens, **rows}, indent=2))


if __name__ == "__main__":
    main()
