"""Where a decode step's time goes: the base's products against everything else, and what one product costs.

Two measurements, in one process, on the embedded model with the engine's own packed weights
(``--weight-dtype``, default ``auto``), nothing else running:

1. The lean decode step (``engine/decode_step.py``) of ``--rows`` rows over a growing cache, timed
   as served, then again with every base product replaced by a ready output of the right shape
   (no product, no casts): the difference is what the products cost, the rest is norms, rotary,
   attention, the LoRA wrappers and Python.
2. One product per call as a decode step makes it: a fresh weight each call (as many copies as fill
   ~400 MB, so none stays in cache, as in a step that reads 256 MB of weights), a bf16 weight on
   each CPU path in turn: the CPU's own (``auto``: tiled for lora-kit's kernel where the CPU has
   AMX), an AVX-512 CPU's without AMX (``LORA_KIT_CPU_ISA=avx512``: oneDNN-packed) and an AVX2
   CPU's (``avx2``: dense, lora-kit's AVX2 kernel), at 1, 4, 8 and 32 rows; microseconds per call
   and the GB/s of weight bytes that makes. The decode step of 1. runs the path the environment
   sets (``LORA_KIT_CPU_ISA``, default the CPU's own).

    .venv/bin/python scripts/profile_decode_step.py [--rows 1] [--weight-dtype auto]

Prints the CPU and a plain streaming read of 256 MB (``torch.sum``: the memory bandwidth two
threads reach) to set the products' GB/s against.
"""

from __future__ import annotations

import argparse
import os
import time

from _harness import cpu_summary

SHAPES = [(192, 576), (576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096), (14336, 4096)]


def step_ms(model, tokenizer, rows: int, rounds: int = 5, steps: int = 60) -> float:
    """Best ms per lean decode step of ``rows`` rows over ``steps`` steps from a short prompt."""
    import torch
    from transformers import DynamicCache

    from lora_kit.engine.decode_step import LeanDecoder
    from lora_kit.engine.kv_cache import growing_cache, layer_kv

    lean = LeanDecoder.for_model(model)
    ids = torch.tensor([tokenizer.encode("The capital of France is a city that")] * rows)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(), use_cache=True)
        kv = layer_kv(out.past_key_values)
        best = float("inf")
        for _ in range(rounds):
            cache, mask, token = growing_cache(kv, extra=steps + 8), torch.ones_like(ids), ids[:, -1:]
            start = time.perf_counter()
            for i in range(steps):
                mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
                token = lean(token, mask, torch.full((rows, 1), ids.shape[1] + i), cache).argmax(-1, keepdim=True)
            best = min(best, (time.perf_counter() - start) / steps)
    return 1000 * best


def without_products(model) -> None:
    """Replace every base product of ``model`` by a ready output of its shape (zeros)."""
    import torch

    from lora_kit.engine.backends.int8_linear import Int8Linear
    from lora_kit.engine.backends.packed_linear import PackedLinear

    ready: dict[tuple, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, (PackedLinear, Int8Linear)):

            def forward(x, n=module.out_features):
                key = (*x.shape[:-1], n)
                if key not in ready:
                    ready[key] = torch.zeros(key)
                return ready[key]

            module.forward = forward


def product_us(out_features: int, in_features: int, rows: int, isa: str) -> tuple[float, str]:
    """Microseconds per call of a bf16 product of ``rows`` fp32 rows, a fresh weight each call, on
    the path ``$LORA_KIT_CPU_ISA=isa`` takes; and that path's layout."""
    import torch
    from torch import nn

    from lora_kit.engine.backends.packed_linear import ISA_ENV, PackedLinear

    given = os.environ.get(ISA_ENV)
    os.environ[ISA_ENV] = isa  # read when a layer is made: its path is fixed then
    copies = max(2, min(400, 400_000_000 // (2 * out_features * in_features)))
    try:
        layers = [
            PackedLinear(nn.Linear(in_features, out_features, bias=False), 8, torch.bfloat16) for _ in range(copies)
        ]
    finally:
        if given is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = given
    x = torch.randn(rows, 1, in_features)
    best = float("inf")
    with torch.inference_mode():
        for layer in layers:
            layer(x)
        for _ in range(3):
            start = time.perf_counter()
            for layer in layers:
                layer(x)
            best = min(best, (time.perf_counter() - start) / copies)
    return 1e6 * best, layers[0].layout


def stream_gbs() -> float:
    import torch

    data = torch.ones(64 * 1024 * 1024)  # 256 MB of fp32
    data.sum()
    start = time.perf_counter()
    for _ in range(5):
        data.sum()
    return 5 * data.numel() * 4 / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--weight-dtype", default="auto")
    args = ap.parse_args()

    import torch

    from lora_kit import models
    from lora_kit.engine import Engine, EngineConfig

    torch.set_num_threads(2)
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    config = EngineConfig(model=models.DEFAULT_MODEL, max_batch=8, prefix_cache_mib=0, weight_dtype=args.weight_dtype)
    engine = Engine(config, tokenizer=tokenizer)
    served = step_ms(engine.model, tokenizer, args.rows)
    without_products(engine.model)
    rest = step_ms(engine.model, tokenizer, args.rows)
    from _harness import weight_summary

    print(f"CPU: {cpu_summary()}; 2 threads; streaming read of 256 MB: {stream_gbs():.1f} GB/s")
    print(f"embedded model, {args.rows} row(s), weights {weight_summary(engine.model)}: lean decode step "
          f"{served:.2f} ms; without the base's products {rest:.2f} ms; the products {served - rest:.2f} ms "
          f"({100 * (served - rest) / served:.0f}%)\n")  # fmt: skip
    isas = ("auto", "avx512", "avx2")
    header = "| weight (out x in) | rows |"
    for out_features, in_features in SHAPES:
        for rows in (1, 4, 8, 32):
            timed = [product_us(out_features, in_features, rows, isa) for isa in isas]
            if header:
                print(header + "".join(f" {isa}: {layout} us | GB/s |" for isa, (_, layout) in zip(isas, timed)))
                print("|---|---:|" + "---:|---:|" * len(isas))
                header = ""
            size = 2 * out_features * in_features / 1e3  # MB per call times 1e6 us: GB/s = bytes / us / 1e3
            cells = "".join(f" {us:.1f} | {size / us:.1f} |" for us, _ in timed)
            print(f"| {out_features} x {in_features} | {rows} |{cells}", flush=True)


if __name__ == "__main__":
    main()
