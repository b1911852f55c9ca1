"""One request in flight: its inputs, its sampling and output state, and its event stream.

Created by the engine when a request is submitted; the scheduler moves it from the waiting
queue into the running batch, the runner appends the tokens it samples, the output stage turns
them into events, and a consumer drains ``events`` (an async iterator or a blocking caller).
"""

from __future__ import annotations

import asyncio
import queue
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lora_kit.engine.constraints import Constraint
from lora_kit.engine.lora_layer import RowAdapters
from lora_kit.engine.sampling import RequestSampler
from lora_kit.engine.types import GenerationOutput, GenerationRequest


@dataclass(frozen=True)
class AdapterUse:
    """One adapter a request runs with: its canonical key, its directory, and its weight in a
    mix (None: the adapter alone, exactly as it was trained)."""

    key: str
    path: Path
    weight: float | None = None


@dataclass
class OutputState:
    """The text side of one request."""

    emitted: int = 0  # characters of ``text`` already sent
    sent_ids: int = 0  # generated tokens already sent
    decoded: str = ""  # detokenized text so far (before stop-string cuts)
    prefix_offset: int = 0  # incremental detokenization window over the generated ids
    read_offset: int = 0
    stop_at: int | None = None  # where the first stop string starts in ``decoded``
    text: str = ""  # ``decoded`` cut at the first stop string: the reply


@dataclass(eq=False)  # identity: a request is itself, whatever its state
class Sequence:
    """One request in flight: its inputs, decoding state and output stream."""

    request: GenerationRequest
    adapters: tuple[AdapterUse, ...]  # () for the base; several for a weighted mix
    sampler: RequestSampler
    constraint: Constraint | None
    events: queue.SimpleQueue[GenerationOutput | BaseException] = field(default_factory=queue.SimpleQueue)
    slots: list[int] = field(default_factory=list)  # the adapters' slots, held while the request runs
    generated: list[int] = field(default_factory=list)
    output: OutputState = field(default_factory=OutputState)
    cancelled: bool = False  # set by the consumer (any thread); the loop acts on it at the next step
    done: bool = False
    # Set by an async consumer so the loop's thread can wake it.
    loop: asyncio.AbstractEventLoop | None = None
    wakeup: asyncio.Event | None = None
    # Why this request must fail (the stage, the error): set by the runner or the output stage when
    # preparing, sampling or post-processing its row raised; the loop fails it alone.
    failure: tuple[str, BaseException] | None = None
    request_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.request_id = self.request.request_id or uuid.uuid4().hex

    def row_adapters(self) -> RowAdapters:
        """What its row of a forward runs with (see :data:`~lora_kit.engine.lora_layer.RowAdapters`)."""
        if not self.slots:
            return None
        if len(self.adapters) == 1 and self.adapters[0].weight is None:
            return self.slots[0]
        return tuple((slot, float(use.weight)) for slot, use in zip(self.slots, self.adapters))  # type: ignore[arg-type]

    def identity(self) -> tuple[tuple[str, float | None], ...]:
        """What its forward runs with, as the prefix cache keys it: () for the base, else each
        adapter's canonical key and weight (None alone), in order."""
        return tuple((use.key, use.weight) for use in self.adapters)

    def fail(self, stage: str, err: BaseException) -> None:
        """Mark this request failed at ``stage`` (the first failure wins)."""
        if self.failure is None:
            self.failure = (stage, err)

    def accept(self, token: int) -> None:
        """Record a sampled token: in the output, the sampler's statistics and the grammar's state."""
        self.generated.append(token)
        self.sampler.observe(token)
        if self.constraint is not None:
            self.constraint.accept(token)

    def push(self, item: GenerationOutput | BaseException) -> None:
        """Deliver an event from the loop's thread (wakes an async consumer)."""
        self.events.put(item)
        loop, wakeup = self.loop, self.wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass
