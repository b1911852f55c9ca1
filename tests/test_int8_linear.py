"""Weight-only int8 base weights (``weight_dtype="int8"``): the blockwise quantization, the CPU
kernel and the torch path against float64 references, and the engine against PEFT on a base
whose weights are the dequantized ones."""

from __future__ import annotations

import helpers
import pytest
import torch
from helpers import greedy, make_peft_init_adapter, mistral_engine, prompts
from torch import nn

from lora_kit.engine import EngineConfig
from lora_kit.engine.backends import bgmv
from lora_kit.engine.backends.int8_linear import (
    KERNEL_MAX_ROWS,
    Int8Linear,
    dequantize,
    group_size,
    quantize,
)

needs_compiler = helpers.needs_compiler()


def linear(n_in: int, n_out: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    nn.init.normal_(layer.weight, std=0.05)
    if bias:
        nn.init.normal_(layer.bias, std=0.1)
    return layer


def test_quantization_error_is_at_most_half_a_step_per_weight():
    layer = linear(200, 37)  # 200 = 8 x 25: blocks of 8; 37 rows: three panels, the last padded
    layer.weight.data[3, 16:24] = 0.0  # an all-zero block: scale 0, dequantized to exact zeros
    q, s = quantize(layer.weight)
    assert group_size(200) == 8 and q.shape == (3, 200, 16) and s.shape == (3, 25, 16)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    w = layer.weight.detach().double()
    deq = dequantize(q, s, 37).double()
    step = s.transpose(1, 2).reshape(48, 25)[:37].double().repeat_interleave(8, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-12).all()  # round to nearest: half a step at most
    assert (deq[3, 16:24] == 0).all()
    assert (q.transpose(1, 2).reshape(48, 200)[37:] == 0).all()  # padding rows hold nothing
    assert 0 < (deq - w).abs().max() <= w.abs().max() / 254  # it did round: at most half the largest step


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 32, 33, 70, KERNEL_MAX_ROWS + 44])
@pytest.mark.parametrize(("n_in", "n_out"), [(576, 1536), (1536, 576), (200, 37)])
def test_int8_linear_equals_a_float64_product_of_the_dequantized_weight(rows, n_in, n_out):
    """Both paths (the kernel up to KERNEL_MAX_ROWS rows, torch's GEMM of widened blocks above
    it or without a compiler) compute x @ dequant(W)^T + b in fp32 sums: float64's answer up to
    fp32 rounding; the original weight's within the quantization error."""
    layer = linear(n_in, n_out, bias=True, seed=rows)
    packed = Int8Linear(layer)
    x = torch.randn(2, rows, n_in) if rows % 2 == 0 else torch.randn(rows, n_in)
    with torch.inference_mode():
        got = packed(x)
    assert got.shape == (*x.shape[:-1], n_out) and got.dtype == torch.float32
    exact = x.double() @ packed.dense_weight().double().T + layer.bias.detach().double()
    torch.testing.assert_close(got.double(), exact, atol=2e-5, rtol=1e-5)
    original = x.double() @ layer.weight.detach().double().T + layer.bias.detach().double()
    step = packed.scales.double().abs().max()
    bound = x.double().abs().sum(-1, keepdim=True) * step / 2  # sum_k |x_k| * half a step
    assert ((got.double() - original).abs() <= bound + 1e-4).all()
    assert (got.double() - original).abs().max() > 1e-6  # int8, not the fp32 weights


@needs_compiler
@pytest.mark.parametrize("rows", [1, 5, 8, 32])
def test_the_kernel_and_the_torch_path_agree_at_mistral_7b_width(rows):
    """Mistral-7B's down_proj shape (4096 x 14336): the kernel against torch's widened blocks."""
    assert bgmv.load(), bgmv.error()
    layer = linear(14336, 4096, seed=rows)
    packed = Int8Linear(layer)
    assert packed._kernel is not None
    x = torch.randn(rows, 14336)
    with torch.inference_mode():
        got = packed(x)
        ref = packed._widened_by_blocks(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    if rows == 1:
        exact = x.double() @ packed.dense_weight().double().T
        torch.testing.assert_close(got.double(), exact, atol=1e-4, rtol=1e-5)


def test_the_torch_path_serves_where_the_kernel_is_missing():
    layer = linear(576, 192, bias=True)
    packed = Int8Linear(layer)
    packed._kernel = None  # what a machine without a C++ compiler gets
    x = torch.randn(3, 576)
    with torch.inference_mode():
        got = packed(x)
    exact = x.double() @ packed.dense_weight().double().T + layer.bias.detach().double()
    torch.testing.assert_close(got.double(), exact, atol=2e-5, rtol=1e-5)


@needs_compiler
def test_the_kernel_refuses_mismatched_tensors():
    assert bgmv.load(), bgmv.error()
    q, s = quantize(linear(64, 32).weight)
    op = torch.ops.lora_kit.wo_int8_linear
    with pytest.raises(RuntimeError, match="qweight does not match"):
        op(torch.randn(2, 64), q, s, None, 40)
    with pytest.raises(RuntimeError, match="scales float32, qweight int8"):
        op(torch.randn(2, 64), q, s.double(), None, 32)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(torch.randn(2, 64), q, s, torch.zeros(31), 32)
    x = torch.randn(3, 2, 64)  # x as it comes: any leading shape, another dtype (taken as fp32)
    got = op(x.double(), q, s, None, 32)
    assert got.shape == (3, 2, 32) and got.dtype == torch.float32
    assert torch.equal(got.reshape(6, 32), op(x.reshape(6, 64), q, s, None, 32))


def reference_with_dequantized_weights(base_dir, adapter_dir):
    """transformers + PEFT over ``base_dir`` with every linear weight and the head replaced by their
    int8 round trip and the input embeddings rounded to bf16: what the int8 engine computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for module in list(model.modules()):
            if type(module) is nn.Linear:
                module.weight = nn.Parameter(dequantize(*quantize(module.weight), module.out_features))
        embed = model.get_input_embeddings()
        embed.weight = nn.Parameter(embed.weight.to(torch.bfloat16).float())
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def test_int8_engine_matches_peft_on_the_dequantized_base(tiny_mistral_dir, word_tokenizer, tmp_path):
    """The engine with int8 base weights (fp32 adapters) against PEFT on a model holding the same
    dequantized weights: the same greedy tokens, alone and in one batch with the base."""
    adapter = make_peft_init_adapter(tiny_mistral_dir, tmp_path / "qv", ["q_proj", "v_proj"], 8, 16, False, seed=3)
    eng = mistral_engine(
        tiny_mistral_dir, word_tokenizer, {"qv": adapter}, weight_dtype="int8", adapter_dtype="float32"
    )
    try:
        assert eng.backend.weight_dtype == torch.int8
        assert sum(isinstance(m, Int8Linear) for m in eng.model.modules()) == 7 * 2 + 1  # the head too
        prompt = prompts(word_tokenizer)[2]
        with eng.recording_logits() as seen:
            got = {name: eng.generate_sync(greedy(prompt, name, 10)).token_ids for name in (None, "qv")}
    finally:
        eng.stop()
    stops = sorted(eng.stop_ids)
    for name, adapter_dir in ((None, None), ("qv", adapter)):
        ref_model = reference_with_dequantized_weights(tiny_mistral_dir, adapter_dir)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = ref_model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                eos_token_id=stops, pad_token_id=stops[0],
            )  # fmt: skip
            first = ref_model(ids).logits[0, -1]
        assert got[name] == ref[0, len(prompt) :].tolist(), name
        recorded = [logits for logits in seen.values()]
        assert any(torch.allclose(r[0].double(), first.double(), atol=1e-4) for r in recorded), name


def test_int8_is_a_serve_flag_and_auto_never_picks_it():
    from lora_kit.cli import build_parser
    from lora_kit.engine.fit import cpu_weight_dtype

    args = build_parser().parse_args(["serve", "--weight-dtype", "int8"])
    assert EngineConfig.from_cli_args(args).weight_dtype == "int8"
    assert cpu_weight_dtype("auto", 7 * 10**9, 24 << 30) == "bfloat16"
    assert cpu_weight_dtype("int8", 7 * 10**9, 24 << 30) == "int8"


def test_eval_loads_the_int8w_precision(tiny_mistral_dir):
    """``lora-kit eval --precision int8w`` evaluates what ``serve --weight-dtype int8`` serves."""
    from lora_kit.evaluation.runner import load_engine

    eng = load_engine(str(tiny_mistral_dir), "int8w")
    try:
        assert eng.backend.weight_dtype == torch.int8
        assert sum(isinstance(m, Int8Linear) for m in eng.model.modules()) == 7 * 2 + 1
    finally:
        eng.stop()
