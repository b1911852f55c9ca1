"""The multi-adapter engine: PEFT parity, batch invariance, seeds, grammars, errors, slots,
its config and the CLI flags derived from it, and its backends.

Real PEFT adapters (random, non-zero lora_B) on a tiny Mistral and on the embedded model,
fp32 on the CPU. References are plain PEFT ``generate`` on a separate copy of the base.
Both LoRA paths run: the CPU backend (BGMV kernel, packed weights) and the torch backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import time
import typing
from pathlib import Path

import helpers
import pytest
import torch
from helpers import MISTRAL_ADAPTERS, greedy, make_peft_init_adapter, mistral_engine, prompts, run_together

from lora_kit import chat
from lora_kit.engine import (
    AdapterError,
    Engine,
    EngineConfig,
    EngineError,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    SamplingParams,
    UnknownAdapter,
    mapping_resolver,
)
from lora_kit.engine.backends import bgmv
from lora_kit.engine.lora_layer import BatchedLoraLinear, LoraContext

needs_compiler = helpers.needs_compiler()


def peft_greedy(
    base_dir: Path,
    adapter_dir: Path | None,
    prompt: list[int],
    max_new: int,
    stops: list[int],
    ignore_eos: bool = False,
) -> list[int]:
    """Plain transformers/PEFT greedy generate for one prompt: the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
            eos_token_id=stops, pad_token_id=stops[0], min_new_tokens=max_new if ignore_eos else None,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def mistral_adapters(tmp_path_factory, tiny_mistral_dir):
    root = tmp_path_factory.mktemp("mistral-adapters")
    return {
        name: make_peft_init_adapter(tiny_mistral_dir, root / name, t, r, a, rs, seed=i + 1)
        for i, (name, (t, r, a, rs)) in enumerate(MISTRAL_ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def engine(tiny_mistral_dir, word_tokenizer, mistral_adapters):
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters, max_slots=4)
    yield eng
    eng.stop()


# -- parity with PEFT and batch invariance --------------------------------------------------


@pytest.fixture(scope="module")
def exact_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters):
    """The torch backend: transformers' own linear kernels and torch's bmm for the LoRA rows (the CUDA code path)."""
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters, backend="torch", max_slots=4)
    yield eng
    eng.stop()


def test_cpu_backend_packs_every_linear_and_the_head_and_torch_backend_none(engine, exact_engine):
    assert engine.backend.name == "cpu" and exact_engine.backend.name == "torch"
    assert engine.packed_layers == len(engine._layers) + 1 == 7 * 2 + 1  # 2 layers of 7 projections, the head
    assert exact_engine.packed_layers == 0


@needs_compiler
def test_cpu_backend_adds_lora_rows_with_the_kernel(engine, exact_engine):
    assert engine.cpu_kernel is True and engine.backend.lora_path == "BGMV kernel"
    assert exact_engine.cpu_kernel is False and exact_engine.backend.lora_path == "torch bmm"


ENGINES = ["engine", "exact_engine"]  # packed weights + BGMV kernel; transformers' kernels + bmm


@pytest.mark.parametrize("which", ENGINES)
def test_greedy_matches_peft_generate(which, request, tiny_mistral_dir, word_tokenizer, mistral_adapters):
    engine = request.getfixturevalue(which)
    stops = sorted(engine.stop_ids)
    prompt = prompts(word_tokenizer)[0]
    outputs = {}
    for name in [None, *MISTRAL_ADAPTERS]:
        ref = peft_greedy(tiny_mistral_dir, mistral_adapters.get(name), prompt, 12, stops)
        got = engine.generate_sync(greedy(prompt, name))
        assert got.token_ids == ref, name
        assert got.completion_tokens == len(ref)
        outputs[name] = ref
    # The adapters really change the output, else parity would prove nothing.
    assert len({tuple(v) for v in outputs.values()}) == len(outputs)


def test_long_generation_across_cache_growth(engine, tiny_mistral_dir, word_tokenizer):
    # 200 tokens: the running batch's cache outgrows its spare columns and is reallocated
    # several times (lora_kit/engine/kv_cache.py). The base row must still equal plain
    # generate token for token (with an adapter, PEFT's different order of float operations
    # flips a near-tie after ~120 tokens of this random model, with either cache), and long
    # rows that leave at different steps, forcing rebuilds, must equal their runs alone.
    ps = prompts(word_tokenizer)
    ref = peft_greedy(tiny_mistral_dir, None, ps[1], 200, sorted(engine.stop_ids), ignore_eos=True)
    base = engine.generate_sync(GenerationRequest(ps[1], SamplingParams(max_tokens=200, ignore_eos=True)))
    assert base.token_ids == ref and len(ref) == 200
    reqs = [
        GenerationRequest(ps[i], SamplingParams(max_tokens=n, ignore_eos=True), adapter=a)
        for i, (n, a) in enumerate([(150, "all"), (90, "qv"), (170, None), (120, "all")])
    ]
    alone = [engine.generate_sync(r).token_ids for r in reqs]
    assert [o.token_ids for o in run_together(engine, reqs)] == alone


def test_bf16_adapters_are_held_in_bf16_and_still_apply(tiny_mistral_dir, word_tokenizer, mistral_adapters):
    with pytest.raises(ValueError, match="adapter_dtype"):
        mistral_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters, adapter_dtype="int8")
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters, max_slots=2, adapter_dtype="bfloat16")
    try:
        assert eng.adapter_dtype == torch.bfloat16 and eng.cpu_kernel is bgmv.load()  # the kernel reads bf16 too
        prompt = prompts(word_tokenizer)[0]
        base = eng.generate_sync(greedy(prompt, None)).token_ids
        tuned = eng.generate_sync(greedy(prompt, "all")).token_ids
        layer = eng._layers["model.layers.0.self_attn.q_proj"]
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
        assert tuned != base
    finally:
        eng.stop()


@pytest.mark.parametrize("which", ENGINES)
def test_mixed_batch_equals_alone(which, request, word_tokenizer):
    engine = request.getfixturevalue(which)
    ps = prompts(word_tokenizer)
    reqs = [
        greedy(ps[0], "all", 10),
        greedy(ps[1], None, 6),
        greedy(ps[2], "qv", 12),
        greedy(ps[3], "mlp", 9),
        greedy(ps[0], "qv", 11),
        greedy(ps[1], "all", 12),
    ]
    alone = [engine.generate_sync(r).token_ids for r in reqs]
    together = run_together(engine, reqs)
    assert [o.token_ids for o in together] == alone
    assert len({len(a) for a in alone}) >= 3  # rows leave the batch at different steps


def test_shared_adapters_batch_equals_alone(engine, word_tokenizer):
    # Adapters shared by several rows, a base row, and adapters that target different
    # module subsets, in one batch.
    ps = prompts(word_tokenizer)
    names = ["all", "all", "all", "qv", "qv", None, "mlp", "mlp"]
    reqs = [greedy(ps[i % 4], name, 5 + i) for i, name in enumerate(names)]
    alone = [engine.generate_sync(r).token_ids for r in reqs]
    together = run_together(engine, reqs)
    assert [o.token_ids for o in together] == alone


def test_context_maps_rows_to_slots():
    ctx = LoraContext()
    cpu = torch.device("cpu")
    ctx.set_rows([0, 0, 0, 1, 1, None, 2, 2], zero_slot=9, device=cpu)
    assert ctx.slot_index.tolist() == [0, 0, 0, 1, 1, 9, 2, 2]  # 9 = the all-zero slot
    assert ctx.single is None and ctx.active == {0, 1, 2}
    version = ctx.version
    ctx.set_rows([4, 4], zero_slot=9, device=cpu)  # one adapter for every row: plain matmuls
    assert ctx.single == 4 and ctx.version == version + 1
    ctx.set_rows([4, None], zero_slot=9, device=cpu)  # a base row too: per row
    assert ctx.single is None and ctx.slot_index.tolist() == [4, 9]
    ctx.set_rows([None, None], zero_slot=9, device=cpu)
    assert ctx.slot_index is None and not ctx.active


def lora_layer(ctx: LoraContext) -> BatchedLoraLinear:
    """A 16 -> 24 layer with slots 0..2 holding adapters, slot 3 holding an adapter that does
    not target it (zeros, as SlotManager writes them) and the zero slot 4."""
    layer = BatchedLoraLinear(torch.nn.Linear(16, 24), "proj", ctx)
    layer.lora_A = torch.randn(5, 4, 16)  # (slot, rank, in)
    layer.lora_B = torch.randn(5, 4, 24)  # (slot, rank, out)
    layer.lora_A[3:] = 0
    layer.lora_B[3:] = 0
    layer.lora_B[2, 3:] = 0  # slot 2 has rank 3: padded with zeros
    layer.slots_with = {0, 1, 2}
    return layer


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_compiler), False], ids=["bgmv-kernel", "torch"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("slots", [[0, 0, 0, 1, 1, None, 2, 2], [0, 3, None, 2], [1, 1, 1]])
def test_batched_lora_linear_matches_per_row_products(slots, tokens, kernel):
    if kernel:
        assert bgmv.load(), bgmv.error()
    torch.manual_seed(0)
    ctx = LoraContext()
    ctx.kernel = bgmv.op() if kernel else None
    layer = lora_layer(ctx)
    x = torch.randn(len(slots), tokens, 16)
    ctx.set_rows(slots, zero_slot=4, device=torch.device("cpu"))
    with torch.inference_mode():
        got = layer(x)
    want = layer.base(x).detach()
    for row, slot in enumerate(slots):
        if slot is not None:
            want[row] += x[row] @ layer.lora_A[slot].T @ layer.lora_B[slot]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _StridedLinear(torch.nn.Linear):
    """A base whose output is a transposed view (as the AVX2 path's blocked bf16 product returned)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        return torch.addmm(self.bias[:, None], self.weight, flat.t()).t().reshape(*x.shape[:-1], -1)


@needs_compiler
def test_the_kernel_adds_into_a_strided_base_output_without_gathering():
    assert bgmv.load(), bgmv.error()
    torch.manual_seed(1)
    ctx = LoraContext()
    ctx.kernel = bgmv.op()
    layer = lora_layer(ctx)
    layer.base = _StridedLinear(16, 24)
    slots = [0, 1, None, 2]
    x = torch.randn(3, len(slots), 16).transpose(0, 1)  # (rows, tokens, in), not contiguous either
    ctx.set_rows(slots, zero_slot=4, device=torch.device("cpu"))
    with torch.inference_mode():
        assert not layer.base(x).is_contiguous()
        got = layer(x)
    want = layer.base(x).detach().clone()
    for row, slot in enumerate(slots):
        if slot is not None:
            want[row] += x[row] @ layer.lora_A[slot].T @ layer.lora_B[slot]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer._gathered is None  # the kernel added the rows: no gathered copies of the adapters


def test_kernel_rows_skip_base_rows_and_adapters_that_miss_the_module():
    ctx = LoraContext()
    layer = lora_layer(ctx)
    ctx.set_rows([0, 3, None, 2], zero_slot=4, device=torch.device("cpu"))
    assert ctx.row_slots.tolist() == [0, 3, -1, 2]
    assert layer._kernel_slots().tolist() == [0, -1, -1, 2]  # slot 3 reads nothing here
    ctx.set_rows([1, None], zero_slot=4, device=torch.device("cpu"))
    assert layer._kernel_slots().tolist() == [1, -1]


@needs_compiler
def test_bgmv_kernel_matches_float64_reference_and_checks_its_inputs():
    assert bgmv.load(), bgmv.error()
    op = bgmv.op()
    g = torch.Generator().manual_seed(0)
    cases = [  # rows, tokens per row, rank (8/16/64 compiled, 12 generic), (in, out), weight dtype
        (1, 1, 8, (64, 48), torch.float32), (3, 1, 12, (100, 37), torch.float32), (2, 5, 8, (40, 24), torch.float32),
        (9, 1, 16, (48, 160), torch.bfloat16), (33, 1, 64, (32, 16), torch.float32), (4, 3, 16, (96, 40), torch.bfloat16),
    ]  # fmt: skip
    for rows, tokens, rank, (fan_in, fan_out), dtype in cases:
        a = (torch.randn(4, rank, fan_in, generator=g) * 0.1).to(dtype)
        b = (torch.randn(4, rank, fan_out, generator=g) * 0.1).to(dtype)
        x, out = torch.randn(rows, tokens, fan_in, generator=g), torch.randn(rows, tokens, fan_out, generator=g)
        slots = torch.randint(-1, 4, (rows,), generator=g)
        want = out.double().clone()
        for n, s in enumerate(slots.tolist()):
            if s >= 0:
                want[n] += x[n].double() @ a[s].double().T @ b[s].double()
        op(out, x, a, b, slots)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    a, b = torch.zeros(2, 4, 8), torch.zeros(2, 4, 6)
    with pytest.raises(RuntimeError, match="out of range"):
        op(torch.zeros(1, 6), torch.zeros(1, 8), a, b, torch.tensor([2]))
    with pytest.raises(RuntimeError, match="shapes"):
        op(torch.zeros(1, 6), torch.zeros(1, 7), a, b, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="split"):
        op(torch.zeros(3, 6), torch.zeros(3, 8), a, b, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.zeros(1, 12)[:, ::2], torch.zeros(1, 8), a, b, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.zeros(1, 6), torch.zeros(1, 8, dtype=torch.float64), a, b, torch.tensor([0]))


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine, word_tokenizer):
    ps = prompts(word_tokenizer)
    params = dict(
        max_tokens=10,
        temperature=1.5,
        top_p=0.95,
        top_k=20,
        repetition_penalty=1.2,
        frequency_penalty=0.3,
        presence_penalty=0.2,
    )
    seeded = GenerationRequest(ps[1], SamplingParams(seed=1234, **params), adapter="all")
    others = [
        GenerationRequest(ps[0], SamplingParams(seed=7, **params), adapter="qv"),
        greedy(ps[2], None),
        GenerationRequest(ps[3], SamplingParams(temperature=2.0, max_tokens=8), adapter="mlp"),
    ]
    alone = engine.generate_sync(seeded)
    again = engine.generate_sync(seeded)
    together = run_together(engine, [others[0], seeded, *others[1:]])
    assert alone.token_ids == again.token_ids == together[1].token_ids
    assert alone.text == together[1].text
    other_seed = engine.generate_sync(GenerationRequest(ps[1], SamplingParams(seed=99, **params), adapter="all"))
    assert other_seed.token_ids != alone.token_ids


# -- streaming, stop strings, cancellation, queue ------------------------------------------


def test_stream_deltas_add_up_and_stop_strings_cut(engine, word_tokenizer):
    prompt = prompts(word_tokenizer)[2]
    full = engine.generate_sync(greedy(prompt, "qv", 12))

    async def collect(req):
        return [ev async for ev in engine.generate(req)]

    events = asyncio.run(collect(greedy(prompt, "qv", 12)))
    assert "".join(e.text for e in events) == full.text
    assert [t for e in events for t in e.token_ids] == full.token_ids
    assert events[-1].finished and events[-1].finish_reason == "length" and not any(e.finished for e in events[:-1])
    words = full.text.split()
    stop_word = words[len(words) // 2]
    cut = engine.generate_sync(GenerationRequest(prompt, SamplingParams(max_tokens=12, stop=[stop_word]), adapter="qv"))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop_word)]


def test_unknown_adapter_and_bad_requests(engine, word_tokenizer):
    prompt = prompts(word_tokenizer)[0]
    with pytest.raises(UnknownAdapter):
        engine.generate_sync(greedy(prompt, "missing"))
    with pytest.raises(UnknownAdapter):
        engine.check_adapter("missing")
    with pytest.raises(InvalidRequest):
        engine.generate_sync(GenerationRequest(prompt, SamplingParams(temperature=6.0)))
    with pytest.raises(InvalidRequest):
        engine.generate_sync(GenerationRequest([], SamplingParams()))
    assert engine.check_adapter("qv") == "qv"


def test_adapter_that_does_not_fit_fails_only_its_request(tmp_path, word_tokenizer, tiny_mistral_dir, mistral_adapters):

    from safetensors.torch import load_file, save_file

    # The "qv" adapter with its q_proj matrices cut to another hidden size (an adapter of another base).
    wrong = tmp_path / "wrong"
    shutil.copytree(mistral_adapters["qv"], wrong)
    tensors = load_file(wrong / "adapter_model.safetensors")
    tensors = {k: (v[:, :32].contiguous() if "q_proj.lora_A" in k else v) for k, v in tensors.items()}
    save_file(tensors, wrong / "adapter_model.safetensors")
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, {**mistral_adapters, "wrong": wrong}, max_slots=2)
    try:
        with pytest.raises(AdapterError, match="q_proj"):
            eng.check_adapter("wrong")
        prompt = prompts(word_tokenizer)[0]
        ok, bad = greedy(prompt, "all"), greedy(prompt, "wrong")
        eng.stop()
        seq_ok, seq_bad = eng.submit(ok), eng.submit(bad)
        eng.start()
        with pytest.raises(AdapterError):
            eng.result(seq_bad)
        assert eng.result(seq_ok).finish_reason in ("stop", "length")
        assert eng.stats()["resident_adapters"] == ["all"]
    finally:
        eng.stop()


def test_adapter_with_nan_weights_is_refused(tmp_path, word_tokenizer, tiny_mistral_dir, mistral_adapters):

    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "poisoned"
    shutil.copytree(mistral_adapters["mlp"], poisoned)
    tensors = load_file(poisoned / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "down_proj.lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, poisoned / "adapter_model.safetensors")
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, {**mistral_adapters, "poisoned": poisoned}, max_slots=2)
    try:
        with pytest.raises(AdapterError, match="down_proj.*NaN or infinite"):
            eng.check_adapter("poisoned")
        assert eng.stats()["resident_adapters"] == []
    finally:
        eng.stop()


def test_queue_full_overloaded_and_cancel_frees_the_place(tiny_mistral_dir, word_tokenizer, mistral_adapters):
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters, max_batch=1, max_queue=1)
    prompt = prompts(word_tokenizer)[2]
    long_seq = eng.submit(GenerationRequest(prompt, SamplingParams(max_tokens=900), adapter="qv"))

    async def scenario():
        eng.start()
        first = eng.stream(long_seq)
        ev = await first.__anext__()  # running now: the only batch place is taken
        assert not ev.finished
        second = eng.generate(greedy(prompt, "all", 5))  # waits in the queue (1 place)
        with pytest.raises(Overloaded):
            eng.generate(greedy(prompt, None, 5))
        assert eng.stats()["queue_depth"] == 1 and eng.stats()["running"] == 1
        await first.aclose()  # the client went away
        return [e async for e in second]

    try:
        events = asyncio.run(scenario())
        assert events[-1].finished and events[-1].finish_reason in ("stop", "length")
        assert eng.stats()["running"] == 0 and eng.stats()["queue_depth"] == 0
        left = []
        while not long_seq.events.empty():
            left.append(long_seq.events.get())
        assert left[-1].finish_reason == "cancelled" and left[-1].completion_tokens < 900
    finally:
        eng.stop()


def test_stop_cancels_in_flight(tiny_mistral_dir, word_tokenizer, mistral_adapters):
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters)
    seq = eng.submit(GenerationRequest(prompts(word_tokenizer)[0], SamplingParams(max_tokens=1000)))
    eng.stop()  # never started: cancelled at once
    assert eng.result(seq).finish_reason == "cancelled"


# -- slots ------------------------------------------------------------------------------------


def test_lru_eviction_and_pinning(tiny_mistral_dir, word_tokenizer, mistral_adapters):
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters, max_slots=2, preload=["mlp"])
    try:
        prompt = prompts(word_tokenizer)[0]
        ref = {n: eng.generate_sync(greedy(prompt, n)).token_ids for n in ["all", "qv", "all"]}
        assert eng.stats()["resident_adapters"] == ["mlp", "all"]  # qv evicted (mlp is pinned)
        eng.generate_sync(greedy(prompt, "qv"))
        assert eng.stats()["resident_adapters"] == ["mlp", "qv"]
        # A slot reused by another adapter gives that adapter's exact output.
        assert eng.generate_sync(greedy(prompt, "all")).token_ids == ref["all"]
        assert eng.generate_sync(greedy(prompt, "qv")).token_ids == ref["qv"]
        assert eng.stats()["slots"] == 2
    finally:
        eng.stop()


def test_drop_frees_an_idle_slot_now_and_a_busy_one_when_its_requests_end(
    tiny_mistral_dir, word_tokenizer, mistral_adapters
):
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters, max_slots=2, preload=["mlp"])
    try:
        prompt = prompts(word_tokenizer)[0]
        assert eng.drop_adapter("mlp") and eng.stats()["resident_adapters"] == []  # pinned, idle: gone now
        assert not eng.drop_adapter("mlp")  # not resident
        want = eng.generate_sync(greedy(prompt, "qv", 8)).token_ids
        eng.stop()
        seq = eng.submit(greedy(prompt, "qv", 8))  # running on qv when the drop comes
        eng._loop._admit()  # admitted and prefilled: it holds the slot
        assert eng.drop_adapter("qv") and eng.stats()["resident_adapters"] == ["qv"]  # still running
        eng.start()
        assert eng.result(seq).token_ids == want  # the running request finishes with its adapter
        assert eng.stats()["resident_adapters"] == []  # ... and then the slot is free
        assert eng.generate_sync(greedy(prompt, "qv", 8)).token_ids == want  # loaded again on demand
    finally:
        eng.stop()


def test_failed_prefill_releases_its_slot_under_the_model_lock_and_is_logged(
    tiny_mistral_dir, word_tokenizer, mistral_adapters, monkeypatch, caplog
):
    # A slot is released under the lock the forwards take, on the error path as on the normal
    # one: else a server thread loading an adapter could write a slot a forward is reading.
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, mistral_adapters, max_slots=1)
    runner, slots = eng._runner, eng._runner._slots
    held: list[bool] = []
    release = slots.release

    def checked_release(slot: int) -> None:
        held.append(runner._lock._is_owned())
        release(slot)

    monkeypatch.setattr(slots, "release", checked_release)
    prompt = prompts(word_tokenizer)[0]
    try:
        with caplog.at_level(logging.ERROR, logger="lora_kit.engine"):
            with monkeypatch.context() as m:
                m.setattr(runner, "prefill", lambda group: (_ for _ in ()).throw(RuntimeError("boom")))
                # The client hears the request id only; the log has the error (below).
                with pytest.raises(EngineError, match="request id") as failed:
                    eng.generate_sync(greedy(prompt, "qv"))
            # The only slot is free again: another adapter takes it.
            assert eng.generate_sync(greedy(prompt, "all")).finish_reason in ("stop", "length")
            eng.stop()  # the loop logged the failure before it took the next request
        assert held == [True, True]  # the failed request's release, then the normal one's
        assert eng.stats()["resident_adapters"] == ["all"] and eng.stats()["finished"]["error"] == 1
        failure = [r for r in caplog.records if r.name.startswith("lora_kit.engine") and r.exc_info]
        assert failure and "boom" in str(failure[0].exc_info[1])
        assert failed.value.request_id in failure[0].getMessage() and "boom" not in str(failed.value)
    finally:
        eng.stop()


# -- the embedded model: parity, JSON schema, tool calls -------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Lyon", "Nice"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def embedded_setup(tmp_path_factory, embedded_model):
    from lora_kit import models

    base_dir = Path(models.resolve("smollm2-135m-instruct"))
    root = tmp_path_factory.mktemp("smol-adapters")
    adapters = {
        "smol-a": make_peft_init_adapter(
            base_dir, root / "a", ["q_proj", "v_proj", "down_proj"], 8, 16, False, seed=11
        ),
        "smol-b": make_peft_init_adapter(base_dir, root / "b", ["o_proj", "up_proj", "k_proj"], 4, 4, False, seed=12),
    }
    model = models.load_model("smollm2-135m-instruct")
    eng = Engine(  # exact fp32 weights: compared with PEFT token for token
        EngineConfig(weight_dtype="float32"),
        model=model,
        tokenizer=embedded_model[1],
        adapter_resolver=mapping_resolver(adapters),
    )
    yield base_dir, adapters, eng
    eng.stop()


def test_embedded_greedy_matches_peft_alone_and_mixed(embedded_setup, embedded_model):
    base_dir, adapters, eng = embedded_setup
    tok = embedded_model[1]
    prompt = chat.render_prompt(tok, "What is the capital of France?")
    stops = sorted(eng.stop_ids)
    refs = {n: peft_greedy(base_dir, adapters.get(n), prompt, 8, stops) for n in [None, "smol-a", "smol-b"]}
    assert len({tuple(v) for v in refs.values()}) == 3
    together = run_together(eng, [greedy(prompt, n, 8) for n in refs])
    assert [o.token_ids for o in together] == list(refs.values())


def test_an_adapter_loaded_from_a_long_lived_thread_leaves_no_thread_pool_behind(embedded_setup):
    """A server loads adapters on demand from its worker threads. Torch work there would leave an
    OpenMP pool behind the worker, and every later decode step would pay for it (one request: 15
    against 32 tok/s, BENCHMARKS.md): the engine loads on a short-lived thread of its own."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, eng = embedded_setup
    eng.drop_adapter("smol-b")

    def worker_threads() -> set[str]:  # as a server's worker has them by default: all cores
        torch.get_num_threads()
        torch.set_num_threads(2)
        return set(os.listdir("/proc/self/task"))

    with ThreadPoolExecutor(1) as worker:
        before = worker.submit(worker_threads).result()
        assert worker.submit(eng.check_adapter, "smol-b").result() == "smol-b"
        # The short-lived loading thread may still be leaving the OS's list when join() returns
        # (it flaked once, 17 vs 16): wait for new threads to end. A pool left behind the worker
        # never ends while the worker lives.
        deadline = time.monotonic() + 10
        while (new := set(os.listdir("/proc/self/task")) - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not new
    assert "smol-b" in eng.stats()["resident_adapters"]


def test_json_schema_output_parses_and_validates(embedded_setup, embedded_model):
    _, _, eng = embedded_setup
    tok = embedded_model[1]
    prompt = chat.render(
        tok,
        [{"role": "user", "content": "Give the city, population and capital flag of Paris as JSON."}],
        add_generation_prompt=True,
    ).input_ids
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    free = GenerationRequest(prompt, SamplingParams(max_tokens=60), adapter="smol-a")
    constrained = GenerationRequest(prompt, SamplingParams(max_tokens=60), adapter="smol-a", response_format=fmt)
    obj = GenerationRequest(
        prompt, SamplingParams(max_tokens=60, temperature=0.8, seed=3), response_format={"type": "json_object"}
    )
    out_free, out_schema, out_obj = run_together(eng, [free, constrained, obj])
    assert out_schema.finish_reason == "stop", out_schema.text
    value = json.loads(out_schema.text)
    assert set(value) == {"city", "population", "capital"}
    assert value["city"] in ("Paris", "Lyon", "Nice")
    assert isinstance(value["population"], int) and isinstance(value["capital"], bool)
    assert out_free.text != out_schema.text  # the unconstrained row in the same batch is free text
    # json_object: any object, closed within the budget (the fixture's fp32 weights fix the sample).
    assert out_obj.finish_reason == "stop", out_obj.text
    assert isinstance(json.loads(out_obj.text), dict) and out_obj.text.lstrip().startswith("{")
    with pytest.raises(InvalidRequest):
        eng.submit(
            GenerationRequest(prompt, response_format={"type": "json_schema", "json_schema": {"type": "nonsense"}})
        )


def test_tool_call_is_returned_parsed(embedded_setup, embedded_model):
    _, _, eng = embedded_setup
    tok = embedded_model[1]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    prompt = chat.render(tok, messages, add_generation_prompt=True, tools=[WEATHER_TOOL]).input_ids
    req = GenerationRequest(prompt, SamplingParams(max_tokens=48), tools=[WEATHER_TOOL], tool_choice="required")

    async def collect():
        return [ev async for ev in eng.generate(req)]

    events = asyncio.run(collect())
    final = events[-1]
    assert final.finish_reason == "tool_calls"
    assert [c["name"] for c in final.tool_calls] == ["get_weather"]
    assert isinstance(final.tool_calls[0]["arguments"]["city"], str)
    assert "".join(e.text for e in events) == ""  # the call is not streamed as text
    auto = eng.generate_sync(
        GenerationRequest(prompt, SamplingParams(max_tokens=12), adapter="smol-b", tools=[WEATHER_TOOL])
    )
    # tool_choice "auto" leaves the model free: this adapter answers in text (greedy, fp32), and the
    # text is returned as text, not parsed as a call.
    assert auto.tool_calls is None and auto.finish_reason == "length", (auto.text, auto.tool_calls)
    assert auto.text and not auto.text.lstrip().startswith("{")


def test_registry_references_resolve_to_canonical_versions(
    tmp_path, tiny_mistral_dir, word_tokenizer, mistral_adapters
):
    from lora_kit.registry import Registry

    reg = Registry(tmp_path / "registry")
    reg.register(mistral_adapters["qv"], "helper", base_model=str(tiny_mistral_dir))
    reg.register(mistral_adapters["all"], "helper", base_model=str(tiny_mistral_dir))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    eng = Engine(
        EngineConfig(model="tiny-mistral", weight_dtype="float32"),
        model=model,
        tokenizer=word_tokenizer,
        registry_root=tmp_path / "registry",
    )
    try:
        assert eng.check_adapter("helper") == "helper@2"
        assert eng.check_adapter("helper@1") == "helper@1"
        with pytest.raises(UnknownAdapter):
            eng.check_adapter("helper@9")
        prompt = prompts(word_tokenizer)[2]
        by_ref = eng.generate_sync(greedy(prompt, "helper@1")).token_ids
        by_dir = peft_greedy(tiny_mistral_dir, mistral_adapters["qv"], prompt, 12, sorted(eng.stop_ids))
        assert by_ref == by_dir
        assert eng.stats()["resident_adapters"] == ["helper@2", "helper@1"]
    finally:
        eng.stop()


def test_nf4_base_matches_peft(tiny_mistral_dir, word_tokenizer, mistral_adapters):
    """A bitsandbytes 4-bit base: the wrapped Linear4bit layers give PEFT's exact tokens."""
    from peft import PeftModel

    from lora_kit import models

    model = models.load_model(str(tiny_mistral_dir), "nf4")
    resolver = mapping_resolver(mistral_adapters)
    eng = Engine(EngineConfig(model="tiny-nf4"), model=model, tokenizer=word_tokenizer, adapter_resolver=resolver)
    try:
        prompt = prompts(word_tokenizer)[2]
        got = eng.generate_sync(greedy(prompt, "qv", 10)).token_ids
    finally:
        eng.stop()
    ref_model = PeftModel.from_pretrained(
        models.load_model(str(tiny_mistral_dir), "nf4"), mistral_adapters["qv"]
    ).eval()
    ids = torch.tensor([prompt])
    stops = sorted(eng.stop_ids)
    with torch.inference_mode():
        ref = ref_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
            eos_token_id=stops, pad_token_id=stops[0],
        )  # fmt: skip
    assert got == ref[0, len(prompt) :].tolist()


# -- CPU threads ------------------------------------------------------------------------------


def test_run_in_thread_returns_raises_and_sets_the_thread_count():
    from lora_kit.engine.threads import run_in_thread

    assert run_in_thread(lambda: torch.get_num_threads(), threads=1) == 1
    with pytest.raises(ValueError, match="boom"):
        run_in_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_dedicated_main_thread_is_single_and_engine_threads_get_the_cores():
    import subprocess
    import sys

    code = (
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "from lora_kit.engine.threads import dedicate_cpu_threads, engine_threads, run_in_thread\n"
        "n = dedicate_cpu_threads()\n"
        "print(n, torch.get_num_threads(), engine_threads(), run_in_thread(torch.get_num_threads), torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "1", "2", "2", "1"]  # the main thread stays at 1 after a worker took 2


def test_a_set_thread_count_stays_when_another_thread_sets_torchs_and_single_threaded_is_one():
    """torch applies its process-wide count (the last any thread set) lazily to a thread, over what
    that thread set itself: a loop that set 2 and ran its first op after another thread set 1 ran
    at 1. ``set_thread_count`` keeps a thread's count; ``single_threaded`` pins its caller only."""
    import subprocess
    import sys

    code = (
        "import threading, torch\n"
        "from lora_kit.engine.threads import set_thread_count, single_threaded\n"
        "def loop(setter, out, started, go):\n"
        "    setter(2); started.set(); go.wait(); out.append(torch.get_num_threads())\n"
        "def pinned(out):\n"
        "    single_threaded(); out.append(torch.get_num_threads())\n"
        "for setter in (torch.set_num_threads, set_thread_count):\n"
        "    out, started, go = [], threading.Event(), threading.Event()\n"
        "    t = threading.Thread(target=loop, args=(setter, out, started, go)); t.start(); started.wait()\n"
        "    other = threading.Thread(target=torch.set_num_threads, args=(1,)); other.start(); other.join()\n"
        "    go.set(); t.join()\n"
        "    p = threading.Thread(target=pinned, args=(out,)); p.start(); p.join()\n"
        "    print(*out)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "2", "1"]  # torch's own set is overridden; ours stays


# -- EngineConfig and the CLI flags derived from it -------------------------------------------


def engine_flags(command: str) -> dict[str, argparse.Action]:
    """The flags of ``lora-kit COMMAND`` by option string."""
    from lora_kit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {opt: action for action in sub.choices[command]._actions for opt in action.option_strings}


def test_every_config_field_has_a_docstring_and_serve_a_flag_with_it_as_help():
    import dataclasses

    from lora_kit.config_cli import field_docs, flag_of

    fields = dataclasses.fields(EngineConfig)
    docs = field_docs(EngineConfig)
    assert set(docs) == {f.name for f in fields} and all(docs.values())
    serve = engine_flags("serve")
    for f in fields:
        assert serve[flag_of(f)].dest == f.name and serve[flag_of(f)].help.startswith(docs[f.name])
    # User settings keep their flag names and defaults (README and demo commands).
    for flag, default in [("--slots", 8), ("--max-queue", 64), ("--max-batch", 16), ("--adapter-dtype", None)]:
        assert serve[flag].default == default
    assert serve["--max-tokens-cap"].default == 4096  # a server setting, not the engine's
    assert "--no-pack-weights" not in serve and "--no-cpu-kernel" not in serve  # developer switches: the backend


def test_quantization_offers_the_same_choices_in_serve_and_generate():
    from lora_kit.models import Quantization

    choices = list(typing.get_args(Quantization))
    assert engine_flags("serve")["--quantization"].choices == choices
    assert engine_flags("generate")["--quantization"].choices == choices


def test_config_round_trips_through_the_flags():
    from lora_kit import models
    from lora_kit.cli import build_parser

    parser = build_parser()
    assert EngineConfig.from_cli_args(parser.parse_args(["serve"])) == EngineConfig()
    assert EngineConfig().model == models.DEFAULT_MODEL
    args = parser.parse_args(
        ["serve", "--slots", "3", "--max-queue", "5", "--max-batch", "2", "--preload", "a", "b@2",
         "--adapter-dtype", "bfloat16", "--quantization", "nf4", "--threads", "1"]
    )  # fmt: skip
    assert EngineConfig.from_cli_args(args) == EngineConfig(
        max_slots=3, max_queue=5, max_batch=2, preload=("a", "b@2"), adapter_dtype="bfloat16", quantization="nf4",
        threads=1,
    )  # fmt: skip
    args = parser.parse_args(["generate", "hi", "--quantization", "fp4", "--model", "m"])
    assert EngineConfig.from_cli_args(args, max_slots=1) == EngineConfig(model="m", quantization="fp4", max_slots=1)
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
    assert EngineConfig(adapter_dtype=torch.bfloat16).adapter_dtype == "bfloat16"


# -- backends -----------------------------------------------------------------------------------


def test_backend_is_chosen_by_platform_with_one_environment_override(monkeypatch):
    from lora_kit.engine.backends import ENV, CpuBackend, TorchBackend, select_backend

    cpu, fp32, bf16 = torch.device("cpu"), torch.float32, torch.bfloat16
    monkeypatch.delenv(ENV, raising=False)
    assert isinstance(select_backend(torch.device("cuda"), bf16, bf16, 256), TorchBackend)
    chosen = select_backend(cpu, fp32, fp32, 256)
    assert isinstance(chosen, CpuBackend)
    assert (chosen.lora_kernel is not None) is bgmv.load()
    assert select_backend(cpu, bf16, bf16, 256).lora_kernel is None  # bf16 activations: torch's products
    assert select_backend(cpu, fp32, fp32, bgmv.MAX_RANK * 2).lora_kernel is None  # ranks the kernel lacks
    monkeypatch.setenv(ENV, "torch")
    assert isinstance(select_backend(cpu, fp32, fp32, 256), TorchBackend)
    assert isinstance(select_backend(cpu, fp32, fp32, 256, choice="cpu"), CpuBackend)  # the engine argument wins
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match=ENV):
        select_backend(cpu, fp32, fp32, 256)
    with pytest.raises(ValueError, match="cpu backend"):
        select_backend(torch.device("cuda"), fp32, fp32, 256, choice="cpu")
