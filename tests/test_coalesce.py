"""Coalesced streaming (what a Ray replica sends the replica that relayed a request to it): the first event alone, then batches
whose merged events say exactly what the unbatched ones said."""

from __future__ import annotations

import asyncio

import pytest

from lora_kit.engine.types import GenerationOutput
from lora_kit.server.coalesce import coalesced, merge


def events(n: int) -> list[GenerationOutput]:
    out = [GenerationOutput(text=f" w{i}", token_ids=[i], completion_tokens=i + 1, prompt_tokens=5) for i in range(n)]
    out[-1].finished, out[-1].finish_reason = True, "length"
    return out


async def source(items, fail: Exception | None = None, closed: list | None = None, pause: asyncio.Event | None = None):
    try:
        for i, item in enumerate(items):
            if pause is not None and i == 1:
                await pause.wait()
            yield item
        if fail is not None:
            raise fail
    finally:
        if closed is not None:
            closed.append(True)


async def collect(stream) -> list[GenerationOutput]:
    return [e async for e in stream]


def test_merge_joins_text_and_ids_and_keeps_the_last_finish():
    merged = merge(events(4))
    assert merged.text == " w0 w1 w2 w3" and merged.token_ids == [0, 1, 2, 3]
    assert merged.finished and merged.finish_reason == "length" and merged.completion_tokens == 4
    assert merged.prompt_tokens == 5
    one = events(1)
    assert merge(one) is one[0]


def test_the_first_event_goes_alone_and_the_rest_together():
    got = asyncio.run(collect(coalesced(source(events(6)), interval=30.0)))
    assert [e.token_ids for e in got] == [[0], [1, 2, 3, 4, 5]]  # the final event ends the batch at once
    assert "".join(e.text for e in got) == "".join(e.text for e in events(6))
    assert got[-1].finished and got[-1].finish_reason == "length" and got[-1].completion_tokens == 6


def test_events_apart_by_more_than_the_interval_go_apart():
    async def run():
        pause = asyncio.Event()
        stream = coalesced(source(events(3), pause=pause), interval=0.0001)
        first = await stream.__anext__()  # sent before the source goes on
        pause.set()
        return [first] + await collect(stream)

    got = asyncio.run(run())
    assert [e.token_ids for e in got][0] == [0]
    assert [t for e in got for t in e.token_ids] == [0, 1, 2]


def test_zero_interval_passes_every_event_through():
    got = asyncio.run(collect(coalesced(source(events(4)), interval=0)))
    assert [e.token_ids for e in got] == [[0], [1], [2], [3]]


def test_an_error_comes_after_the_events_before_it():
    async def run():
        seen = []
        with pytest.raises(RuntimeError, match="replica lost"):
            async for e in coalesced(source(events(3)[:2], fail=RuntimeError("replica lost")), interval=30.0):
                seen.append(e)
        return seen

    seen = asyncio.run(run())
    assert [t for e in seen for t in e.token_ids] == [0, 1]


def test_closing_early_closes_the_source():
    async def run():
        closed: list = []
        pause = asyncio.Event()  # never set: the source waits after its first event
        stream = coalesced(source(events(5), closed=closed, pause=pause), interval=30.0)
        await stream.__anext__()
        await stream.aclose()  # the client left
        return closed

    assert asyncio.run(run()) == [True]
