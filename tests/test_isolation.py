"""One request can never hurt another (issue 12, defect 1), and an internal failure tells its
client only a request id while the log gets the details (defect 4, the engine's half).

A failure is injected into one row of a running batch (its draw, its bookkeeping, its output
stage, its prefill forward; at its first token, i.e. inside the group's prefill, or later,
while the others stream): that request fails with RequestFailed and every other request
finishes with exactly the tokens it gives alone. Tiny temperatures sample greedily.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from helpers import MISTRAL_ADAPTERS, make_peft_init_adapter, mistral_engine, prompts

from lora_kit.engine import EngineError, GenerationRequest, SamplingParams
from lora_kit.engine.sampling import RequestSampler, sample_rows
from lora_kit.engine.types import GREEDY_TEMPERATURE, RequestFailed


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_mistral_dir):
    root = tmp_path_factory.mktemp("isolation-adapters")
    targets, r, alpha, rslora = MISTRAL_ADAPTERS["qv"]
    return {"qv": make_peft_init_adapter(tiny_mistral_dir, root / "qv", targets, r, alpha, rslora, seed=2)}


@pytest.fixture(scope="module")
def eng(tiny_mistral_dir, word_tokenizer, adapters):
    engine = mistral_engine(tiny_mistral_dir, word_tokenizer, adapters)
    yield engine
    engine.stop()


def others(tok) -> list[GenerationRequest]:
    """The requests that must not notice: greedy on the base, greedy with an adapter, seeded sampling."""
    ps = prompts(tok)
    return [
        GenerationRequest(ps[0], SamplingParams(max_tokens=10, ignore_eos=True)),
        GenerationRequest(ps[1], SamplingParams(max_tokens=10, ignore_eos=True), adapter="qv"),
        GenerationRequest(ps[2], SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.5, seed=7)),
    ]


def alone(eng, requests: list[GenerationRequest]) -> list[list[int]]:
    return [eng.generate_sync(r).token_ids for r in requests]


def outcome(eng, seq):
    """The aggregated output of a submitted request, or the error it failed with."""
    try:
        return eng.result(seq)
    except EngineError as err:
        return err


def raise_on_call(n: int, message: str = "injected"):
    """A function that counts its calls and raises on the n-th (and later ones)."""
    calls = {"n": 0}

    def wrap(original):
        def inner(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= n:
                raise RuntimeError(f"{message} at call {calls['n']} in /srv/secret/path")
            return original(*args, **kwargs)

        return inner

    return wrap


@pytest.mark.parametrize("stage", ["draw", "accept", "output"])
@pytest.mark.parametrize("at_token", [1, 3])
def test_a_failing_row_fails_alone(eng, word_tokenizer, stage, at_token, caplog):
    # Old code: the row's exception escaped the step and the loop failed every running request
    # (at token 1: the whole prefill group), so the others below did not finish.
    reference = alone(eng, others(word_tokenizer))
    victim_prompt = prompts(word_tokenizer)[3]
    sampled = stage == "draw"  # a greedy-only batch never calls draw: the victim samples
    victim = GenerationRequest(
        victim_prompt,
        SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0 if sampled else 0.0, seed=1),
        request_id=f"victim-{stage}-{at_token}",
    )
    eng.stop()
    seqs = [eng.submit(r) for r in others(word_tokenizer)]
    bad = eng.submit(victim)
    seqs.insert(1, bad)  # in the middle of the batch: the rows after it must keep their own tokens
    if stage == "draw":
        bad.sampler.draw = raise_on_call(at_token)(bad.sampler.draw)
    elif stage == "accept":
        bad.sampler.observe = raise_on_call(at_token)(bad.sampler.observe)
    else:
        process = eng._loop.output.process
        failing = raise_on_call(at_token)(process)
        eng._loop.output.process = lambda seq: failing(seq) if seq is bad else process(seq)
    try:
        with caplog.at_level(logging.ERROR, logger="lora_kit.engine"):
            eng.start()
            results = [outcome(eng, s) for s in seqs]
    finally:
        eng._loop.output.__dict__.pop("process", None)
    failed = results.pop(1)
    assert all(not isinstance(r, Exception) for r in results), results  # the others finished
    assert [r.token_ids for r in results] == reference
    assert all(r.finish_reason == "length" for r in results)
    assert isinstance(failed, RequestFailed), failed
    # The client hears the request id only; the log has the error under that id.
    assert failed.request_id == victim.request_id and victim.request_id in str(failed)
    assert "RuntimeError" not in str(failed) and "/srv" not in str(failed)
    logged = [r for r in caplog.records if victim.request_id in r.getMessage()]
    assert logged and logged[0].exc_info and "injected" in str(logged[0].exc_info[1])
    assert eng.stats()["running"] == 0
    # The engine serves on, with the same tokens.
    assert alone(eng, others(word_tokenizer)) == reference


def test_a_prefill_failure_never_fails_the_running_batch(eng, word_tokenizer, monkeypatch, caplog):
    # Old code: the failed prefill re-raised into the step, which failed the running batch, and
    # the whole group being prefilled failed with it.
    reference = alone(eng, others(word_tokenizer))
    ps = prompts(word_tokenizer)
    runner = eng._runner
    prefill = runner.prefill

    def failing_prefill(group):
        if any(s.request.request_id == "poison" for s in group):
            raise RuntimeError("prefill boom in /srv/secret")
        return prefill(group)

    monkeypatch.setattr(runner, "prefill", failing_prefill)
    first, *rest = others(word_tokenizer)
    first.params.max_tokens = 30

    async def scenario():
        eng.stop()
        eng.start()
        running = eng.generate(first)
        got = [await running.__anext__()]  # running now
        # A group of three joins while it runs: one of them cannot be prefilled.
        poison = GenerationRequest(ps[3], SamplingParams(max_tokens=5), request_id="poison")
        seqs = [eng.submit(r) for r in (rest[0], poison, rest[1])]
        got += [e async for e in running]
        return got, [await asyncio.to_thread(outcome, eng, s) for s in seqs]

    with caplog.at_level(logging.ERROR, logger="lora_kit.engine"):
        events, (a, failed, b) = asyncio.run(scenario())
    assert events[-1].finished and events[-1].finish_reason == "length"  # the running stream went on
    assert not isinstance(a, Exception) and not isinstance(b, Exception), (a, b)  # its group too
    assert isinstance(failed, RequestFailed) and "poison" in str(failed) and "boom" not in str(failed)
    running_ids = [t for e in events for t in e.token_ids]
    monkeypatch.undo()
    first_alone = others(word_tokenizer)[0]
    first_alone.params.max_tokens = 30
    assert running_ids == eng.generate_sync(first_alone).token_ids
    assert [a.token_ids, b.token_ids] == reference[1:]
    assert any("poison" in r.getMessage() and r.exc_info for r in caplog.records)


def test_tiny_temperature_is_greedy_and_hurts_nobody(eng, word_tokenizer):
    # Old code: logits / 1e-40 overflowed to inf, softmax gave NaN, multinomial raised in the
    # prefill, and every request in flight failed with it.
    ps = prompts(word_tokenizer)
    reference = alone(eng, others(word_tokenizer))
    greedy = eng.generate_sync(GenerationRequest(ps[3], SamplingParams(max_tokens=10, ignore_eos=True))).token_ids
    eng.stop()
    tiny = GenerationRequest(ps[3], SamplingParams(max_tokens=10, ignore_eos=True, temperature=1e-40, seed=5))
    seqs = [eng.submit(r) for r in [tiny, *others(word_tokenizer)]]
    eng.start()
    results = [eng.result(s) for s in seqs]
    assert results[0].token_ids == greedy
    assert [r.token_ids for r in results[1:]] == reference


def test_sampling_never_draws_from_inf_or_nan():
    logits = torch.tensor([[1.0, 30.0, -2.0, 0.5]])
    assert RequestSampler(SamplingParams(temperature=1e-40), [], 4, torch.device("cpu")).greedy
    assert RequestSampler(SamplingParams(temperature=GREEDY_TEMPERATURE / 2), [], 4, torch.device("cpu")).greedy
    assert not RequestSampler(SamplingParams(temperature=GREEDY_TEMPERATURE), [], 4, torch.device("cpu")).greedy
    # A tiny repetition penalty sends a seen positive logit to +inf: it is the best token, not a NaN.
    params = SamplingParams(temperature=1.0, repetition_penalty=1e-45, seed=0)
    sampler = RequestSampler(params, [1], 4, torch.device("cpu"))
    tokens, failed = sample_rows(logits.clone(), [sampler])
    assert tokens == [1] and not failed
    # A row that cannot be sampled (every token masked) fails alone.
    ok = RequestSampler(SamplingParams(temperature=1.0, seed=0), [], 4, torch.device("cpu"))
    masked = torch.stack([torch.full((4,), float("-inf")), logits[0]])
    broken = RequestSampler(SamplingParams(temperature=1.0, seed=0), [], 4, torch.device("cpu"))
    tokens, failed = sample_rows(masked, [broken, ok])
    assert list(failed) == [0] and tokens[0] == 0 and 0 <= tokens[1] < 4


def test_internal_errors_reach_clients_as_a_request_id_only(caplog):
    from lora_kit.engine import AdapterError, InvalidRequest
    from lora_kit.server.generation import engine_error

    api = engine_error(RequestFailed("rid-1"))
    assert api.status == 500 and "rid-1" in api.message and "RuntimeError" not in api.message
    with caplog.at_level(logging.ERROR, logger="lora_kit.server"):
        api = engine_error(EngineError("failed to read /srv/registry/versions/abc"), request_id="rid-2")
        crash = engine_error(KeyError("/srv/secret"), request_id="rid-3")
    assert api.status == 500 and "rid-2" in api.message and "/srv" not in api.message
    assert "KeyError" not in crash.message and "/srv" not in crash.message and "rid-3" in crash.message
    assert any("rid-2" in r.getMessage() and "/srv/registry" in r.getMessage() for r in caplog.records)
    # User errors keep saying what to change.
    assert engine_error(InvalidRequest("temperature must be between 0 and 5")).status == 400
    assert "cannot be served" in engine_error(AdapterError("rank 999 > 64"), "x").message


@pytest.fixture
def server(eng, tmp_path):
    from lora_kit.registry import Registry
    from lora_kit.server.app import create_app
    from lora_kit.server.config import ServerConfig
    from lora_kit.server.main import BackgroundServer

    eng.start()
    srv = BackgroundServer(
        create_app(eng, Registry(tmp_path / "registry"), ServerConfig(uploads_dir=tmp_path / "uploads"))
    )
    srv.start()
    yield srv
    srv.stop()


def test_http_failure_names_the_request_id_and_hurts_nobody(server, eng, word_tokenizer, monkeypatch, caplog):
    # Old code: the body said "Internal server error: prefill failed: RuntimeError: ..." (the class,
    # the server's path) and the temperature 1e-40 request failed everything in flight.
    import httpx

    url = f"{server.url}/client/v4/accounts/acc/ai/run/{eng.model_name}"
    body = {"prompt": "What is two plus two ?", "raw": True, "max_tokens": 6}
    with httpx.Client(timeout=120) as client:
        greedy = client.post(url, json={**body, "temperature": 0}).json()["result"]["response"]
        tiny = client.post(url, json={**body, "temperature": 1e-40})
        assert tiny.status_code == 200 and tiny.json()["result"]["response"] == greedy
        runner = eng._runner
        monkeypatch.setattr(runner, "prefill", lambda group: (_ for _ in ()).throw(RuntimeError("boom in /srv/x")))
        with caplog.at_level(logging.ERROR, logger="lora_kit.engine"):
            failed = client.post(url, json=body)
            streamed = client.post(url, json={**body, "stream": True})
    rid = failed.headers["x-request-id"]
    message = failed.json()["errors"][0]["message"]
    assert failed.status_code == 500 and rid in message
    assert "RuntimeError" not in message and "/srv" not in message and "boom" not in message
    assert any(rid in r.getMessage() and r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
    # A stream that fails before its first token is a status too, with its own id.
    stream_rid = streamed.headers["x-request-id"]
    assert streamed.status_code == 500 and stream_rid in streamed.text and "RuntimeError" not in streamed.text


def test_non_finite_sampling_settings_are_invalid_requests():
    from lora_kit.engine import InvalidRequest

    for bad in (
        {"temperature": float("nan")},
        {"repetition_penalty": float("nan")},
        {"repetition_penalty": float("inf")},
        {"frequency_penalty": float("nan")},
        {"presence_penalty": float("-inf")},
    ):
        with pytest.raises(InvalidRequest):
            SamplingParams(**bad).validate()
    SamplingParams(temperature=1e-40, repetition_penalty=1e-45, frequency_penalty=-2.0).validate()


def test_an_unexpected_error_taking_a_slot_fails_that_request_only(eng, word_tokenizer, monkeypatch, caplog):
    # Old code: admission caught only EngineError from the slot's adapter load; an OSError escaped
    # the step, failed the running batch, and the requests already taken from the queue never
    # finished (their clients waited forever).
    scheduler = eng._scheduler
    acquire = scheduler._acquire

    def failing_acquire(key, path):
        if key == "qv":
            raise OSError(f"disk error reading {path}")
        return acquire(key, path)

    first = others(word_tokenizer)[0]
    first.params.max_tokens = 20
    victim = GenerationRequest(prompts(word_tokenizer)[1], SamplingParams(max_tokens=5), adapter="qv")

    async def scenario():
        eng.stop()
        eng.start()
        running = eng.generate(first)
        got = [await running.__anext__()]
        monkeypatch.setattr(scheduler, "_acquire", failing_acquire)
        seq = eng.submit(victim)
        got += [e async for e in running]
        return got, await asyncio.to_thread(outcome, eng, seq)

    with caplog.at_level(logging.ERROR, logger="lora_kit.engine"):
        events, failed = asyncio.run(scenario())
    monkeypatch.undo()
    assert events[-1].finished and events[-1].finish_reason == "length"  # the running stream went on
    assert isinstance(failed, RequestFailed) and "disk error" not in str(failed)
    assert any("disk error" in r.getMessage() for r in caplog.records)
