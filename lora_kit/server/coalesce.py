"""Coalesced streaming: a stream's events sent in batches, the first at once.

Every event a replica yields for a relayed request crosses Ray as its own object (serialised,
sent, awaited by the relaying replica, turned into an SSE event): at 16 streams of ~15 tokens/s
each, hundreds of objects a second on a machine whose CPUs also run the engine. Ray Serve LLM
batches its streams the same way: the first event goes at once (time to first token does not
grow), then whatever arrived within an interval goes as one event. Merged events concatenate to exactly what the unbatched
ones said: the same text, the same token ids, the last one's finish and usage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from lora_kit.engine.types import GenerationOutput

_END = object()


def merge(events: list[GenerationOutput]) -> GenerationOutput:
    """One event saying what ``events`` (consecutive, in order) said: text and token ids joined; the
    finish, usage and tool calls of the last (only the last can be final)."""
    if len(events) == 1:
        return events[0]
    last = events[-1]
    return GenerationOutput(
        text="".join(e.text for e in events),
        token_ids=[t for e in events for t in e.token_ids],
        finished=last.finished,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        tool_calls=last.tool_calls,
        replica=last.replica,
    )


async def coalesced(events: AsyncIterator[GenerationOutput], interval: float) -> AsyncIterator[GenerationOutput]:
    """``events`` with those arriving within ``interval`` seconds of each other merged: the first
    event alone and at once, then each batch when ``interval`` has passed since its first event (or
    at once when it finishes the stream). ``interval`` <= 0 passes every event through alone. An
    error of ``events`` is raised after the events before it; closing this closes ``events``."""
    if interval <= 0:
        async for event in events:
            yield event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, in order
            queue.put_nowait(err)
        else:
            queue.put_nowait(_END)

    task = asyncio.ensure_future(pump())
    try:
        first = True
        while True:
            batch, done = await _next_batch(queue, 0.0 if first else interval)
            first = False
            if batch:
                yield merge(batch)
            if done is not None:
                if isinstance(done, BaseException):
                    raise done
                return
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        closer = getattr(events, "aclose", None)
        if closer is not None:
            with contextlib.suppress(BaseException):
                await closer()


async def _next_batch(queue: asyncio.Queue, interval: float) -> tuple[list[GenerationOutput], object | None]:
    """Events for one batch: wait for the first, then take what arrives until ``interval`` has
    passed or a final event comes. Returns the batch and the end marker or error met (else None)."""
    item = await queue.get()
    if item is _END or isinstance(item, BaseException):
        return [], item
    batch = [item]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + interval
    while not batch[-1].finished:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            item = await asyncio.wait_for(queue.get(), left)
        except asyncio.TimeoutError:
            break
        if item is _END or isinstance(item, BaseException):
            return batch, item
        batch.append(item)
    return batch, None
