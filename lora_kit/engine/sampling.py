"""Per-request sampling inside a mixed batch.

Every row is processed on its own logits only, and draws from its own ``torch.Generator``
seeded by the request's ``seed``: the same seeded request gives the same tokens whatever
else shares the batch. Order (as in transformers): repetition penalty, frequency/presence
penalties (the grammar mask is applied before them; -inf stays -inf), then greedy argmax or temperature -> top-k -> top-p -> draw.

A temperature below ``GREEDY_TEMPERATURE`` is greedy, and scores that overflow anyway (a tiny
``repetition_penalty``) are clamped to the largest float, so no row draws from inf/NaN. A row
whose sampling still raises fails alone: :func:`sample_rows` reports it and the other rows get
their tokens (the engine loop then fails that request only).
"""

from __future__ import annotations

import secrets

import torch

from lora_kit.engine.types import GREEDY_TEMPERATURE, SamplingParams


class RequestSampler:
    """The sampling state of one request: its params, generator and token statistics."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device) -> None:
        self.params = params
        self.greedy = params.temperature < GREEDY_TEMPERATURE
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        # repetition_penalty looks at prompt + output (as transformers); frequency/presence at the output (as OpenAI).
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            if ids:
                self.seen[torch.tensor(ids, device=device)] = True
        self.counts: torch.Tensor | None = None
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    @property
    def needs_penalties(self) -> bool:
        return self.seen is not None or self.counts is not None

    def observe(self, token: int) -> None:
        """Record a generated token."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the penalties to one row of logits (V,) in place; returns it."""
        p = self.params
        if self.seen is not None:
            penalized = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
            logits.copy_(torch.where(self.seen, penalized, logits))
        if self.counts is not None:
            logits -= self.counts * p.frequency_penalty + (self.counts > 0).float() * p.presence_penalty
        return logits

    def draw(self, logits: torch.Tensor) -> int:
        """Pick the next token from one (penalized, masked) row of logits."""
        if self.greedy:
            return int(torch.argmax(logits))
        p = self.params
        # An overflow to +inf is the best token (clamped, so softmax gives no NaN), NaN is none.
        top = torch.finfo(logits.dtype).max
        scores = torch.nan_to_num(logits / p.temperature, nan=float("-inf"), posinf=top, neginf=float("-inf"))
        vocab = scores.shape[-1]
        if 0 < p.top_k < vocab:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            drop[0] = False
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_rows(
    logits: torch.Tensor, samplers: list[RequestSampler], failed: dict[int, Exception] | None = None
) -> tuple[list[int], dict[int, Exception]]:
    """Next token of every row of ``logits`` (B, V), fp32, already grammar-masked, and the rows
    that failed (index -> error; rows already in ``failed`` are skipped). A failed row's token
    is a placeholder 0: its request is to be failed, the other rows are unaffected."""
    failed = dict(failed or {})
    for i, sampler in enumerate(samplers):
        if sampler.needs_penalties and i not in failed:
            try:
                sampler.penalize(logits[i])
            except Exception as err:  # noqa: BLE001 - this row fails alone
                failed[i] = err
    if all(s.greedy for s in samplers):
        tokens = torch.argmax(logits, dim=-1).tolist()
    else:
        tokens = []
        for i, sampler in enumerate(samplers):
            token = 0
            if i not in failed:
                try:
                    token = sampler.draw(logits[i])
                except Exception as err:  # noqa: BLE001 - this row fails alone
                    failed[i] = err
            tokens.append(token)
    for i in failed:
        tokens[i] = 0
    return tokens, failed
