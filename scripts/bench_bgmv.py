"""The BGMV kernel alone vs torch's bmm, over the LoRA shapes of one decode step of the embedded model.

210 modules (30 layers of q, k, v, o, gate, up, down at SmolLM2-135M's sizes), rank 8, one
adapter per row (8 rows, 8 adapters), in the engine's slot layout. Per "step" (one call per
module): the kernel (fp32 and bf16 weights); torch's bmm pair with the rows' A/B gathered
beforehand (the engine's torch path between changes of rows) and with the gather (when rows
change); and ``sum()`` over the same bytes, a floor for reading them. Interleaved rounds;
prints medians.

    .venv/bin/python scripts/bench_bgmv.py [--rows N] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_kit.engine.backends import bgmv  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * 30
RANK = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="rows, each with its own adapter (default 8)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps timed per round")
    args = ap.parse_args()
    if not bgmv.load():
        sys.exit(f"the kernel is not available: {bgmv.error()}")
    op = bgmv.op()
    n = args.rows
    g = torch.Generator().manual_seed(0)
    stacks = [
        (torch.randn(n + 1, RANK, i, generator=g) * 0.02, torch.randn(n + 1, RANK, o, generator=g) * 0.02)
        for i, o in SHAPES
    ]
    stacks_bf16 = [(a.bfloat16(), b.bfloat16()) for a, b in stacks]
    slots = torch.arange(n)
    xs = [torch.randn(n, 1, i, generator=g) for i, _ in SHAPES]
    outs = [torch.randn(n, 1, o, generator=g) for _, o in SHAPES]

    def gather() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(a.index_select(0, slots), b.index_select(0, slots)) for a, b in stacks]  # as the engine's torch path

    gathered = gather()
    flat = [torch.cat([a[:n].flatten(), b[:n].flatten()]) for a, b in stacks]
    nbytes = sum(f.numel() * 4 for f in flat)

    def kernel(weights) -> None:
        for (a, b), x, out in zip(weights, xs, outs):
            op(out, x, a, b, slots)

    def bmm(weights) -> None:
        for (a_rows, b_rows), x, out in zip(weights, xs, outs):
            out.baddbmm_(torch.bmm(x, a_rows.transpose(1, 2)), b_rows)

    runs = {
        "BGMV kernel, fp32": lambda: kernel(stacks),
        "BGMV kernel, bf16 weights": lambda: kernel(stacks_bf16),
        "torch bmm pair, gathered beforehand": lambda: bmm(gathered),
        "torch bmm pair, with the gather": lambda: bmm(gather()),
        "sum() over the same fp32 bytes": lambda: [f.sum() for f in flat],
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            run()
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[key].append((time.perf_counter() - start) / args.steps)
    print(f"{len(SHAPES)} modules, rank {RANK}, {n} rows / {n} adapters, {torch.get_num_threads()} threads; "
          f"fp32 adapters: {nbytes / 2**20:.1f} MiB per step")  # fmt: skip
    print("| per step | ms | GB/s of the fp32 bytes |")
    print("|---|---:|---:|")
    for key, ts in times.items():
        t = median(ts)
        print(f"| {key} | {1000 * t:.2f} | {nbytes / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
