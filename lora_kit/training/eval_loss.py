"""Held-out loss during training. The task metric (exact match, JSON fields...) is measured through
the serving engine at the end of a run: :mod:`lora_kit.evaluation`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_kit.training import packing
from lora_kit.training.data import Example


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    examples: Sequence[Example],
    max_len: int,
    pad_id: int,
    micro_batch: int,
    device: torch.device,
) -> float:
    """Token-weighted mean loss over ``examples`` (packed the same way as training)."""
    was_training = model.training
    model.eval()
    rows = packing.pack(examples, max_len)
    total, count = 0.0, 0
    for i in range(0, len(rows), micro_batch):
        batch = {k: v.to(device) for k, v in packing.collate(rows[i : i + micro_batch], pad_id).items()}
        loss, n = packing.loss_sum(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)
