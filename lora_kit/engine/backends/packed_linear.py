"""Linear layers with weights pre-packed for oneDNN: the CPU decode step's matmuls, faster.

A decode step multiplies a few rows by every weight matrix. On the CPU, ``nn.Linear``
runs these skinny products at a fraction of memory bandwidth (measured on a 2-core AVX-512
VM: a 576 x 1536 fp32 weight times 8 rows, 9 GB/s of a 30 GB/s machine). oneDNN's linear
with the weight reordered once into its blocked layout (what PyTorch's Inductor does
when it freezes a CPU graph) runs the same product 2.5x faster, and the whole base-model
decode step of the embedded model ~1.8x faster, output head included.

The packed weight replaces the dense one (no second copy), except for an output head tied
to the input embeddings, which keeps the dense table for the embedding lookup. The results
differ from ``nn.Linear`` by float rounding only (another summation order, ~1e-6 relative);
the torch backend (:mod:`lora_kit.engine.backends`) keeps transformers' own kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_pack(layer: nn.Module) -> bool:
    """Whether ``layer`` is a dense CPU ``nn.Linear`` oneDNN can pack (4-bit layers are not)."""
    if type(layer) is not nn.Linear:  # bitsandbytes' Linear4bit subclasses nn.Linear
        return False
    weight = layer.weight
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES or weight.is_mkldnn:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout. Inference only."""

    def __init__(self, layer: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        # The layout is tuned for ``batch_hint`` rows; any row count works (measured: hints
        # of 8 and 32 run 1 to 32 rows equally well, a hint of 1 is 1.8x slower at 8 rows).
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), batch_hint)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        """The weight in the usual (out, in) layout (a copy)."""
        return self.weight.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, oneDNN-packed"


def pack_output_head(model: PreTrainedModel, batch_hint: int) -> bool:
    """Replace the model's output head by a packed copy; False when it cannot be packed.

    A head tied to the input embeddings shares its table with the embedding lookup, which
    needs the dense layout: the head then gets its own packed copy (one more vocab x hidden
    matrix in memory); an untied head is packed in place.
    """
    head = model.get_output_embeddings()
    if head is None or not can_pack(head):
        return False
    model.set_output_embeddings(PackedLinear(head, batch_hint))
    return True


def copy_unpacked_weights(model: nn.Module) -> None:
    """Give the parameters and buffers that stayed dense (embeddings, norms) memory of their own.

    transformers maps the safetensors checkpoint into memory and the loaded tensors are views
    of that mapping; one surviving view keeps every page of the file that packing read
    resident (measured on the embedded model: 0.68 GiB of file pages next to the 0.5 GiB of
    packed weights). Copying the few dense tensors left lets the mapping go.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_mkldnn:
                tensor.data = tensor.data.clone()
