"""A KV cache that grows in place: a decode step writes one column, it does not copy the cache.

transformers' ``DynamicCache`` concatenates every layer's keys and values with the new
token at every step, so each step copies the whole cache (O(length) per step, O(length^2)
per request) into a freshly allocated tensor. On the CPU, large fresh allocations also
page-fault on first touch. Measured on the embedded model, 32 rows of ~100 tokens: the
concatenations took a third of a decode step.

:class:`GrowingLayer` keeps each layer's keys and values in a buffer with spare columns,
writes new tokens into them, and hands attention a view of the filled part. When the spare
columns run out it reallocates with room to grow (a copy every so often, amortised O(1)
per token). The buffers are rebuilt only when rows join or leave the batch.

The buffers may be held in a narrower dtype than the model computes in (the engine's
``kv_dtype``: bf16 next to bf16 weights halves the cache's bytes). ``update`` then stores
the new positions rounded to that dtype and hands a caller that computes in another dtype a
widened copy of everything filled (a prefill after cached prefix blocks, ``prefill._past``).
The lean decode step (:mod:`.decode_step`) attends in the stored dtype and takes views.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Spare columns on (re)allocation: at least this many, or half the length, whichever is
# more, so a long generation reallocates O(log length) times.
MIN_SPARE = 64


def spare_for(length: int) -> int:
    """Columns to reserve beyond ``length`` when a buffer is (re)allocated."""
    return max(MIN_SPARE, length // 2)


class GrowingLayer(DynamicLayer):
    """One layer's keys and values, (rows, heads, capacity, head_dim) in ``dtype``, filled up to ``length``."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        capacity: int | None = None,
        *,
        filled: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Copies ``keys``/``values`` into buffers of ``capacity`` (or more) columns in ``dtype``
        (default: theirs); with ``filled``, they are such buffers already, their first ``filled``
        columns filled: taken as they are."""
        super().__init__()
        self.dtype, self.device = dtype or keys.dtype, keys.device
        if filled is not None:
            self._k, self._v, length = keys.to(self.dtype), values.to(self.dtype), filled
        else:
            length = keys.shape[2]
            capacity = max(capacity or 0, length + spare_for(length))
            self._k = _with_capacity(keys, capacity, self.dtype)
            self._v = _with_capacity(values, capacity, self.dtype)
        self.length = length
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions after the filled part; return everything filled: views, or
        copies widened to the caller's dtype when the buffers are narrower."""
        end = self.length + key_states.shape[2]
        if end > self.capacity:
            self._k = _with_capacity(self._k[:, :, : self.length], end + spare_for(end))
            self._v = _with_capacity(self._v[:, :, : self.length], end + spare_for(end))
        self._k[:, :, self.length : end].copy_(key_states)
        self._v[:, :, self.length : end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        if key_states.dtype != self.dtype:
            return self.keys.to(key_states.dtype), self.values.to(key_states.dtype)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    # The engine itself rebuilds the cache when rows leave (RunningBatch.keep, which also trims
    # padding); these keep the layer a complete DynamicLayer for transformers' own generate
    # (assisted decoding crops, beam search reorders rows).

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' convention: negative)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the negative number of positions to drop, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (spare columns kept)."""
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows at ``indices`` (spare columns kept)."""
        self._k = self._k.index_select(0, indices.to(self._k.device))
        self._v = self._v.index_select(0, indices.to(self._v.device))
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def _with_capacity(t: torch.Tensor, capacity: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (B, H, capacity, D) buffer in ``dtype`` (default ``t``'s) whose first columns hold ``t``;
    the rest is uninitialised (never read: attention only sees the filled part)."""
    shape = list(t.shape)
    shape[2] = capacity
    buf = torch.empty(shape, dtype=dtype or t.dtype, device=t.device)
    buf[:, :, : t.shape[2]].copy_(t)
    return buf


def growing_cache(
    kv: list[tuple[torch.Tensor, torch.Tensor]], extra: int = 0, dtype: torch.dtype | None = None
) -> Cache:
    """A cache holding ``kv`` (one (keys, values) pair per layer) in ``dtype`` (default theirs) with
    room to grow (at least ``extra`` positions before it reallocates)."""
    return Cache(layers=[GrowingLayer(k, v, k.shape[2] + extra if extra else None, dtype=dtype) for k, v in kv])


def layer_kv(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The filled keys and values of every layer (views for a growing cache)."""
    return [(layer.keys, layer.values) for layer in cache.layers]
