"""Benchmark lora-kit's weight-only int8 and bf16 products against torch's own at Mistral-7B's shapes.

For each weight shape and row count (the rows a decode step multiplies: one per running request),
side by side in one process, best of three rounds:

- ``lora-kit int8``: :class:`lora_kit.engine.backends.int8_linear.Int8Linear` (``serve
  --weight-dtype int8``): the CPU kernel up to 32 rows;
- ``lora-kit bf16``: :class:`~lora_kit.engine.backends.packed_linear.PackedLinear` with a dense
  bf16 weight on the AVX2 path (``LORA_KIT_CPU_ISA=avx2``, what CPUs without AVX-512 run): the
  kernel up to 32 rows, bf16 in and out as torch's bf16 product;
- ``torch int8pack``: ``aten._weight_int8pack_mm``, torch's weight-only int8 product (per-row
  scales; it takes bf16 activations: fp32 ones run a slow path);
- ``torch bf16``: ``F.linear`` with bf16 weights and activations (what a bf16 model runs);
- ``torch fp32``: ``F.linear`` in fp32.

Prints milliseconds, the int8 weight bytes read per second, and lora-kit int8's speed-up over
each, and lora-kit bf16's over torch bf16.

    .venv/bin/python scripts/bench_int8_linear.py [--rows 1,8,32] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_kit.engine.backends import bgmv  # noqa: E402
from lora_kit.engine.backends.int8_linear import Int8Linear  # noqa: E402
from lora_kit.engine.backends.packed_linear import ISA_ENV, PackedLinear  # noqa: E402

SHAPES = {"q_proj (4096 x 4096)": (4096, 4096), "up_proj (14336 x 4096)": (14336, 4096), "down_proj (4096 x 14336)": (4096, 14336)}  # fmt: skip


def best_ms(fn, calls: int = 8, rounds: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def bench_shape(out_features: int, in_features: int, rows: list[int]) -> list[dict]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=False)
    ours = Int8Linear(layer)
    os.environ[ISA_ENV] = "avx2"
    ours_bf16 = PackedLinear(layer, 8, torch.bfloat16)
    weight = layer.weight.detach()
    w_bf16 = weight.to(torch.bfloat16)
    row_scale = weight.abs().amax(1) / 127
    w_int8 = torch.round(weight / row_scale[:, None]).clamp(-127, 127).to(torch.int8)
    results = []
    for m in rows:
        x = torch.randn(m, in_features)
        x_bf16 = x.to(torch.bfloat16)
        with torch.inference_mode():
            times = {
                "lora-kit int8": best_ms(lambda x=x: ours(x)),
                "lora-kit bf16": best_ms(lambda x=x: ours_bf16(x)),
                "torch int8pack": best_ms(
                    lambda x_bf16=x_bf16: torch.ops.aten._weight_int8pack_mm(
                        x_bf16, w_int8, row_scale.to(torch.bfloat16)
                    )
                ),
                "torch bf16": best_ms(lambda x_bf16=x_bf16: torch.nn.functional.linear(x_bf16, w_bf16)),
                "torch fp32": best_ms(lambda x=x: torch.nn.functional.linear(x, weight)),
            }
        results.append({"rows": m, "ms": times})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,8,16,32", help="row counts, comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not bgmv.load():
        sys.exit(f"the CPU kernel could not be built: {bgmv.error()}")
    flags = " ".join(f for f in bgmv.cpu_flags().split() if f.startswith(("avx", "amx", "fma", "f16c")))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"# {cpu}; flags: {flags}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    rows = [int(r) for r in args.rows.split(",")]
    report = {"cpu": cpu, "flags": flags, "threads": torch.get_num_threads(), "shapes": {}}
    names = ("lora-kit int8", "lora-kit bf16", "torch int8pack", "torch bf16", "torch fp32")
    header = f"{'shape':26} {'rows':>4} " + " ".join(f"{k:>15}" for k in names)
    print(header + "   int8 vs int8pack, bf16, fp32   bf16 vs torch bf16")
    for name, (n, k) in SHAPES.items():
        report["shapes"][name] = results = bench_shape(n, k, rows)
        for r in results:
            t = r["ms"]
            ours = t["lora-kit int8"]
            cells = " ".join(f"{v:12.2f} ms" for v in t.values())
            ratios = "   ".join(f"{t[o] / ours:8.2f}x" for o in ("torch int8pack", "torch bf16", "torch fp32"))
            ratios += f"   {t['torch bf16'] / t['lora-kit bf16']:8.2f}x"
            gbps = n * k * 1.125 / ours / 1e6
            print(f"{name:26} {r['rows']:>4} {cells}   {ratios}   ({gbps:.1f} GB/s of int8 weights)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
