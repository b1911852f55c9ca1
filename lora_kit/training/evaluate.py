"""Held-out evaluation: loss on eval examples and a task metric (exact match) for base vs adapter."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lora_kit import chat
from lora_kit.training import packing
from lora_kit.training.data import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def greedy_replies(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of already-rendered prompts (left-padded batches)."""
    stops = sorted(chat.stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
            use_cache=True,
        )
        for row in gen[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out


def task_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[dict[str, Any]]]
) -> tuple[list[list[int]], list[str]]:
    """Prompt ids (everything before the last reply) and the reference replies."""
    prompts, refs = [], []
    for msgs in conversations:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(chat.render(tokenizer, msgs[:last], add_generation_prompt=True).input_ids)
        refs.append(msgs[last]["content"])
    return prompts, refs


def exact_match(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, Any]]],
    max_new_tokens: int,
    device: torch.device,
    use_adapter: bool = True,
) -> dict[str, Any]:
    """Share of held-out replies reproduced exactly (whitespace-normalized), with samples."""
    prompts, refs = task_prompts(tokenizer, conversations)
    was_training = model.training
    model.eval()
    ctx = contextlib.nullcontext() if use_adapter else model.disable_adapter()
    with ctx:
        replies = greedy_replies(model, tokenizer, prompts, max_new_tokens, device)
    model.train(was_training)
    hits = [normalize(a) == normalize(b) for a, b in zip(replies, refs)]
    return {
        "exact_match": sum(hits) / len(hits) if hits else 0.0,
        "n": len(hits),
        "samples": [{"expected": r, "got": g} for r, g in list(zip(refs, replies))[:3]],
    }
