"""lora-kit's bf16 products on its tiled layout (``csrc/bf16_tiles.cpp``): AVX512-BF16 dot products
for a few rows, AMX tiles for more, against float64 references of the same rounded inputs (the
outputs stay fp32), at the row counts the engine runs and the widths of the embedded model and of
Mistral-7B.

The op is tested where the CPU can run it (skipped elsewhere: AVX2 machines take the dense path,
tested in ``test_packed_linear.py``); its dot path is tested for every row count too (what a CPU
with AVX512-BF16 but no AMX runs), by raising the op's row limit for it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_kit.engine.backends import bgmv, packed_linear
from lora_kit.engine.backends.packed_linear import ISA_ENV, PackedLinear, from_tiles, to_tiles

DOT, AMX = 1, 2  # bits of bf16_tiles_caps()


def caps() -> int:
    return int(torch.ops.lora_kit.bf16_tiles_caps()) if bgmv.load() else 0


def needs(bits: int) -> None:
    if caps() & bits != bits:
        pytest.skip(
            "this CPU (or build) has no " + ("AMX" if bits & AMX else "AVX512-BF16") + " for the tiled products"
        )


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 of bf16(x) @ w^T + bias: the exact sum of the rounded terms."""
    y = x.bfloat16().double() @ w.double().T
    return y if bias is None else y + bias.double()


def tiled_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, max_dot_rows: int) -> torch.Tensor:
    return torch.ops.lora_kit.bf16_tiles_linear(x, to_tiles(w), bias, max_dot_rows)


def assert_fp32_sums(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` is fp32, not rounded to bf16, and within fp32 summation error of ``want``: 1e-5 of
    the sum of the terms' magnitudes (100x what fp32 sums of random terms lose; a term left out or
    counted twice is off by about 1/K of it)."""
    assert got.dtype == torch.float32 and not torch.equal(got, got.bfloat16().float())
    magnitude = x.bfloat16().double().abs() @ w.double().abs().T
    assert bool(((got.double() - want).abs() <= 1e-5 * magnitude + 1e-6).all())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 16, 17, 32, 33, 100])
@pytest.mark.parametrize(("out_features", "in_features"), [(192, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("path", ["engine's choice", "dot only"])
def test_tiled_products_equal_a_float64_reference_with_the_same_roundings(rows, out_features, in_features, path):
    """The embedded model's widths (k/v, gate/up, down). ``engine's choice``: the dot products up
    to TILES_MAX_DOT_ROWS rows, AMX above (both paths and the partial tiles of 17, 33 and 100 rows);
    ``dot only``: every row count on the dot products, as on a CPU without AMX."""
    needs(DOT if path == "dot only" else DOT | AMX)
    gen = torch.Generator().manual_seed(rows * out_features)
    w = (torch.randn(out_features, in_features, generator=gen) * 0.05).bfloat16()
    x = torch.randn(rows, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if rows % 2 else None
    limit = packed_linear.TILES_MAX_DOT_ROWS if path == "engine's choice" else 1 << 30
    got = tiled_product(x, w, bias, limit)
    assert_fp32_sums(got, x, w, reference(x, w, bias))


@pytest.mark.parametrize("rows", [1, 4, 8, 32])
def test_tiled_products_at_mistral_7b_widths(rows):
    """Mistral-7B's q/o (4096 x 4096) and down (4096 x 14336) projections."""
    needs(DOT | AMX)
    gen = torch.Generator().manual_seed(rows)
    for out_features, in_features in [(4096, 4096), (4096, 14336)]:
        w = (torch.randn(out_features, in_features, generator=gen) * 0.02).bfloat16()
        x = torch.randn(rows, in_features, generator=gen)
        got = tiled_product(x, w, None, packed_linear.TILES_MAX_DOT_ROWS)
        assert_fp32_sums(got, x, w, reference(x, w, None))


def test_the_tiled_layout_round_trips_and_the_op_checks_its_inputs():
    w = torch.randn(48, 64).bfloat16()
    tiles = to_tiles(w)
    assert tiles.shape == (3, 32, 16, 2) and torch.equal(from_tiles(tiles), w)
    assert torch.equal(tiles[1, 5, 7], w[16 + 7, 10:12])  # block 1, pair 5, output 7: w[23, 10], w[23, 11]
    needs(DOT)
    op = torch.ops.lora_kit.bf16_tiles_linear
    x = torch.randn(2, 5, 64)
    y = op(x, tiles, None, 2)  # any leading shape; a strided or bf16 x is taken as fp32 and contiguous
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    assert torch.equal(op(x.transpose(0, 1).contiguous().transpose(0, 1), tiles, None, 2), y)
    assert torch.equal(op(x.bfloat16(), tiles, None, 2), y)  # x is rounded to bf16 on the way in anyway
    with pytest.raises(RuntimeError, match="shapes do not match"):
        op(torch.randn(2, 32), tiles, None, 2)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        op(torch.randn(2, 48), to_tiles(torch.randn(48, 48).bfloat16()), None, 2)  # K % 32
    with pytest.raises(RuntimeError, match="weight must be a contiguous bfloat16"):
        op(x, tiles.float(), None, 2)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32"):
        op(x, tiles, torch.ones(47), 2)


def test_a_tiled_packed_linear_matches_the_onednn_packed_one(monkeypatch):
    """The engine's layer: tiled on an AMX CPU, oneDNN-packed on the AVX-512 path; the same numbers
    but for oneDNN's rounding of its outputs to bf16, at one row and at a prefill's."""
    needs(DOT | AMX)
    torch.manual_seed(0)
    layer = nn.Linear(576, 192)
    tiled = PackedLinear(layer, 8, torch.bfloat16)
    monkeypatch.setenv(ISA_ENV, "avx512")
    onednn = PackedLinear(layer, 8, torch.bfloat16)
    assert tiled.tiled and tiled.layout == "tiled (AMX)" and onednn.onednn and not onednn.tiled
    assert torch.equal(tiled.dense_weight(), onednn.dense_weight())
    for rows in (1, 37):
        x = torch.randn(rows, 576)
        with torch.inference_mode():
            got, want = tiled(x), onednn(x)
        assert torch.equal(want, want.bfloat16().float()) and not torch.equal(got, got.bfloat16().float())
        # rounded as oneDNN rounds, the same but for a last bit where two sums straddle a rounding boundary
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)
        assert (got.bfloat16().float() != want).float().mean() < 0.05
