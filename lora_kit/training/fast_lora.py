"""A faster training forward for PEFT's LoRA linear layers on the CPU (fp32, no autocast).

PEFT computes ``base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``. On a CPU step of a
small model, two parts of that cost more than the LoRA products themselves (a torch.profiler
run of the demo recipe: ``bernoulli_`` 20% of a step, elementwise ``mul`` 10%):

- the dropout mask: ``nn.Dropout`` draws one random float per element; here the mask comes from
  16 random bits per element (8x fewer random bits, one ``randint`` over int64 words viewed as
  int16), so an element is dropped with probability ``round(p * 65536) / 65536`` (p = 0.05 ->
  0.0500031) and kept ones are scaled by ``1 / (1 - that)``: the same distribution as PEFT's up
  to that rounding, an independent mask per projection, drawn from torch's generator (seeded,
  checkpointed, replayed by gradient checkpointing);
- the autograd graph: one function computes ``scaling * B(A(drop(x)))`` and saves ``x`` (shared
  by q/k/v and by gate/up, so saved once), a 1-byte mask and the (tokens x r) product, instead of
  a 4-byte dropped-out copy of ``x`` per projection; ``scaling`` is applied to the rank-r
  products, not to the (tokens x out) output; no defensive clone of the base output.

The weights, their names and the exported adapter are PEFT's; in eval mode or with ``p = 0``
the result equals PEFT's. Layers this does not cover (autocast / bf16 compute, several active
adapters, DoRA and other variants, merged or disabled adapters) keep PEFT's own forward.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch

MASK_LEVELS = 1 << 16  # the dropout probability is rounded to a multiple of 1/65536


def drop_probability(p: float) -> float:
    """The dropout probability the 16-bit masks realize for a requested ``p``."""
    return round(p * MASK_LEVELS) / MASK_LEVELS


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor of ``shape``: True (dropped) with probability ``drop_probability(p)``, independently.

    Draws 64-bit words (4 elements each) and compares their 16-bit lanes with a threshold.
    """
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform over -32768..32767
    return lanes < -32768 + round(p * MASK_LEVELS)


def _drop(x: torch.Tensor, dropped: torch.Tensor | None, keep_scale: float) -> torch.Tensor:
    """``x`` with the ``dropped`` elements zeroed and the others scaled by ``keep_scale`` (a new tensor)."""
    return x if dropped is None else x.masked_fill(dropped, 0.0).mul_(keep_scale)


class LoraDelta(torch.autograd.Function):
    """``scaling * drop(x) @ A^T @ B^T`` with ``drop(x) = x * keep_scale``, zero where ``dropped``.

    Shapes: x (..., in), a (r, in), b (out, r), dropped bool (..., in) or None; returns (..., out).
    Saves x, the mask and the (..., r) product; drop(x) is recomputed in backward (one pass).
    """

    @staticmethod
    def forward(ctx: Any, x, a, b, dropped, keep_scale: float, scaling: float):  # type: ignore[override]
        h = (_drop(x, dropped, keep_scale) @ a.t()).mul_(scaling)  # (..., r): scaling folded into the small product
        ctx.save_for_backward(x, a, b, dropped, h)
        ctx.keep_scale = keep_scale
        ctx.scaling = scaling
        return h @ b.t()

    @staticmethod
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        x, a, b, dropped, h = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_b = g.t() @ h.reshape(-1, h.shape[-1]) if ctx.needs_input_grad[2] else None
        grad_h = (g @ b).mul_(ctx.scaling)  # (N, r)
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_a = grad_h.t() @ _drop(x, dropped, ctx.keep_scale).reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ a).view(x.shape)
            if dropped is not None:
                grad_x = grad_x.masked_fill_(dropped, 0.0).mul_(ctx.keep_scale)
        return grad_x, grad_a, grad_b, None, None, None


def _single_adapter(layer: Any) -> str | None:
    """The one plain-LoRA adapter the fast path can compute for ``layer``, else None."""
    adapters = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(adapters) != 1:
        return None
    name = adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if layer.lora_B[name].bias is not None or torch.is_autocast_enabled():
        return None
    return name


def _fast_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The replacement ``forward`` of one PEFT LoRA linear layer (``self``)."""
    name = None if args or kwargs else _single_adapter(self)
    a = self.lora_A[name].weight if name else None
    if name is None or x.dtype != a.dtype or x.dtype != self.lora_B[name].weight.dtype:
        return self._lora_kit_peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    dropped = drop_mask(x.shape, p, x.device) if drop_probability(p) > 0 else None
    keep_scale = 1.0 / (1.0 - drop_probability(p))
    delta = LoraDelta.apply(x, a, self.lora_B[name].weight, dropped, keep_scale, float(self.scaling[name]))
    return self.base_layer(x) + delta


def install(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA linear layer of ``model`` the fast training forward; returns how many.

    Idempotent; each layer keeps PEFT's forward as ``_lora_kit_peft_forward`` for what it does not cover.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        if not isinstance(module.get_base_layer(), torch.nn.Linear):  # Linear and bnb's Linear4bit/8bit
            continue
        if not hasattr(module, "_lora_kit_peft_forward"):
            module._lora_kit_peft_forward = module.forward
            module.forward = types.MethodType(_fast_forward, module)
        count += 1
    return count
