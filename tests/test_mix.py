"""Weighted mixes: a row runs the scaled sum of several adapters' LoRA deltas, inside mixed batches.

Exact references: float64 products for the kernel and the layer, PEFT's
``add_weighted_adapter(..., combination_type="cat")`` for a whole model (its concatenated
adapter computes exactly ``sum_i w_i * scale_i * B_i A_i``). Both LoRA paths run: the CPU
backend (the BGMV kernel's mix op) and the torch backend.
"""

from __future__ import annotations

import helpers
import pytest
import torch
from helpers import MISTRAL_ADAPTERS, greedy, make_peft_init_adapter, mistral_engine, prompts, run_together

from lora_kit.engine import AdapterWeight, InvalidRequest, UnknownAdapter
from lora_kit.engine.backends import bgmv
from lora_kit.engine.lora_layer import BatchedLoraLinear, LoraContext

needs_compiler = helpers.needs_compiler()
ENGINES = ["cpu_engine", "torch_engine"]
CPU = torch.device("cpu")


def mix(*pairs: tuple[str, float]) -> list[AdapterWeight]:
    return [AdapterWeight(ref, scale) for ref, scale in pairs]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_mistral_dir):
    root = tmp_path_factory.mktemp("mix-adapters")
    return {
        name: make_peft_init_adapter(tiny_mistral_dir, root / name, t, r, a, rs, seed=i + 1)
        for i, (name, (t, r, a, rs)) in enumerate(MISTRAL_ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def cpu_engine(tiny_mistral_dir, word_tokenizer, adapters):
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, adapters, max_slots=4)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def torch_engine(tiny_mistral_dir, word_tokenizer, adapters):
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, adapters, backend="torch", max_slots=4)
    yield eng
    eng.stop()


# -- the context, the layer and the kernel ----------------------------------------------------


def test_context_holds_each_rows_slots_and_weights():
    ctx = LoraContext()
    ctx.set_rows([((0, 0.5), (2, -1.0)), 1, None, ((3, 2.0),)], zero_slot=9, device=CPU)
    assert ctx.mix_slots.tolist() == [[0, 2], [1, -1], [-1, -1], [3, -1]]
    assert ctx.mix_scales.tolist() == [[0.5, -1.0], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]
    assert ctx.active == {0, 1, 2, 3} and ctx.slot_index is None and ctx.single is None
    ctx.set_rows([1, None], zero_slot=9, device=CPU)  # no mix: the single-adapter path, as before
    assert ctx.mix_slots is None and ctx.slot_index.tolist() == [1, 9]


def mix_layer(ctx: LoraContext) -> BatchedLoraLinear:
    """16 -> 24; slots 0..2 hold adapters (slot 2 of rank 3, zero-padded), slot 3 an adapter
    that does not target this layer (zeros), slot 4 the zero slot."""
    layer = BatchedLoraLinear(torch.nn.Linear(16, 24), "proj", ctx)
    layer.lora_A, layer.lora_B = torch.randn(5, 4, 16), torch.randn(5, 4, 24)
    layer.lora_A[3:], layer.lora_B[3:] = 0, 0
    layer.lora_B[2, 3:] = 0
    layer.slots_with = {0, 1, 2}
    return layer


ROWS = [((0, 0.5), (1, 0.5)), 2, None, ((2, -1.5), (3, 1.0), (0, 2.0)), ((1, 0.25),), 0]


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_compiler), False], ids=["bgmv-kernel", "torch"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_layer_adds_each_rows_weighted_sum_of_deltas(kernel, tokens):
    if kernel:
        assert bgmv.load(), bgmv.error()
    torch.manual_seed(0)
    ctx = LoraContext()
    ctx.kernel, ctx.mix_kernel = (bgmv.op(), bgmv.mix_op()) if kernel else (None, None)
    layer = mix_layer(ctx)
    x = torch.randn(len(ROWS), tokens, 16)
    ctx.set_rows(ROWS, zero_slot=4, device=CPU)
    with torch.inference_mode():
        got = layer(x)
    want = layer.base(x).detach().double()
    for row, spec in enumerate(ROWS):
        pairs = () if spec is None else ((spec, 1.0),) if isinstance(spec, int) else spec
        for slot, weight in pairs:
            want[row] += weight * (x[row].double() @ layer.lora_A[slot].double().T @ layer.lora_B[slot].double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if kernel:  # slot 3 does not target this layer: the kernel skips it
        assert layer._kernel_mix_slots()[3].tolist() == [2, -1, 0]


@needs_compiler
def test_mix_kernel_matches_float64_and_checks_its_inputs():
    assert bgmv.load(), bgmv.error()
    op = bgmv.mix_op()
    g = torch.Generator().manual_seed(1)
    for rows, tokens, rank, dtype in [(3, 1, 8, torch.float32), (2, 4, 12, torch.float32), (5, 1, 16, torch.bfloat16)]:
        a = (torch.randn(4, rank, 40, generator=g) * 0.1).to(dtype)
        b = (torch.randn(4, rank, 24, generator=g) * 0.1).to(dtype)
        x, out = torch.randn(rows, tokens, 40, generator=g), torch.randn(rows, tokens, 24, generator=g)
        slots = torch.randint(-1, 4, (rows, 3), generator=g)
        scales = torch.rand(rows, 3, generator=g) * 4 - 2
        want = out.double().clone()
        for n in range(rows):
            for s, c in zip(slots[n].tolist(), scales[n].tolist()):
                if s >= 0:
                    want[n] += c * (x[n].double() @ a[s].double().T @ b[s].double())
        op(out, x, a, b, slots, scales)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    a, b = torch.zeros(2, 4, 8), torch.zeros(2, 4, 6)
    with pytest.raises(RuntimeError, match="shaped like slots"):
        op(torch.zeros(1, 6), torch.zeros(1, 8), a, b, torch.tensor([[0, 1]]), torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="out of range"):
        op(torch.zeros(1, 6), torch.zeros(1, 8), a, b, torch.tensor([[0, 2]]), torch.ones(1, 2))
    with pytest.raises(RuntimeError, match=r"\(M, K\)"):
        op(torch.zeros(1, 6), torch.zeros(1, 8), a, b, torch.tensor([0]), torch.ones(1))


# -- whole requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ENGINES)
def test_one_entry_at_scale_one_is_the_adapter_alone(which, request, word_tokenizer):
    eng = request.getfixturevalue(which)
    p = prompts(word_tokenizer)[0]
    alone = eng.generate_sync(greedy(p, "all")).token_ids
    assert eng.generate_sync(greedy(p, mix(("all", 1.0)))).token_ids == alone
    assert eng.generate_sync(greedy(p, None)).token_ids != alone  # the adapter changes the answer


def peft_mix_logits(base_dir, adapters, weights: dict[str, float], prompt: list[int], steps: int):
    """Greedy tokens and each step's logits of PEFT's concatenated ("cat") weighted adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(weights)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.add_weighted_adapter(names, [weights[n] for n in names], "mix", combination_type="cat")
    model.set_adapter("mix")
    model.eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), torch.stack(out.logits)[:, 0]


@pytest.mark.parametrize("which", ENGINES)
@pytest.mark.parametrize("weights", [{"all": 0.5, "mlp": 0.5}, {"all": 0.7, "mlp": -1.3}])
def test_mix_equals_peft_weighted_adapter(which, weights, request, word_tokenizer, tiny_mistral_dir, adapters):
    # "all" and "mlp" use plain alpha/r scaling: PEFT's cat adapter copies the first adapter's
    # use_rslora, so an rslora member ("qv") would be rescaled there, not here.
    eng = request.getfixturevalue(which)
    p = prompts(word_tokenizer)[2]
    want_tokens, want_logits = peft_mix_logits(tiny_mistral_dir, adapters, weights, p, steps=8)
    req = greedy(p, mix(*weights.items()), max_tokens=8)
    req.params.ignore_eos = True
    assert eng.generate_sync(req).token_ids == want_tokens
    # Logits of the first step, through the engine's prefill (the same wrapped layers).
    got = first_logits(eng, p, mix(*weights.items()))
    torch.testing.assert_close(got, want_logits[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, first_logits(eng, p, "all"), atol=1e-3)  # the mix is not one adapter


def first_logits(eng, prompt: list[int], spec) -> torch.Tensor:
    """The engine's logits for the next token after ``prompt``, run with ``spec`` (read through the
    engine's supported Engine.recording_logits, #27 item 7)."""
    req = greedy(prompt, spec, max_tokens=1)
    req.request_id = "first-logits"
    with eng.recording_logits() as seen:
        eng.generate_sync(req)
    assert len(seen["first-logits"]) == 1
    return seen["first-logits"][0]


@pytest.mark.parametrize("which", ENGINES)
def test_mixed_rows_batch_with_single_adapters_and_the_base(which, request, word_tokenizer):
    eng = request.getfixturevalue(which)
    ps = prompts(word_tokenizer)
    specs = [
        mix(("all", 0.5), ("qv", 0.5)),
        "all",
        None,
        mix(("mlp", -0.8), ("qv", 1.2), ("all", 0.3)),
        mix(("qv", 0.6)),
        "qv",
        mix(("all", 0.5), ("qv", 0.5)),
    ]
    reqs = [greedy(ps[i % 4], spec, 6 + i) for i, spec in enumerate(specs)]
    alone = [eng.generate_sync(r).token_ids for r in reqs]
    together = run_together(eng, reqs)
    assert [o.token_ids for o in together] == alone
    assert alone[0] != alone[1] and alone[4] != alone[5]  # a mix differs from its members alone
    assert not eng._runner._slots._refs  # every slot a mix held is released


def test_mix_limits_and_unknown_names(cpu_engine, word_tokenizer):
    p = prompts(word_tokenizer)[0]
    too_many = mix(*[("all", 0.1)] * 5)
    for spec, error, match in [
        (too_many, InvalidRequest, "1 to 4 adapters"),
        ([], InvalidRequest, "1 to 4 adapters"),
        (mix(("all", 2.5)), InvalidRequest, r"\[-2, 2\]"),
        (mix(("all", float("nan"))), InvalidRequest, "must be a number"),
        (mix(("all", 0.5), ("nope", 0.5)), UnknownAdapter, "nope"),
    ]:
        with pytest.raises(error, match=match):
            cpu_engine.submit(greedy(p, spec))
    # The same adapter twice is one slot with the weights added.
    uses = cpu_engine._adapter_uses(mix(("all", 0.25), ("qv", 1.0), ("all", 0.5)))
    assert [(u.key, u.weight) for u in uses] == [("all", 0.75), ("qv", 1.0)]


def test_mix_waits_for_all_its_slots_and_takes_none_until_then(tiny_mistral_dir, word_tokenizer, adapters):
    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, adapters, max_slots=2)
    try:
        with pytest.raises(InvalidRequest, match="holds 2 at once"):
            eng.submit(greedy(prompts(word_tokenizer)[0], mix(("all", 0.3), ("qv", 0.3), ("mlp", 0.3))))
        held = eng._runner.acquire_slot("all", adapters["all"])  # a running request holds one slot
        seq = eng.submit(greedy(prompts(word_tokenizer)[0], mix(("qv", 0.5), ("mlp", 0.5))))
        admission = eng._scheduler.admit()  # qv takes the free slot, mlp finds none: qv is given back
        assert admission.joining == [] and eng._scheduler.queue_depth() == 1
        assert eng._runner._slots._refs == {held: 1}
        eng._runner.release_slot(held)  # the request finishes: the mix runs (evicting "all")
        eng.start()
        assert eng.result(seq).finish_reason in ("stop", "length")
        assert sorted(eng.stats()["resident_adapters"]) == ["mlp", "qv"] and not eng._runner._slots._refs
    finally:
        eng.stop()


def test_recording_logits_gives_each_tokens_logits_and_stops_after(cpu_engine, word_tokenizer):
    """#27 item 7: the engine's supported logits API (gpu_check's parity and these tests used to
    wrap the private runner's ``sample``): one (V,) fp32 row per generated token, the greedy token
    its argmax, a row per request of a batch, and nothing recorded once the block ends."""
    reqs = [greedy(p, spec, max_tokens=4) for p, spec in zip(prompts(word_tokenizer)[:2], ["all", None])]
    for i, req in enumerate(reqs):
        req.params.ignore_eos = True
        req.request_id = f"r{i}"
    with cpu_engine.recording_logits() as seen:
        outs = run_together(cpu_engine, reqs)
    assert sorted(seen) == ["r0", "r1"]
    for i, out in enumerate(outs):
        rows = seen[f"r{i}"]
        assert len(rows) == 4 and all(r.dtype == torch.float32 and r.dim() == 1 for r in rows)
        assert [int(r.argmax()) for r in rows] == out.token_ids
    assert cpu_engine._runner.logits_observers == ()
    cpu_engine.generate_sync(reqs[0])
    assert len(seen["r0"]) == 4  # the block ended: no more rows
