"""Weight-only int8 linear layers for the CPU engine (``weight_dtype="int8"``).

A decode step reads every base weight once, so on a CPU its time is the weights' bytes over the
memory bandwidth: a 7B base is 14.5 GB per step in bf16, 7.6 GB in int8. Each weight row is cut
into blocks of :data:`GROUP` inputs, each block stored as int8 with one fp32 scale (its largest
magnitude over 127: llama.cpp's Q8_0 blocks, with fp32 scales), so a weight is off by at most half
its block's step. Activations stay fp32: the product is the dequantized weight times the fp32
rows, summed in fp32 (no rounding of the activations, unlike llama.cpp's Q8_0 x Q8_0 products).

The weight is stored in panels of :data:`PANEL` output rows interleaved along the inputs, the
layout the kernel (``csrc/wo_linear.cpp``, built with the BGMV kernel) reads: up to
:data:`KERNEL_MAX_ROWS` rows (decode steps and most prefills) take the kernel; more rows, or a machine
where the kernel could not be built, widen :data:`BLOCK_PANELS` panels at a time to fp32 and
multiply them with torch's GEMM.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_kit.engine.backends import bgmv

GROUP = 32  # inputs per scale (a divisor of K is used where K is not a multiple of it)
PANEL = 16  # output rows per panel: kNR in wo_linear.cpp
# The kernel beat torch's GEMM on widened blocks at every row count measured (AVX2 EPYC, 14336 x
# 4096: 33 rows 26 ms against 88, 256 rows 181 against 244; oneDNN's fp32 GEMM took 188): prefill
# takes it too, up to the largest count measured.
KERNEL_MAX_ROWS = 256
BLOCK_PANELS = 8  # panels widened at a time on the torch path: 128 weight rows
QUANTIZE_ROWS = 1024  # weight rows quantized at a time: bounds the fp32 temporaries


def group_size(in_features: int) -> int:
    """The block size for rows of ``in_features``: :data:`GROUP`, or its largest divisor that
    divides ``in_features`` (the kernel needs whole blocks)."""
    return math.gcd(in_features, GROUP)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (N, K), any float dtype -> ``qweight`` (P, K, 16) int8 and ``scales`` (P, K / G, 16)
    fp32, P = ceil(N / 16), rows past N zero. Symmetric: ``q = round(w / s)``, ``s = max|w| / 127``
    over each block of G inputs (an all-zero block gets scale 0)."""
    n, k = weight.shape
    g = group_size(k)
    panels = -(-n // PANEL)
    q = torch.zeros(panels * PANEL, k, dtype=torch.int8)
    scales = torch.zeros(panels * PANEL, k // g, dtype=torch.float32)
    for r0 in range(0, n, QUANTIZE_ROWS):
        rows = weight[r0 : r0 + QUANTIZE_ROWS].detach().to(torch.float32).reshape(-1, k // g, g)
        scale = rows.abs().amax(-1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q[r0 : r0 + rows.shape[0]] = torch.round(rows / safe[..., None]).clamp_(-127, 127).to(torch.int8).reshape(-1, k)
        scales[r0 : r0 + rows.shape[0]] = scale
    interleaved = q.reshape(panels, PANEL, k).transpose(1, 2).contiguous()
    return interleaved, scales.reshape(panels, PANEL, k // g).transpose(1, 2).contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """The (N, K) fp32 weight ``qweight`` and ``scales`` stand for (q * scale, one fp32 rounding)."""
    return _widen_panels(qweight, scales)[:out_features]


def _widen_panels(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Panels (p, K, 16) and their scales (p, K / G, 16) -> the (p * 16, K) fp32 weight rows."""
    panels, k, _ = qweight.shape
    g = k // scales.shape[1]
    widened = qweight.to(torch.float32).reshape(panels, k // g, g, PANEL) * scales[:, :, None, :]
    return widened.reshape(panels, k, PANEL).transpose(1, 2).reshape(panels * PANEL, k)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as blockwise int8 (see the module). Inference only; ``x``
    and ``y`` keep ``io_dtype`` (the model's, fp32), the products computing in fp32."""

    def __init__(self, layer: nn.Linear, io_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.io_dtype = io_dtype or layer.weight.dtype
        qweight, scales = quantize(layer.weight)
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        bias = None if layer.bias is None else layer.bias.detach().to(torch.float32).contiguous()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # One op that takes x as it comes and returns y (a decode step calls it ~200 times).
        self._kernel = torch.ops.lora_kit.wo_int8_linear.default if bgmv.load() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.numel() <= KERNEL_MAX_ROWS * self.in_features:
            out = self._kernel(x, self.qweight, self.scales, self.bias, self.out_features)
        else:
            rows = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
            out = self._widened_by_blocks(rows).reshape(*x.shape[:-1], self.out_features)
        return out if self.io_dtype == torch.float32 else out.to(self.io_dtype)

    def _widened_by_blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """The product through torch: :data:`BLOCK_PANELS` panels widened to fp32 at a time, each
        multiplied by GEMM (the weight is never held in fp32 whole)."""
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        step = BLOCK_PANELS * PANEL
        for p0 in range(0, self.qweight.shape[0], BLOCK_PANELS):
            n0, n1 = p0 * PANEL, min(self.out_features, p0 * PANEL + step)
            block = _widen_panels(self.qweight[p0 : p0 + BLOCK_PANELS], self.scales[p0 : p0 + BLOCK_PANELS])
            torch.mm(rows, block[: n1 - n0].t(), out=out[:, n0:n1])
        if self.bias is not None:
            out += self.bias
        return out

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight in the usual (out, in) layout, fp32 (a copy)."""
        return dequantize(self.qweight, self.scales, self.out_features)

    def extra_repr(self) -> str:
        g = self.in_features // self.scales.shape[1]
        kernel = "kernel" if self._kernel is not None else "torch"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int8 blocks of {g} ({kernel})"
        )
