"""Continuous batching's admission: the waiting queue and the running batch's membership.

Requests queue in arrival order (a full queue answers Overloaded). Between two decode steps
the engine loop asks :meth:`Scheduler.admit` for the waiting requests that can join: up to
``max_batch`` rows, oldest first, each with its adapter's slot taken; a request whose
adapter cannot get a slot yet keeps its place while later ones go ahead. Rows that finish
or are cancelled leave the batch at once. No model work happens here (see ``runner``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_kit.engine.batch import RunningBatch
from lora_kit.engine.sequence import Sequence
from lora_kit.engine.slots import NoFreeSlot
from lora_kit.engine.types import EngineError, Overloaded

if TYPE_CHECKING:
    from transformers.cache_utils import Cache


@dataclass
class Admission:
    """What :meth:`Scheduler.admit` took from the waiting queue."""

    joining: list[Sequence] = field(default_factory=list)  # slots held: to prefill together
    cancelled: list[Sequence] = field(default_factory=list)  # cancelled while waiting
    failed: list[tuple[Sequence, EngineError]] = field(default_factory=list)  # their adapter cannot be served
    crashed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # unexpected error taking their slot


class Scheduler:
    """Owns the waiting queue and the running batch; any thread submits, the loop's thread admits.

    ``can_acquire(key)``, ``acquire(key, path) -> slot`` and ``release(slot)`` are the runner's
    slot operations.
    """

    def __init__(
        self,
        can_acquire: Callable[[str], bool],
        acquire: Callable[[str, Path], int],
        release: Callable[[int], None],
        device: torch.device,
        max_batch: int,
        max_queue: int,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self._can_acquire = can_acquire
        self._acquire = acquire
        self._release = release
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch = RunningBatch(device, kv_dtype)
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._changes = 0  # bumped by every notify: a change while the loop looked away is not missed

    # -- any thread ----------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises Overloaded when the waiting queue is full."""
        with self._cond:
            if self._stopping:
                raise EngineError("the engine is stopped")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the engine is overloaded: {len(self._waiting)} requests are waiting")
            self._waiting.append(seq)
            self._notify()

    def wake(self) -> None:
        """Something changed (a request was cancelled): the loop looks again."""
        with self._cond:
            self._notify()

    def request_stop(self) -> None:
        """Refuse new requests and make :meth:`wait_for_work` return False."""
        with self._cond:
            self._stopping = True
            self._notify()

    def resume(self) -> None:
        """Accept requests again (stopped, not closed: they wait for the loop's next start)."""
        with self._cond:
            self._stopping = False

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self.batch)

    # -- the loop's thread ---------------------------------------------------------------

    def wait_for_work(self, poll: float = 0.5) -> bool:
        """Block while there is nothing to do (re-checking every ``poll`` seconds: a slot may
        free up); False once a stop is requested, else True."""
        while True:
            with self._cond:
                if self._stopping:
                    return False
                if self.batch.rows:
                    return True
                waiting, seen = list(self._waiting), self._changes
            # Outside the lock: the runner may make us wait for an adapter load, and submitters must not.
            if any(self._runnable(s) for s in waiting):
                return True
            with self._cond:
                if self._changes == seen and not self._stopping:
                    self._cond.wait(timeout=poll)

    def admit(self) -> Admission:
        """Take the waiting requests that can join the batch now, each with its adapter's slot."""
        out = Admission()
        while len(self.batch) + len(out.joining) < self.max_batch:
            seq = self._next_waiting(out.cancelled)
            if seq is None:
                break
            try:
                seq.slots = self._acquire_all(seq)
            except NoFreeSlot:  # taken meanwhile (an adapter check): wait for the next round
                with self._cond:
                    self._waiting.appendleft(seq)
                break
            except EngineError as err:  # this adapter cannot be served: fail this request only
                out.failed.append((seq, err))
                continue
            except Exception as err:  # a bug or an I/O error loading it: still this request only
                out.crashed.append((seq, err))
                continue
            out.joining.append(seq)
        return out

    def _acquire_all(self, seq: Sequence) -> list[int]:
        """The slots of all of ``seq``'s adapters, held; all or none (a failure releases those taken)."""
        slots: list[int] = []
        try:
            for use in seq.adapters:
                slots.append(self._acquire(use.key, use.path))
        except BaseException:
            for slot in slots:
                self._release(slot)
            raise
        return slots

    def join(self, group: list[Sequence], cache: Cache, mask: torch.Tensor, tokens: list[int]) -> None:
        """Prefilled ``group`` joins the batch: its cache, mask (R, L) and first tokens (see RunningBatch.add)."""
        self.batch.add(group, cache, mask, tokens)

    def leave(self, seqs: list[Sequence]) -> None:
        """``seqs`` leave the batch."""
        gone = {id(s) for s in seqs}
        self.batch.keep([i for i, s in enumerate(self.batch.rows) if id(s) not in gone])

    def cancelled_rows(self) -> list[Sequence]:
        """The running rows whose consumer went away; they leave the batch."""
        cancelled = [s for s in self.batch.rows if s.cancelled]
        if cancelled:
            self.leave(cancelled)
        return cancelled

    def clear_batch(self) -> list[Sequence]:
        """The running rows, all leaving the batch."""
        rows = list(self.batch.rows)
        self.batch.keep([])
        return rows

    def clear_queue(self) -> list[Sequence]:
        """The waiting requests, all leaving the queue."""
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        return waiting

    def _notify(self) -> None:  # with self._cond held
        self._changes += 1
        self._cond.notify_all()

    def _runnable(self, seq: Sequence) -> bool:
        """Whether waiting ``seq`` can leave the queue now (cancelled, or its adapter can get a slot)."""
        return seq.cancelled or all(self._can_acquire(use.key) for use in seq.adapters)

    def _next_waiting(self, cancelled: list[Sequence]) -> Sequence | None:
        """The oldest waiting request that can run now (others keep their place); cancelled
        requests met on the way leave the queue into ``cancelled``."""
        with self._cond:
            waiting = list(self._waiting)
        for seq in waiting:  # asked outside the lock, as in wait_for_work
            if not self._runnable(seq):
                continue
            with self._cond:
                if seq not in self._waiting:  # the queue was cleared meanwhile
                    continue
                self._waiting.remove(seq)
            if not seq.cancelled:
                return seq
            cancelled.append(seq)
        return None
