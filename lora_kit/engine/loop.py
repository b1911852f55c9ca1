"""The decode loop: scheduler -> runner -> output, one step at a time, in a background thread.

Each step admits the waiting requests that can join (prefilled together), then decodes one
token for every running row. Finished rows leave the batch before their client hears they
are finished, so whoever hears "finished" sees them gone. A finished request's slot is
released through the runner, under its model lock, whether it ended normally or in error.

One request can never fail another. An error while preparing, sampling or post-processing
one row (its grammar, penalties, draw, detokenizing, its final event) fails that request
only: it leaves the batch (its KV cache rows are dropped) and the others carry on. A prefill
whose forward fails is retried request by request, so only the request that cannot be
prefilled fails, never the running batch. A decode forward that fails is not attributable to
a row and fails the running batch: the forward may have written some layers' cache columns
and not others, so no row's cache can be trusted any more. Bugs elsewhere in a step fail the
running batch too, but never stop the loop.

A failed request hears :class:`RequestFailed`, whose message holds only its request id; the
error itself is logged under that id (logger ``lora_kit.engine.loop``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lora_kit.engine.output import OutputProcessor
from lora_kit.engine.runner import ModelRunner
from lora_kit.engine.scheduler import Scheduler
from lora_kit.engine.sequence import Sequence
from lora_kit.engine.threads import set_thread_count
from lora_kit.engine.types import RequestFailed

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
        # Set before a stop (Engine.stop(shutting_down=True)): what the final cancel_all tells the
        # requests whose clients still listen, instead of a "cancelled" finish.
        self.stop_error: Callable[[], BaseException] | None = None

    def run(self) -> None:
        """Step until a stop is requested; then cancel whatever is left."""
        set_thread_count(self.threads)  # this thread's own OpenMP pool (see engine/threads.py)
        while self.scheduler.wait_for_work():
            try:
                self.step()
            except Exception as err:  # a bug must fail the requests in flight, never kill the loop
                self._fail_all("engine step", err)
        self.cancel_all()

    def step(self) -> None:
        """Admit what can join, then decode one token for every running row."""
        self._admit()
        self._decode()

    def cancel_all(self, error: Callable[[], BaseException] | None = None) -> None:
        """Finish every running and waiting request (the engine stops): as cancelled, or, with
        ``error`` (default: :attr:`stop_error`), with a fresh ``error()`` for each request whose
        client still listens (a shutdown: the server answers it with its error, not a short answer)."""
        error = error or self.stop_error
        for seq in self.scheduler.clear_batch() + self.scheduler.clear_queue():
            if error is None or seq.cancelled:
                self._finish(seq, "cancelled", emit=True)
            else:
                self._finish_error(seq, error())

    # -- steps ---------------------------------------------------------------------------

    def _admit(self) -> None:
        admission = self.scheduler.admit()
        for seq in admission.cancelled:
            self._finish(seq, "cancelled", emit=False)  # nobody listens any more
        for seq, err in admission.failed:
            self._finish_error(seq, err)
        for seq, exc in admission.crashed:  # logged with its request id; the client hears only the id
            self._fail(seq, "adapter load", exc)
        if admission.joining:
            try:
                waves = self.runner.waves(admission.joining)  # rows sharing a long uncached prefix: two
            except Exception:  # noqa: BLE001 - only an optimisation: prefill them together
                logger.exception("splitting a prefill into waves failed")
                waves = [admission.joining]
            for wave in waves:
                self._prefill(wave)

    def _prefill(self, group: list[Sequence]) -> None:
        """Prefill ``group`` and let it join; if the forward fails, each request is retried alone."""
        try:
            cache, mask, tokens = self.runner.prefill(group)
        except Exception as err:  # they are not in the batch yet: the batch is untouched
            if len(group) == 1:
                self._fail(group[0], "prefill", err)
                return
            ids = ", ".join(s.request_id for s in group)
            logger.warning("prefill of %d requests (%s) failed (%r); retrying each alone", len(group), ids, err)
            for seq in group:
                self._prefill([seq])
            return
        try:
            self.scheduler.join(group, cache, mask, tokens)  # join first: whoever hears a token sees it running
        except Exception as err:  # a bug: the batch may be half-merged, the step fails it (see run)
            for seq in group:
                self._fail(seq, "join", err)
            raise
        self._record(group)

    def _decode(self) -> None:
        for seq in self.scheduler.cancelled_rows():
            self._finish(seq, "cancelled", emit=True)
        if self.scheduler.batch.rows:
            rows = list(self.scheduler.batch.rows)
            try:
                self.runner.decode(self.scheduler.batch)
            except Exception as err:  # the forward: every row's cache may be half-written
                self._fail_all("decode", err)
                return
            self._record(rows)

    def _record(self, rows: list[Sequence]) -> None:
        """Stream each row's new token; rows that finished or failed leave the batch, then hear it."""
        done: list[tuple[Sequence, str | None]] = []
        for seq in rows:
            reason = None
            if seq.failure is None:
                try:
                    reason = self.output.process(seq)
                except Exception as err:  # noqa: BLE001 - this request fails alone
                    seq.fail("output", err)
            if seq.failure is not None or reason is not None:
                done.append((seq, reason))
        if done:
            finished = [seq for seq, reason in done if seq.failure is None and reason != "cancelled"]
            try:
                self.runner.remember_finished(self.scheduler.batch, finished)
            except Exception:  # noqa: BLE001 - only the prefix cache misses out
                logger.exception("caching the finished rows' prefixes failed")
            self.scheduler.leave([seq for seq, _ in done])
            for seq, reason in done:
                if seq.failure is not None:
                    self._fail(seq, *seq.failure)
                else:
                    assert reason is not None
                    self._finish(seq, reason, emit=True)

    # -- finishing -----------------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str, emit: bool) -> None:
        if seq.done:
            return
        try:
            final = self.output.final(seq, reason)
        except Exception as err:  # noqa: BLE001 - e.g. a tool call that cannot be parsed: this request only
            self._fail(seq, "finishing", err)
            return
        seq.done = True
        self._release(seq)
        self._count(final.finish_reason or reason)
        if emit:
            seq.push(final)

    def _fail(self, seq: Sequence, stage: str, err: BaseException) -> None:
        """Fail one request: log what went wrong under its request id, tell its client only the id."""
        if seq.done:
            return
        logger.error(
            "request %s failed at %s: %s: %s",
            seq.request_id,
            stage,
            err.__class__.__name__,
            err,
            exc_info=(type(err), err, err.__traceback__),
        )
        self._finish_error(seq, RequestFailed(seq.request_id))

    def _finish_error(self, seq: Sequence, err: BaseException) -> None:
        if seq.done:
            return
        seq.done = True
        self._count("error")
        self._release(seq)
        seq.push(err)

    def _release(self, seq: Sequence) -> None:
        slots, seq.slots = seq.slots, []
        for slot in slots:
            self.runner.release_slot(slot)  # under the model lock: no forward reads a slot being freed

    def _fail_all(self, stage: str, err: BaseException) -> None:
        """Fail every running request (an error no row is to blame for); logged once, with their ids."""
        rows = self.scheduler.clear_batch()
        logger.error(
            "engine %s failed; failing the %d running requests (%s): %s: %s",
            stage,
            len(rows),
            ", ".join(s.request_id for s in rows),
            err.__class__.__name__,
            err,
            exc_info=(type(err), err, err.__traceback__),
        )
        for seq in rows:
            self._finish_error(seq, RequestFailed(seq.request_id))

    def _count(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
