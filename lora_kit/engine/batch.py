"""The running batch's KV cache: left-padded rows that join and leave between decode steps.

Requests that arrive together are prefilled together (left-padded; a request alone is
prefilled exactly as ``generate`` does for one prompt); their cache is then merged into
the running batch by left-padding the shorter side, with an attention mask that hides the padding and explicit position ids,
as ``generate`` does for a left-padded batch. Rows that finish are dropped with an index
select, and padding columns no row needs any more are trimmed. Between those events the
cache grows in place (:mod:`lora_kit.engine.kv_cache`): a decode step copies nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from lora_kit.engine.kv_cache import GrowingLayer, growing_cache, layer_kv


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad (B, H, L, D) with ``n`` zero positions in front of L."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[2] = n
    return torch.cat([t.new_zeros(shape), t], dim=2)


class RunningBatch:
    """Rows (any objects), their cache, mask, next positions and the tokens to feed next.

    ``version`` changes whenever rows join or leave, so whoever maps rows to something else
    (the runner: rows to adapter slots) knows when to redo it.
    """

    def __init__(self, device: torch.device, kv_dtype: torch.dtype | None = None) -> None:
        self.device = device
        self.kv_dtype = kv_dtype  # what the cache holds keys and values in (None: as the model gives them)
        self.rows: list[Any] = []
        self.cache: Cache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # (B, L) 1 = real token
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # next position id per row
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=device)  # sampled, not yet fed
        self.version = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Any], cache: Cache, mask: torch.Tensor, next_tokens: list[int]) -> None:
        """Join prefilled rows: ``cache`` and ``mask`` (R, L) hold their (left-padded) prompts,
        ``next_tokens`` their first sampled tokens, fed at the next step."""
        mask = mask.to(self.device, torch.long)
        if self.cache is None or not self.rows:
            adopt = all(  # the runner's prefills fill a growing cache in the batch's dtype
                isinstance(layer, GrowingLayer) and layer.dtype == (self.kv_dtype or layer.dtype)
                for layer in cache.layers
            )
            self.cache = cache if adopt else growing_cache(layer_kv(cache), dtype=self.kv_dtype)
            self.mask = mask
        else:
            cur, new = self.mask.shape[1], mask.shape[1]
            total = max(cur, new)
            merged = []
            for (k, v), (nk, nv) in zip(layer_kv(self.cache), layer_kv(cache)):
                nk, nv = nk.to(k.dtype), nv.to(v.dtype)
                merged.append(
                    (
                        torch.cat([_pad_left(k, total - cur), _pad_left(nk, total - new)], dim=0),
                        torch.cat([_pad_left(v, total - cur), _pad_left(nv, total - new)], dim=0),
                    )
                )
            self.cache = growing_cache(merged)
            pad = lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], dim=1) if n else m  # noqa: E731
            self.mask = torch.cat([pad(self.mask, total - cur), pad(mask, total - new)], dim=0)
        self.rows.extend(rows)
        self.version += 1
        self.positions = torch.cat([self.positions, mask.sum(dim=1)])
        self.next_tokens = torch.cat(
            [self.next_tokens, torch.tensor(next_tokens, dtype=torch.long, device=self.device)]
        )

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` (in that order); trim padding nobody needs."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        self.version += 1
        if not indices:
            self.cache = None
            self.mask = self.mask[:0, :0]
            self.positions = self.positions[:0]
            self.next_tokens = self.next_tokens[:0]
            return
        idx = torch.tensor(indices, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, idx)
        # Leading columns that are padding in every remaining row can go.
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        assert self.cache is not None
        kv = [
            (k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
            for k, v in layer_kv(self.cache)
        ]
        self.cache = growing_cache(kv)
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, idx)
        self.next_tokens = self.next_tokens.index_select(0, idx)

    def step_inputs(self) -> dict[str, Any]:
        """Model inputs for one decode step (extends the mask by the fed token)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        return {
            "input_ids": self.next_tokens.view(-1, 1),
            "attention_mask": self.mask,
            "position_ids": self.positions.view(-1, 1),
            "past_key_values": self.cache,
        }

    def advance(self, cache: Cache, tokens: list[int]) -> None:
        """After a step: the cache the model returned; every row moved one position and gets
        its newly sampled token to feed."""
        self.cache = cache
        self.positions = self.positions + 1
        self.next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
