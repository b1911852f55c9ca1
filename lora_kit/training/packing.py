"""Rows of examples -> batches, with packing that never lets examples see each other.

A packed row holds several examples; positions restart at 0 for each one and the
attention mask is block-diagonal causal (batch, 1, T, T). Restarting positions alone
does NOT isolate examples under sdpa/eager attention: transformers only derives per-example
boundaries from position ids for flash-attention; with sdpa/eager a packed row is one causal
sequence. The 4D mask isolates them (tests/test_packing.py proves packed loss == per-example loss).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lora_kit.training.data import IGNORE, Example

if TYPE_CHECKING:
    import torch

Row = list[Example]


def pack(examples: Sequence[Example], max_len: int) -> list[Row]:
    """First-fit-decreasing bin packing of examples into rows of at most ``max_len`` tokens."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[Row] = []
    space: list[int] = []
    for i in order:
        ex = examples[i]
        for r, free in enumerate(space):
            if len(ex) <= free:
                rows[r].append(ex)
                space[r] -= len(ex)
                break
        else:
            rows.append([ex])
            space.append(max_len - len(ex))
    return rows


def rows_for(examples: Sequence[Example], max_len: int, packing: bool) -> list[Row]:
    """Packed rows, or one example per row."""
    return pack(examples, max_len) if packing else [[ex] for ex in examples]


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a seeded shuffle, the same on every rank and on resume."""
    order = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad rows to the longest; build input_ids, labels, position_ids and the 4D block mask."""
    import torch

    width = max(sum(len(ex) for ex in row) for row in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    segment = torch.zeros((b, width), dtype=torch.long)  # 0 = padding
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row, 1):
            n = len(ex)
            input_ids[r, start : start + n] = torch.tensor(ex.input_ids)
            labels[r, start : start + n] = torch.tensor(ex.labels)
            position_ids[r, start : start + n] = torch.arange(n)
            segment[r, start : start + n] = s
            start += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segment[:, :, None] == segment[:, None, :]
    real = (segment != 0)[:, :, None]
    mask = causal & same & real
    # A padding query must attend somewhere or sdpa returns NaN; its label is ignored anyway.
    mask |= torch.eye(width, dtype=torch.bool)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask[:, None]}


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised tokens, and their count.

    Logits are computed only at positions whose next token is supervised in some row
    (``logits_to_keep``): with short replies that is a few percent of the tokens, and the
    vocabulary projection plus its loss is a large share of a small model's step.
    """
    import torch.nn.functional as F

    target = batch["labels"][:, 1:]
    supervised = target != IGNORE
    n = int(supervised.sum())
    positions = supervised.any(dim=0).nonzero().squeeze(1)
    if n == 0:
        positions = positions.new_zeros(1)  # a (zero) loss that still touches every weight, as DDP expects
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=positions,
    )
    logits = out.logits.float()
    kept = target.index_select(1, positions)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), kept.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, n
