"""Continuous batching: a background thread runs the decode loop over a changing batch.

Between two decode steps, waiting requests whose adapter can get a slot are prefilled and
join; finished and cancelled requests leave at once. Each request streams its events
through a thread-safe queue that an async iterator (or a blocking caller) drains.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_kit.engine.batch import RunningBatch
from lora_kit.engine.constraints import Constraint, GrammarCache, parse_tool_call
from lora_kit.engine.lora_layer import LoraContext
from lora_kit.engine.sampling import RequestSampler, sample_rows
from lora_kit.engine.slots import NoFreeSlot, SlotManager
from lora_kit.engine.types import EngineError, GenerationOutput, GenerationRequest, Overloaded


@dataclass
class Sequence:
    """One request in flight: its inputs, decoding state and output stream."""

    request: GenerationRequest
    adapter_key: str | None
    adapter_path: Path | None
    sampler: RequestSampler
    constraint: Constraint | None
    events: queue.SimpleQueue[GenerationOutput | BaseException] = field(default_factory=queue.SimpleQueue)
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    sent_ids: int = 0  # generated tokens already sent
    decoded: str = ""  # detokenized text so far (before stop-string cuts)
    prefix_offset: int = 0  # incremental detokenization window over ``generated``
    read_offset: int = 0
    stop_at: int | None = None  # where the first stop string starts in ``decoded``
    text: str = ""
    cancelled: bool = False
    done: bool = False
    # Set by an async consumer so the scheduler thread can wake it.
    loop: asyncio.AbstractEventLoop | None = None
    wakeup: asyncio.Event | None = None

    def push(self, item: GenerationOutput | BaseException) -> None:
        """Deliver an event from the scheduler thread (wakes an async consumer)."""
        self.events.put(item)
        loop, wakeup = self.loop, self.wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass


class Scheduler:
    """Owns the running batch and the waiting queue; the decode loop runs in :meth:`run`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        ctx: LoraContext,
        slots: SlotManager,
        model_lock: threading.RLock,
        stop_ids: set[int],
        grammar: Callable[[], GrammarCache],
        max_batch: int,
        max_queue: int,
        max_length: int,
        threads: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.slots = slots
        self.model_lock = model_lock
        self.stop_ids = stop_ids
        self.grammar = grammar
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_length = max_length
        self.threads = threads
        self.device = next(model.parameters()).device
        self.batch = RunningBatch(self.device)
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        # Finished requests by reason (stop, length, tool_calls, cancelled, error): for operators.
        self.finished: dict[str, int] = {}

    # -- submission (any thread) ---------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises Overloaded when the waiting queue is full."""
        with self.cond:
            if self.stopping:
                raise EngineError("the engine is stopped")
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(f"the engine is overloaded: {len(self.waiting)} requests are waiting")
            self.waiting.append(seq)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    # -- the loop (scheduler thread) -----------------------------------------------------

    def run(self) -> None:
        """Admit, step, repeat until stopped; then cancel whatever is left."""
        torch.set_num_threads(self.threads)  # this thread's own OpenMP pool (see engine/threads.py)
        while True:
            with self.cond:
                if self.stopping:
                    break
                if not self.batch.rows and not self._admissible():
                    self.cond.wait(timeout=0.5)
                    continue
            try:
                self._admit()
                if self.batch.rows:
                    self._step()
            except Exception as err:  # a bug must fail the requests in flight, never kill the loop
                traceback.print_exc()
                self._fail_all(EngineError(f"internal engine error: {err.__class__.__name__}: {err}"))
        self.cancel_all()

    def _admissible(self) -> bool:
        return any(s.cancelled or s.adapter_key is None or self.slots.can_acquire(s.adapter_key) for s in self.waiting)

    def _admit(self) -> None:
        """Prefill, together, the waiting requests that fit in the batch and can get a slot."""
        group: list[Sequence] = []
        with self.model_lock:
            while len(self.batch) + len(group) < self.max_batch:
                seq = self._next_waiting()
                if seq is None:
                    break
                try:
                    if seq.adapter_key is not None:
                        assert seq.adapter_path is not None
                        seq.slot = self.slots.acquire(seq.adapter_key, seq.adapter_path)
                except NoFreeSlot:  # taken meanwhile (check_adapter): wait for the next round
                    with self.cond:
                        self.waiting.appendleft(seq)
                    break
                except EngineError as err:  # this adapter cannot be served: fail this request only
                    self._finish_error(seq, err)
                    continue
                group.append(seq)
            if group:
                try:
                    self._prefill(group)
                except Exception as err:  # they are not all in the batch yet: fail them here
                    for seq in group:
                        self._finish_error(seq, EngineError(f"prefill failed: {err.__class__.__name__}: {err}"))
                    raise

    def _next_waiting(self) -> Sequence | None:
        """The oldest waiting request that can run now (others keep their place)."""
        with self.cond:
            for seq in list(self.waiting):
                if seq.cancelled:
                    self.waiting.remove(seq)
                    self._finish(seq, "cancelled", emit=False)  # nobody listens any more
                    continue
                if seq.adapter_key is None or self.slots.can_acquire(seq.adapter_key):
                    self.waiting.remove(seq)
                    return seq
        return None

    @torch.inference_mode()
    def _prefill(self, group: list[Sequence]) -> None:
        """One forward over the left-padded prompts of ``group``; they join the batch."""
        from transformers import DynamicCache

        width = max(len(s.request.prompt_ids) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for i, s in enumerate(group):
            prompt = s.request.prompt_ids
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        inputs = {"input_ids": ids, "attention_mask": mask, "past_key_values": DynamicCache()}
        if len(group) > 1:  # with left padding the positions are explicit, as generate() does
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        self.ctx.set_rows([s.slot for s in group], self.slots.zero_slot, self.device)
        self._ctx_stale = True
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        tokens = self._sample(logits, group)
        # Join first, then stream: whoever hears the first token sees the request running.
        start = len(self.batch)
        self.batch.add(group, out.past_key_values, mask, tokens)
        reasons = [self._record(s, t) for s, t in zip(group, tokens)]
        if any(r is not None for r in reasons):
            self.batch.keep([i for i in range(len(self.batch)) if i < start or reasons[i - start] is None])
            for s, r in zip(group, reasons):
                if r is not None:
                    self._finish(s, r, emit=True)

    @torch.inference_mode()
    def _step(self) -> None:
        rows: list[Sequence] = self.batch.rows
        live = [i for i, s in enumerate(rows) if not s.cancelled]
        if len(live) < len(rows):
            self.batch.keep(live)
            self._rows_changed()
            for s in rows:
                if s.cancelled:
                    self._finish(s, "cancelled", emit=True)
            if not self.batch.rows:
                return
            rows = self.batch.rows
        with self.model_lock:
            if self._ctx_stale:  # the rows changed since the last step: re-gather their slots
                self.ctx.set_rows([s.slot for s in rows], self.slots.zero_slot, self.device)
                self._ctx_stale = False
            out = self.model(**self.batch.step_inputs(), use_cache=True, logits_to_keep=1)
        self.batch.cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        tokens = self._sample(logits, rows)
        self.batch.advance(tokens)
        reasons = [self._record(s, t) for s, t in zip(rows, tokens)]
        keep = [i for i, reason in enumerate(reasons) if reason is None]
        if len(keep) < len(rows):
            # Leave the batch first, then tell the client: whoever hears "finished" sees it gone.
            self.batch.keep(keep)
            self._rows_changed()
            for s, reason in zip(rows, reasons):
                if reason is not None:
                    self._finish(s, reason, emit=True)

    _ctx_stale = True

    def _rows_changed(self) -> None:
        self._ctx_stale = True

    # -- per-token work ------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
        constrained = [i for i, s in enumerate(rows) if s.constraint is not None]
        if constrained:
            grammar = self.grammar()
            bitmask = grammar.bitmask(len(rows))
            for i in constrained:
                rows[i].constraint.fill(bitmask, i)  # type: ignore[union-attr]
            vocab = grammar.vocab_size
            grammar.apply(logits[:, :vocab], bitmask, constrained)
            if logits.shape[1] > vocab:
                logits[constrained, vocab:] = float("-inf")
        return sample_rows(logits, [s.sampler for s in rows])

    def _record(self, seq: Sequence, token: int) -> str | None:
        """Take one generated token and stream its text; the finish reason when it ends the sequence."""
        seq.generated.append(token)
        seq.sampler.observe(token)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        params = seq.request.params
        reason: str | None = None
        is_stop_token = token in self.stop_ids and not params.ignore_eos
        if is_stop_token or (seq.constraint is not None and seq.constraint.terminated):
            reason = "stop"
        if reason is None and len(seq.generated) >= params.max_tokens:
            reason = "length"
        if reason is None and len(seq.request.prompt_ids) + len(seq.generated) >= self.max_length:
            reason = "length"
        before = len(seq.decoded)
        text = self._detokenize(seq, seq.generated[:-1] if is_stop_token else seq.generated, final=reason is not None)
        for stop in params.stop:
            # Only the new text (and the stop's length before it) can hold a new match.
            at = text.find(stop, max(0, before - len(stop) + 1)) if stop else -1
            if at >= 0 and (seq.stop_at is None or at < seq.stop_at):
                seq.stop_at = at
        if seq.stop_at is not None:
            text, reason = text[: seq.stop_at], "stop"
        seq.text = text
        if reason is None:
            self._emit(seq, self._safe_end(seq, text), finished=False)
        return reason

    def _detokenize(self, seq: Sequence, ids: list[int], final: bool) -> str:
        """The text of ``ids``, decoded incrementally (a few tokens per step, not all of them):
        a token's text is taken once the tokens after the last complete character decode
        cleanly (byte-level BPE may split one character over several tokens)."""
        prefix = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        new = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            seq.decoded += new[len(prefix) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return seq.decoded

    def _safe_end(self, seq: Sequence, text: str) -> int:
        """How much of ``text`` can be streamed now: hold back a possible stop-string start,
        an incomplete UTF-8 character, and a reply that may be turning into a tool call."""
        end = len(text)
        if seq.constraint is not None and seq.constraint.tools and text.lstrip()[:1] in ("", "{"):
            return seq.emitted
        if text.endswith("\ufffd"):
            end -= 1
        for stop in seq.request.params.stop:
            for n in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:n]):
                    end = min(end, len(text[:end]) - n)
                    break
        return max(end, seq.emitted)

    def _emit(
        self, seq: Sequence, end: int, finished: bool, reason: str | None = None, tool_calls: list | None = None
    ) -> None:
        """Send the text up to ``end`` not sent yet, with the token ids generated since the last event."""
        delta = seq.text[seq.emitted : end]
        if not delta and not finished:
            return  # held back: the ids ride along with the next event
        seq.emitted = max(seq.emitted, end)
        new_ids, seq.sent_ids = seq.generated[seq.sent_ids :], len(seq.generated)
        seq.push(
            GenerationOutput(
                text=delta,
                token_ids=new_ids,
                finished=finished,
                finish_reason=reason,
                prompt_tokens=len(seq.request.prompt_ids),
                completion_tokens=len(seq.generated),
                tool_calls=tool_calls,
            )
        )

    def _count(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def _finish(self, seq: Sequence, reason: str, emit: bool) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.slot is not None:
            with self.model_lock:
                self.slots.release(seq.slot)
        tool_calls = None
        if seq.constraint is not None and seq.constraint.tools and seq.text.lstrip().startswith("{"):
            call = parse_tool_call(seq.text.strip(), seq.request.tools or [])
            if call is not None:
                tool_calls, reason = [call], "tool_calls"
                seq.text, seq.emitted = "", 0
            else:
                seq.emitted = 0  # an unfinished call is shown as the text it is
        self._count(reason)
        if emit:
            self._emit(seq, len(seq.text), finished=True, reason=reason, tool_calls=tool_calls)

    def _finish_error(self, seq: Sequence, err: BaseException) -> None:
        if seq.done:
            return
        seq.done = True
        self._count("error")
        if seq.slot is not None:
            self.slots.release(seq.slot)
            seq.slot = None
        seq.push(err)

    def _fail_all(self, err: BaseException) -> None:
        for seq in self.batch.rows:
            self._finish_error(seq, err)
        self.batch.keep([])
        self._rows_changed()

    def cancel_all(self) -> None:
        for seq in self.batch.rows:
            self._finish(seq, "cancelled", emit=True)
        self.batch.keep([])
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for seq in waiting:
            self._finish(seq, "cancelled", emit=True)
