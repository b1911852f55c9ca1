"""The model runner: the prefill and decode forwards, grammar-masked sampling, and the model lock.

The lock keeps the adapter slots still while a forward reads them: every slot operation
(loading an adapter, releasing a finished request's slot, pinning) goes through the runner
and takes the same lock as the forwards, whichever thread asks (the engine loop, or a server
thread checking an adapter before it streams).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_kit.engine.constraints import GrammarCache
from lora_kit.engine.decode_step import LeanDecoder
from lora_kit.engine.lora_layer import LoraContext
from lora_kit.engine.prefill import build_prefill, cached_lengths, row_kv
from lora_kit.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, PrefixMatch
from lora_kit.engine.sampling import sample_rows
from lora_kit.engine.slots import SlotManager

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

    from lora_kit.engine.batch import RunningBatch
    from lora_kit.engine.sequence import Sequence


logger = logging.getLogger(__name__)

# Rows of one prefill that share at least this many uncached prompt tokens under one adapter
# identity are split into two forwards, so the shared part is computed once (see
# ModelRunner.waves). A second forward costs about one decode step; this many tokens per
# follower cost more.
MIN_SHARED_TOKENS = 4 * BLOCK_TOKENS


def _shared_blocks(a: list[int], b: list[int]) -> int:
    """Tokens in the full blocks two prompts start with in common (the last token of either never
    counts: it is always computed)."""
    n, limit = 0, min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n // BLOCK_TOKENS * BLOCK_TOKENS


class ModelRunner:
    """Runs the model over sequences and owns what its forwards read (the LoRA context, the slots)."""

    def __init__(
        self,
        model: Any,
        ctx: LoraContext,
        slots: SlotManager,
        grammar: Callable[[], GrammarCache],
        device: torch.device,
        prefix: PrefixCache | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.kv_dtype = kv_dtype  # the prefills' caches hold keys and values in it (None: the model's)
        self.prefix = prefix or PrefixCache(0)
        self._window: int | None = getattr(getattr(model, "config", None), "sliding_window", None)
        self.ctx = ctx
        self.device = device
        self._slots = slots
        self._grammar = grammar
        self._lock = threading.RLock()
        self._rows_version: int | None = None  # the batch version ``ctx`` holds the rows of
        self._lean = LeanDecoder.for_model(model)  # decode steps without transformers' machinery
        # Observers of the logits each token is drawn from (Engine.recording_logits), replaced
        # whole (a tuple) so the loop thread reads a consistent set.
        self.logits_observers: tuple[Callable[[torch.Tensor, list[Sequence]], None], ...] = ()

    # -- adapter slots, under the model lock (any thread) --------------------------------

    def acquire_slot(self, key: str, path: Path) -> int:
        """Load adapter ``key`` if needed and hold its slot for a running request (see SlotManager.acquire)."""
        with self._lock:
            return self._slots.acquire(key, path)

    def release_slot(self, slot: int) -> None:
        """A running request of ``slot`` is done."""
        with self._lock:
            self._slots.release(slot)

    def check_adapter(self, key: str, path: Path) -> None:
        """Load adapter ``key`` into a slot now if one is free or idle, else only validate it."""
        with self._lock:
            self._slots.check(key, path)

    def drop_adapter(self, key: str) -> bool:
        """Free adapter ``key``'s slot once no request runs on it (see SlotManager.drop)."""
        with self._lock:
            return self._slots.drop(key)

    def pin_adapter(self, key: str, path: Path) -> None:
        """Load adapter ``key`` and never evict it."""
        with self._lock:
            self._slots.acquire(key, path, hold=False)
            self._slots.pin(key)

    def can_acquire(self, key: str) -> bool:
        """Whether a slot for ``key`` is there without waiting for a running request (it may
        wait for an adapter being loaded). A slot taken between this answer and
        :meth:`acquire_slot` makes that raise NoFreeSlot: the request waits for the next round."""
        with self._lock:
            return self._slots.can_acquire(key)

    def resident(self) -> list[str]:
        """The resident adapters, least recently used first. Unlocked: stats are read from the
        server's event loop, which must not wait for a forward (copying the keys is atomic)."""
        return self._slots.resident()

    # -- forwards (the engine loop's thread) ---------------------------------------------

    def waves(self, group: list[Sequence]) -> list[list[Sequence]]:
        """``group`` in the order to prefill it: one forward, or two when rows share an uncached
        prefix of at least :data:`MIN_SHARED_TOKENS` under the same adapter identity. Then the
        first of them goes in the first wave and the others follow, finding its blocks cached:
        eight requests arriving together with one system prompt compute it once, not eight times."""
        if not self.prefix.enabled or len(group) < 2:
            return [group]
        leaders: list[tuple[Sequence, int]] = []
        followers: list[Sequence] = []
        for seq in group:
            ids, identity = seq.request.prompt_ids, seq.identity()
            hit = self.prefix.match(identity, ids).tokens
            if any(
                lead.identity() == identity
                and _shared_blocks(lead.request.prompt_ids, ids) - max(hit, lead_hit) >= MIN_SHARED_TOKENS
                for lead, lead_hit in leaders
            ):
                followers.append(seq)
            else:
                leaders.append((seq, hit))
        return [[s for s, _ in leaders], followers] if followers else [group]

    @torch.inference_mode()
    def prefill(self, group: list[Sequence]) -> tuple[Cache, torch.Tensor, list[int]]:
        """One forward over the prompts of ``group``, each row with its adapter, each starting
        after its cached prefix (:mod:`lora_kit.engine.prefill`); the full blocks it computes are
        cached for later prompts.

        Returns the cache, the attention mask (R, L) and each row's first sampled token
        (already recorded on its sequence), for the group to join the running batch.
        """
        prompts = [s.request.prompt_ids for s in group]
        matches = self._matches(group)
        built = build_prefill(prompts, matches, self.device, self.kv_dtype)
        with self._lock:
            self.ctx.set_rows([s.row_adapters() for s in group], self._slots.zero_slot, self.device)
            self._rows_version = None  # ctx holds the group's rows now, not the batch's
            out = self.model(**built.inputs, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if matches is not None:
            try:
                self._remember(group, matches, built, cache)
            except Exception:  # noqa: BLE001 - an optimisation: no request fails for it
                logger.exception("caching the prefill's prompt blocks failed")
        return cache, built.mask, self.sample(out.logits[:, -1, :].float(), group)

    def _matches(self, group: list[Sequence]) -> list[PrefixMatch] | None:
        """Each row's cached prefix, or None when the cache is off or cannot be used exactly
        (a sliding window the group's columns could outgrow: it counts columns, pads included)."""
        if not self.prefix.enabled:
            return None
        matches = [self.prefix.match(s.identity(), s.request.prompt_ids) for s in group]
        if self._window is not None:
            prompts = [s.request.prompt_ids for s in group]
            cached = cached_lengths(prompts, matches)
            columns = max(cached) + max(len(p) - c for p, c in zip(prompts, cached))
            if columns + max(s.request.params.max_tokens for s in group) > self._window:
                return None
        return matches

    def _remember(self, group: list[Sequence], matches: list[PrefixMatch], built: Any, cache: Cache) -> None:
        """Count what each row reused, and cache the full blocks it computed."""
        for i, (seq, match) in enumerate(zip(group, matches)):
            self.prefix.record(built.cached[i])
            ids = seq.request.prompt_ids
            self.prefix.insert(
                match,
                ids,
                lambda a, b, i=i: row_kv(cache, i, slice(built.column(i, a), built.column(i, b)), self.kv_dtype),
            )

    @torch.inference_mode()
    def remember_finished(self, batch: RunningBatch, seqs: list[Sequence]) -> None:
        """Cache the full blocks of what finished rows of ``batch`` computed past their prompts
        (their generated tokens but the last, never fed), before they leave: the next turn of a
        chat sends this conversation back with a new question after it."""
        if not self.prefix.enabled:
            return
        if self._window is not None and batch.mask.shape[1] > self._window:
            return  # steps past the window were cut: a prefill would compute other keys and values
        for seq in seqs:
            ids = seq.request.prompt_ids + seq.generated[:-1]
            match = self.prefix.match(seq.identity(), ids)
            if len(ids) // BLOCK_TOKENS <= len(match.blocks):
                continue
            row = next(i for i, s in enumerate(batch.rows) if s is seq)
            columns = batch.mask[row].nonzero().squeeze(1)  # the row's positions, in order
            if len(columns) != len(ids):  # not what this accounting expects: cache nothing
                continue
            self.prefix.insert(match, ids, lambda a, b, r=row, c=columns: row_kv(batch.cache, r, c[a:b]))

    @torch.inference_mode()
    def decode(self, batch: RunningBatch) -> list[int]:
        """One decode step of every row of ``batch``; each row's sampled token (recorded on it)."""
        rows: list[Sequence] = batch.rows
        with self._lock:
            if self._rows_version != batch.version:  # rows joined or left: re-gather their slots
                self.ctx.set_rows([s.row_adapters() for s in rows], self._slots.zero_slot, self.device)
                self._rows_version = batch.version
            logits, cache = self._step(batch.step_inputs())
        tokens = self.sample(logits.float(), rows)
        batch.advance(cache, tokens)
        return tokens

    def _step(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, Cache]:
        """The last position's logits (B, V) and the updated cache of one decode step."""
        mask = inputs["attention_mask"]
        if self._lean is not None and self._lean.fits(mask.shape[1]):
            cache = inputs["past_key_values"]
            return self._lean(inputs["input_ids"], mask, inputs["position_ids"], cache), cache
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.past_key_values

    def sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
        """Each row's next token from ``logits`` (B, V) fp32, masked by its grammar if it has
        one, and recorded on the row (its output, sampler statistics and grammar state).

        Never raises for one row: a row whose grammar, penalties, draw or bookkeeping fails is
        marked failed (:meth:`Sequence.fail`, token 0 as a placeholder) and the others go on.
        """
        for observe in self.logits_observers:  # before any grammar mask or penalty touches them
            observe(logits, rows)
        failed: dict[int, Exception] = {}
        constrained = [i for i, s in enumerate(rows) if s.constraint is not None]
        if constrained:
            self._mask(logits, rows, constrained, failed)
        tokens, failed = sample_rows(logits, [s.sampler for s in rows], failed)
        for i, (seq, token) in enumerate(zip(rows, tokens)):
            if i not in failed:
                try:
                    seq.accept(token)
                except Exception as err:  # noqa: BLE001 - e.g. its grammar rejects the token
                    failed[i] = err
            if i in failed:
                seq.fail("sampling", failed[i])
        return tokens

    def _mask(self, logits: torch.Tensor, rows: list[Sequence], constrained: list[int], failed: dict) -> None:
        """Apply the grammar masks of the ``constrained`` rows; a row that fails goes into ``failed``."""
        try:
            grammar = self._grammar()
            bitmask = grammar.bitmask(len(rows))
        except Exception as err:  # noqa: BLE001 - only the constrained rows need it
            failed.update(dict.fromkeys(constrained, err))
            return
        ok = []
        for i in constrained:
            try:
                rows[i].constraint.fill(bitmask, i)  # type: ignore[union-attr]
                ok.append(i)
            except Exception as err:  # noqa: BLE001
                failed[i] = err
        if not ok:
            return
        vocab = grammar.vocab_size
        try:
            grammar.apply(logits[:, :vocab], bitmask, ok)
        except Exception:  # noqa: BLE001 - find the row(s) at fault
            for i in ok:
                try:
                    grammar.apply(logits[:, :vocab], bitmask, [i])
                except Exception as err:  # noqa: BLE001
                    failed[i] = err
        if logits.shape[1] > vocab:  # the model's padded vocabulary: never a grammar's token
            logits[ok, vocab:] = float("-inf")
