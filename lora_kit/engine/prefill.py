"""A prefill's inputs: left-padded prompts, each row starting after its cached prefix (if any).

Without a cached prefix, the group's prompts are left-padded to one width, as ``generate``
does for a batch. With cached prefixes (:mod:`lora_kit.engine.prefix_cache`), row ``i`` has
``c_i`` positions cached and ``s_i`` left to compute. The forward's past holds the cached
parts left-padded to ``C = max c_i`` columns; its input holds the uncached rests left-padded
to ``S = max s_i``. Row ``i``'s columns (C + S of them) are therefore::

    [pad * (C - c_i)] [cached c_i] [pad * (S - s_i)] [uncached s_i]

The attention mask hides both pads and the position ids count only real tokens, so each row
computes exactly what it would alone; every row's last token is the last column, whose logits
the first sampled token comes from. The mask keeps its hole after the prefill: decode steps
take any mask, and the hole leaves with its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from lora_kit.engine.kv_cache import GrowingLayer, spare_for
from lora_kit.engine.prefix_cache import BLOCK_TOKENS, PrefixMatch


@dataclass
class PrefillInputs:
    """The model inputs of one prefill forward and where each row's positions are."""

    inputs: dict[str, Any]  # input_ids (R, S), attention_mask (R, C + S), past_key_values, position_ids
    mask: torch.Tensor  # (R, C + S): the mask the rows join the running batch with
    cached: list[int]  # c_i: positions of row i taken from the cache
    lengths: list[int]  # each prompt's length

    def column(self, row: int, position: int) -> int:
        """The column of the forward's cache holding ``row``'s uncached prompt position ``position``
        (the uncached rests are right-aligned)."""
        return self.mask.shape[1] - self.lengths[row] + position


def cached_lengths(prompts: list[list[int]], matches: list[PrefixMatch] | None) -> list[int]:
    """How many positions of each prompt come from the cache: its matched blocks, but never the
    last token (its logits give the first sampled token, so it is always computed)."""
    if matches is None:
        return [0] * len(prompts)
    return [min(m.tokens, len(p) - 1) for p, m in zip(prompts, matches)]


def build_prefill(
    prompts: list[list[int]],
    matches: list[PrefixMatch] | None,
    device: torch.device,
    kv_dtype: torch.dtype | None = None,
) -> PrefillInputs:
    """The inputs of one forward over ``prompts``, each after its cached prefix in ``matches``
    (held in ``kv_dtype``, default the model's: the forward attends over them widened).

    Without a cached past the forward fills a plain cache in the model's dtype, which the running
    batch then narrows to ``kv_dtype``: the prompt's own positions are attended unrounded, so the
    first token is the one an fp32 cache gives (rounding them flipped the embedded model's first
    token on "What is the capital of France?", a near-tie, and its answer with it)."""
    from transformers import DynamicCache

    cached = cached_lengths(prompts, matches)
    width = max(len(p) - c for p, c in zip(prompts, cached))
    past_width = max(cached)
    rows = len(prompts)
    ids = torch.zeros(rows, width, dtype=torch.long, device=device)
    mask = torch.zeros(rows, past_width + width, dtype=torch.long, device=device)
    for i, (prompt, c) in enumerate(zip(prompts, cached)):
        rest = prompt[c:]
        ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        mask[i, past_width - c : past_width] = 1
        mask[i, past_width + width - len(rest) :] = 1
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if past_width:
        assert matches is not None
        inputs["past_key_values"] = _past(matches, cached, past_width, width, kv_dtype)
    else:
        inputs["past_key_values"] = DynamicCache()
    if rows > 1 or past_width:  # with padding or a past the positions are explicit, as generate() does
        inputs["position_ids"] = ((mask.cumsum(-1) - 1).clamp(min=0))[:, past_width:]
    return PrefillInputs(inputs, mask, cached, [len(p) for p in prompts])


def _past(
    matches: list[PrefixMatch], cached: list[int], past_width: int, width: int, kv_dtype: torch.dtype | None
) -> Cache:
    """A cache holding each row's cached positions, left-padded to ``past_width``, in buffers with
    room for the ``width`` positions the forward adds. The blocks are copied straight into those
    buffers: on the CPU each fresh page costs a fault on first touch, so nothing is zeroed or
    copied twice (the pads are zeroed: masked, but a NaN there would still poison the softmax)."""
    sample = next(m.blocks[0].kv for m, c in zip(matches, cached) if c)
    layers, _, heads, _, head_dim = sample.shape
    total = past_width + width
    buf = sample.new_empty(layers, 2, len(matches), heads, total + spare_for(total), head_dim, dtype=kv_dtype)
    for i, (m, c) in enumerate(zip(matches, cached)):
        col = past_width - c
        buf[:, :, i, :, :col].zero_()
        for block in m.blocks:
            n = min(BLOCK_TOKENS, past_width - col)
            if n <= 0:
                break
            buf[:, :, i, :, col : col + n] = block.kv[:, :, :, :n]
            col += n
    return Cache(layers=[GrowingLayer(buf[n, 0], buf[n, 1], filled=past_width) for n in range(layers)])


def row_kv(cache: Any, row: int, columns: slice | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``columns`` (a slice, or column indices) of ``row`` of every layer of ``cache``:
    (layers, 2, kv_heads, n, head_dim), a copy, in ``dtype`` (default the cache's)."""
    return torch.stack(
        [torch.stack((layer.keys[row][:, columns], layer.values[row][:, columns])) for layer in cache.layers]
    ).to(dtype or cache.layers[0].keys.dtype)
