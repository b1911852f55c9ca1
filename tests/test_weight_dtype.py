"""Base weights held in bf16 under an fp32 model (EngineConfig.weight_dtype): the packed layer's
products against a reference with the same roundings, the ``auto`` choice, and the embedded
model's greedy answers against the exact fp32 engine. The bf16 tests run on each CPU path: the
CPU's own (tiled for lora-kit's kernel where it has AMX), ``LORA_KIT_CPU_ISA=avx512`` (oneDNN's
packed bf16: AVX-512 machines without AMX) and ``avx2`` (lora-kit's AVX2 kernel or torch's bf16
product: the AVX2 machines' path), so each path is tested on any machine that can run it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_kit import chat
from lora_kit.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, mapping_resolver
from lora_kit.engine.backends import packed_linear
from lora_kit.engine.backends.packed_linear import ISA_ENV, PackedLinear, can_pack, native_bf16


@pytest.fixture(params=["auto", "avx512", "avx2"])
def isa(request, monkeypatch):
    """``$LORA_KIT_CPU_ISA`` for one test: the CPU's own paths (skipped where they are the AVX2
    ones already: no oneDNN bf16 here), an AVX-512 CPU's without AMX (skipped where oneDNN takes
    no bf16) or the forced AVX2 paths."""
    if request.param != "avx2" and not packed_linear._onednn_bf16_here():
        pytest.skip("oneDNN cannot take bf16 on this CPU: its own paths are the AVX2 ones, tested as 'avx2'")
    monkeypatch.setenv(ISA_ENV, request.param)
    return request.param


def held(isa: str, layer: PackedLinear) -> str:
    """The layout a bf16 weight of ``layer``'s shape gets on the path ``isa`` forces."""
    if isa == "avx2":
        return "dense"
    tileable = layer.out_features % packed_linear.TILE_N == 0 and layer.in_features % packed_linear.TILE_K == 0
    return "tiled" if isa == "auto" and packed_linear._tiles_here() and tileable else "onednn"


def layout_of(layer: PackedLinear) -> str:
    return "tiled" if layer.tiled else "onednn" if layer.onednn else "dense"


def test_the_isa_override_is_validated(monkeypatch):
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert packed_linear.forced_avx2() and not packed_linear.onednn_bf16() and not native_bf16()
    assert not packed_linear.tiles_bf16()
    monkeypatch.setenv(ISA_ENV, "avx512")
    assert not packed_linear.forced_avx2() and not packed_linear.tiles_bf16()
    assert packed_linear.onednn_bf16() == packed_linear._onednn_bf16_here()
    monkeypatch.setenv(ISA_ENV, "sse2")
    with pytest.raises(ValueError, match="LORA_KIT_CPU_ISA must be one of auto, avx512, avx2, not 'sse2'"):
        packed_linear.forced_avx2()


@pytest.mark.parametrize(("rows", "width"), [(1, 48), (3, 40), (8, 48), (40, 48), (8, 512), (80, 512)])
def test_bf16_packed_linear_equals_a_product_with_the_same_roundings(rows, width, isa):
    """y = bf16(bf16(x) @ bf16(W)^T + bf16(b)): oneDNN (or torch's bf16 product on the AVX2 path)
    sums the bf16 products in fp32 and rounds the result to bf16 (the products' dtype), widened
    back to fp32 for the model; W held in bf16. lora-kit's tiled kernel (AMX CPUs) sums them in
    fp32 and keeps the fp32 result. A 40-wide output is no
    multiple of 16: oneDNN takes it on an AMX CPU too. 80 rows of a 512-wide output take the AVX2
    path's blocked product (more rows than its kernel takes): its output must be contiguous too, or
    the LoRA kernel cannot add into it."""
    gen = torch.Generator().manual_seed(rows)
    layer = nn.Linear(96, width, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(width, 96, generator=gen))
        layer.bias.copy_(torch.randn(width, generator=gen))
    x = torch.randn(rows, 96, generator=gen)
    packed = PackedLinear(layer, batch_hint=8, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = packed(x)
    rounded = x.bfloat16().double() @ layer.weight.bfloat16().double().T + layer.bias.bfloat16().double()
    assert got.dtype == torch.float32 and got.shape == (rows, width) and got.is_contiguous()
    # oneDNN's and torch's outputs are bf16, widened; the tiled kernel's stay fp32 (one rounding fewer)
    assert torch.equal(got, got.bfloat16().float()) != packed.tiled
    # within one bf16 rounding of the exact sum of the rounded terms (2^-8 relative)
    torch.testing.assert_close(got.double(), rounded, atol=1e-3, rtol=2**-8)
    if packed.tiled:  # within the fp32 sums' own error
        torch.testing.assert_close(got.double(), rounded, atol=1e-4, rtol=1e-5)
    assert packed.weight.dtype == torch.bfloat16
    assert layout_of(packed) == held(isa, packed) and packed.weight.is_mkldnn == packed.onednn
    assert torch.equal(packed.dense_weight(), layer.weight.detach().bfloat16())
    exact = x.double() @ layer.weight.double().T + layer.bias.double()
    assert (got.double() - exact).abs().max() > 1e-3  # the roundings did happen: this is not the fp32 path
    fp32 = PackedLinear(layer, batch_hint=8)
    with torch.inference_mode():
        torch.testing.assert_close(fp32(x).double(), exact, atol=1e-4, rtol=1e-5)


def test_weight_dtype_is_validated_and_is_a_serve_flag():
    with pytest.raises(ValueError, match="weight_dtype must be one of auto, float32, bfloat16, int8"):
        EngineConfig(weight_dtype="int4")
    from lora_kit.cli import build_parser

    args = build_parser().parse_args(["serve", "--weight-dtype", "float32"])
    assert EngineConfig.from_cli_args(args).weight_dtype == "float32"
    assert EngineConfig().weight_dtype == "auto"
    args = build_parser().parse_args(["serve", "--kv-dtype", "bfloat16"])
    assert EngineConfig.from_cli_args(args).kv_dtype == "bfloat16" and EngineConfig().kv_dtype == "auto"


@pytest.mark.parametrize("setting", ["auto", "float32", "bfloat16"])
def test_engine_packs_the_dense_weights_in_the_chosen_dtype(setting, isa, tiny_mistral_dir, word_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    eng = Engine(
        EngineConfig(model="tiny-mistral", weight_dtype=setting),
        model=model,
        tokenizer=word_tokenizer,
        adapter_resolver=mapping_resolver({}),
        backend="cpu",
    )
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(setting)
    want = want or (torch.bfloat16 if native_bf16() else torch.float32)
    packed = [m for m in eng.model.modules() if isinstance(m, PackedLinear)]
    assert eng.backend.weight_dtype == want
    assert packed and {m.weight.dtype for m in packed} == {want}
    for m in packed:
        assert layout_of(m) == ("onednn" if want == torch.float32 else held(isa, m)), m
    embed = eng.model.get_input_embeddings()
    assert embed.weight.dtype == want  # the table is narrowed with the weights...
    assert embed(torch.tensor([[1, 2]])).dtype == torch.float32  # ...but the activations stay fp32
    assert not any(can_pack(m) for m in eng.model.modules())  # every dense layer was packed
    assert eng.kv_dtype == want  # kv_dtype auto: the cache follows the weights


def test_an_explicit_kv_dtype_is_kept_and_validated(tiny_mistral_dir, word_tokenizer):
    from transformers import AutoModelForCausalLM

    for weights, kv, want in [("bfloat16", "float32", torch.float32), ("float32", "float16", torch.float16)]:
        model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
        config = EngineConfig(model="tiny-mistral", weight_dtype=weights, kv_dtype=kv)
        eng = Engine(config, model=model, tokenizer=word_tokenizer, adapter_resolver=mapping_resolver({}))
        assert eng.kv_dtype == want
    with pytest.raises(ValueError, match="kv_dtype must be one of auto, float32, bfloat16, float16, not 'int8'"):
        EngineConfig(kv_dtype="int8")


def test_bf16_weights_keep_the_embedded_models_greedy_answers(embedded_model, isa):
    """The real 135M model: bf16 weights give the fp32 engine's first token on every prompt, unless
    fp32's best two logits lie within bf16's resolution of each other (rounded to bf16 they tie:
    measured on "What is the capital of France?", 25.325 vs 25.243, both 25.375 in bf16); then the
    bf16 token is one of those tied. Most 8-token answers are the same (a near-tie may flip a
    later token; both are the model's)."""
    import math

    from lora_kit import models

    tokenizer = embedded_model[1]
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello."]
    prompts = [chat.render_prompt(tokenizer, q) for q in questions]
    answers, first_logits = {}, {}
    for setting in ("float32", "bfloat16"):
        model = models.load_model("smollm2-135m-instruct")
        # kv_dtype auto: the bf16 setting holds its KV cache in bf16 too (what a user of it gets).
        eng = Engine(EngineConfig(weight_dtype=setting), model=model, tokenizer=tokenizer)
        try:
            if setting == "bfloat16":
                table, head = eng.model.get_input_embeddings().weight, eng.model.get_output_embeddings().weight
                # SmolLM2 ties its head to the table: held dense in bf16 (the AVX2 path), they stay one
                # tensor, the lookups reading the head's rows; oneDNN's packed head is a copy of its own.
                assert (table is head) == (isa == "avx2") and table.dtype == torch.bfloat16
            params = SamplingParams(max_tokens=8, ignore_eos=True)
            requests = [GenerationRequest(p, params, request_id=f"q{i}") for i, p in enumerate(prompts)]
            with eng.recording_logits() as seen:
                answers[setting] = [eng.generate_sync(r).token_ids for r in requests]
            first_logits[setting] = [seen[f"q{i}"][0] for i in range(len(prompts))]
        finally:
            eng.stop()
    exact, bf16 = answers["float32"], answers["bfloat16"]
    for i, (ours, theirs) in enumerate(zip(bf16, exact)):
        if ours[0] != theirs[0]:
            logits = first_logits["float32"][i]
            best = float(logits.max())
            bf16_step = 2.0 ** (math.floor(math.log2(abs(best))) - 7)  # bf16's spacing at that magnitude
            assert best - float(logits[ours[0]]) <= bf16_step, (questions[i], ours[0], theirs[0])
    assert sum(a[0] == b[0] for a, b in zip(bf16, exact)) >= 3
    assert sum(a == b for a, b in zip(bf16, exact)) >= 2


def test_dropping_a_mapped_tensors_pages_loses_nothing(tmp_path):
    """MADV_DONTNEED on a private read-only file mapping: the pages leave memory and reading
    them again faults the file's bytes back in; memory of its own is never touched."""
    import mmap

    from lora_kit.engine.backends import memory

    values = torch.arange(4 * mmap.PAGESIZE, dtype=torch.int32)
    path = tmp_path / "weights.safetensors"
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns that the buffer is read-only
        view = torch.frombuffer(mapped, dtype=torch.int32)
    assert int(view.sum()) == int(values.sum())  # every page read in
    mappings = memory.file_mappings()
    assert any(start <= view.data_ptr() < end for start, end in mappings)
    released = memory.drop_file_pages(view, mappings)
    assert released >= 3 * mmap.PAGESIZE  # whole pages only
    assert torch.equal(view, values)  # read back from the file
    own = values.clone()
    assert memory.drop_file_pages(own, mappings) == 0 and torch.equal(own, values)
    del view
    mapped.close()
