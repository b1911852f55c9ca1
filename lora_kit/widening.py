"""An embedding table held in 16 bits whose lookups come back in the model's compute dtype.

Owned here, below both users: :func:`lora_kit.models.load_model` keeps a 16-bit checkpoint's table as
stored when the linear weights stay 16-bit (never an fp32 copy of it, not even for a moment), and the
CPU backend (:mod:`lora_kit.engine.backends.packed_linear`) narrows an fp32 table when it packs the
weights in bf16 or int8.
"""

from __future__ import annotations

import torch
from torch import nn


class WideningEmbedding(nn.Module):
    """An embedding table held in a narrower dtype (bf16) whose lookups come back in ``io_dtype``
    (default: the table's dtype before narrowing, e.g. fp32): the rows a step reads are widened,
    the table takes half the memory. The table is ``embedding``'s own when it is in ``dtype``
    already (no copy), or ``table``, a parameter holding the same rows in ``dtype`` (shared)."""

    def __init__(
        self,
        embedding: nn.Module,
        dtype: torch.dtype,
        io_dtype: torch.dtype | None = None,
        table: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.io_dtype = io_dtype or embedding.weight.dtype
        if table is None:
            table = nn.Parameter(embedding.weight.detach().to(dtype), requires_grad=False)
        elif table.dtype != dtype or table.shape != embedding.weight.shape:
            raise ValueError(f"a shared table must be {dtype} of shape {tuple(embedding.weight.shape)}")
        self.weight = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).to(self.io_dtype)


def lookup_dtype(embedding: nn.Module) -> torch.dtype:
    """The dtype ``embedding``'s lookups return: the model's compute dtype (a widening table's
    ``io_dtype``, else its table's dtype)."""
    return embedding.io_dtype if isinstance(embedding, WideningEmbedding) else embedding.weight.dtype
