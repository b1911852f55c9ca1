"""The decode loop: scheduler -> runner -> output, one step at a time, in a background thread.

Each step admits the waiting requests that can join (prefilled together), then decodes one
token for every running row. Finished rows leave the batch before their client hears they
are finished, so whoever hears "finished" sees them gone. A finished request's slot is
released through the runner, under its model lock, whether it ended normally or in error.
"""

from __future__ import annotations

import logging

import torch

from lora_kit.engine.output import OutputProcessor
from lora_kit.engine.runner import ModelRunner
from lora_kit.engine.scheduler import Scheduler
from lora_kit.engine.sequence import Sequence
from lora_kit.engine.types import EngineError

logger = logging.getLogger(__name__)


class EngineLoop:
    """Drives the scheduler, the runner and the output stage; counts finished requests by reason."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, output: OutputProcessor, threads: int) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.output = output
        self.threads = threads
        # Finished requests by reason (stop, length, tool_calls, cancelled, error): for operators.
        self.finished: dict[str, int] = {}

    def run(self) -> None:
        """Step until a stop is requested; then cancel whatever is left."""
        torch.set_num_threads(self.threads)  # this thread's own OpenMP pool (see engine/threads.py)
        while self.scheduler.wait_for_work():
            try:
                self.step()
            except Exception as err:  # a bug must fail the requests in flight, never kill the loop
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(EngineError(f"internal engine error: {err.__class__.__name__}: {err}"))
        self.cancel_all()

    def step(self) -> None:
        """Admit what can join, then decode one token for every running row."""
        self._admit()
        self._decode()

    def cancel_all(self) -> None:
        """Finish every running and waiting request as cancelled (the engine stops)."""
        for seq in self.scheduler.clear_batch() + self.scheduler.clear_queue():
            self._finish(seq, "cancelled", emit=True)

    # -- steps ---------------------------------------------------------------------------

    def _admit(self) -> None:
        admission = self.scheduler.admit()
        for seq in admission.cancelled:
            self._finish(seq, "cancelled", emit=False)  # nobody listens any more
        for seq, err in admission.failed:
            self._finish_error(seq, err)
        group = admission.joining
        if not group:
            return
        try:
            cache, mask, tokens = self.runner.prefill(group)
        except Exception as err:  # they are not in the batch yet: fail them here
            for seq in group:
                self._finish_error(seq, EngineError(f"prefill failed: {err.__class__.__name__}: {err}"))
            raise
        self.scheduler.join(group, cache, mask, tokens)  # join first: whoever hears a token sees it running
        self._record(group)

    def _decode(self) -> None:
        for seq in self.scheduler.cancelled_rows():
            self._finish(seq, "cancelled", emit=True)
        if self.scheduler.batch.rows:
            rows = list(self.scheduler.batch.rows)
            self.runner.decode(self.scheduler.batch)
            self._record(rows)

    def _record(self, rows: list[Sequence]) -> None:
        """Stream each row's new token; rows that finished leave the batch, then hear it."""
        reasons = [self.output.process(seq) for seq in rows]
        done = [(seq, reason) for seq, reason in zip(rows, reasons) if reason is not None]
        if done:
            self.scheduler.leave([seq for seq, _ in done])
            for seq, reason in done:
                self._finish(seq, reason, emit=True)

    # -- finishing -----------------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str, emit: bool) -> None:
        if seq.done:
            return
        seq.done = True
        self._release(seq)
        final = self.output.final(seq, reason)
        self._count(final.finish_reason or reason)
        if emit:
            seq.push(final)

    def _finish_error(self, seq: Sequence, err: BaseException) -> None:
        if seq.done:
            return
        seq.done = True
        self._count("error")
        self._release(seq)
        seq.push(err)

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.runner.release_slot(seq.slot)  # under the model lock: no forward reads a slot being freed
            seq.slot = None

    def _fail_all(self, err: BaseException) -> None:
        for seq in self.scheduler.clear_batch():
            self._finish_error(seq, err)

    def _count(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
