"""oneDNN-packed linear layers: the same products as nn.Linear, the dense weight gone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_kit.engine.backends.packed_linear import (
    ISA_ENV,
    PackedLinear,
    can_pack,
    copy_unpacked_weights,
    onednn_bf16,
    pack_output_head,
    tiles_bf16,
)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (8, 48), (3, 5, 48)])
def test_packed_linear_equals_nn_linear(bias, shape):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    dense = layer.weight.detach().clone()
    x = torch.randn(*shape)
    want = layer(x).detach()
    packed = PackedLinear(layer, batch_hint=8)
    with torch.inference_mode():
        got = packed(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # another summation order, not other numbers
    assert packed.weight.is_mkldnn and not packed.weight.requires_grad
    assert torch.equal(packed.dense_weight(), dense)  # the layout changed, not the values


@pytest.mark.parametrize("isa", ["auto", "avx512", "avx2"])
def test_bf16_packed_linear_is_close(isa, monkeypatch):
    """A bf16 layer: tiled where the CPU has AMX, oneDNN-packed where oneDNN takes bf16 (and on the
    forced AVX-512 path), else (and on the forced AVX2 path) kept dense for torch's product."""
    monkeypatch.setenv(ISA_ENV, isa)
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    want = layer(x).detach().float()
    packed = PackedLinear(layer, 8)
    with torch.inference_mode():
        got = packed(x)
    assert packed.tiled == tiles_bf16() and packed.onednn == (onednn_bf16() and not packed.tiled)
    assert can_pack(layer)  # held dense where oneDNN cannot take bf16: a bf16-loaded base is wrapped too
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_only_dense_cpu_linears_are_packed():
    class FourBit(nn.Linear):  # stands for bitsandbytes' Linear4bit, an nn.Linear subclass
        pass

    assert can_pack(nn.Linear(4, 4))
    assert not can_pack(FourBit(4, 4))
    assert not can_pack(nn.Linear(4, 4).half())
    assert not can_pack(PackedLinear(nn.Linear(4, 4), 8))  # already packed
    assert not can_pack(nn.Conv1d(4, 4, 1))


def test_tied_head_gets_its_own_copy_and_the_embedding_stays_dense():
    from transformers import AutoModelForCausalLM

    from lora_kit import models

    # A fresh copy: packing changes the model in place.
    model = AutoModelForCausalLM.from_pretrained(models.resolve("smollm2-135m-instruct"), dtype=torch.float32).eval()
    embed = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is embed.weight  # SmolLM2 ties them
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        assert pack_output_head(model, 8)
        got = model(input_ids=ids).logits
    head = model.get_output_embeddings()
    assert isinstance(head, PackedLinear) and not embed.weight.is_mkldnn
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not pack_output_head(model, 8)  # packed once


def test_dense_leftovers_in_the_checkpoint_get_their_own_memory():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    model[2] = PackedLinear(model[2], 8)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters() if not p.is_mkldnn}
    copy_unpacked_weights(model, [])  # nothing lies in a checkpoint mapping: nothing is copied
    assert all(p.data_ptr() == before[n][0] for n, p in model.named_parameters() if n in before)
    embed = model[0].weight
    mapping = [(embed.data_ptr(), embed.data_ptr() + embed.numel() * 4)]  # as if the table were mapped
    copy_unpacked_weights(model, mapping)
    for name, p in model.named_parameters():
        if name in before:
            ptr, values = before[name]
            assert (p.data_ptr() != ptr) == (name == "0.weight") and torch.equal(p, values)
    assert model[2].weight.is_mkldnn  # the packed weight is left alone


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 40, 70])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel", [True, False])
def test_a_dense_bf16_weight_gives_torchs_bf16_product_on_every_path(rows, bias, kernel, monkeypatch):
    """On the AVX2 path a dense bf16 weight times up to KERNEL_MAX_ROWS rows takes lora-kit's kernel
    (where built), more rows fp32 GEMM on blocks widened from bf16, and without the kernel several
    rows take the blocks and one row torch's product: every path gives torch's bf16 product (bf16
    in, fp32 sums, bf16 out) within one bf16 rounding."""
    from lora_kit.engine.backends import packed_linear

    monkeypatch.setenv(ISA_ENV, "avx2")
    torch.manual_seed(rows)
    layer = nn.Linear(96, 2 * packed_linear.WIDEN_BLOCK + 37, bias=bias)  # a last, partial block
    packed = PackedLinear(layer, 8, torch.bfloat16)
    assert not packed.onednn
    if kernel:
        if packed._kernel is None:
            pytest.skip("the CPU kernel could not be built here")
    else:
        packed._kernel = None  # what a machine without a C++ compiler runs
    x = torch.randn(rows, 96)
    w = layer.weight.detach().to(torch.bfloat16)
    b = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
    calls = []
    blocked = PackedLinear._widened_by_blocks
    monkeypatch.setattr(PackedLinear, "_widened_by_blocks", lambda self, x: calls.append(x) or blocked(self, x))
    with torch.inference_mode():
        got = packed(x)
        want = nn.functional.linear(x.to(torch.bfloat16), w, b).float()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, got.bfloat16().float())  # rounded to bf16, widened
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)  # one bf16 rounding at most
    kernel_rows = kernel and rows <= packed_linear.KERNEL_MAX_ROWS
    assert len(calls) == (0 if kernel_rows or rows == 1 else 1)


@pytest.mark.parametrize("rows", [1, 8])
def test_the_bf16_kernel_at_mistral_7b_width_gives_torchs_bf16_product(rows, monkeypatch):
    """Mistral-7B's down_proj (4096 x 14336) through the kernel: torch's bf16 product within one
    bf16 rounding; and the op refuses tensors it cannot take."""
    monkeypatch.setenv(ISA_ENV, "avx2")
    torch.manual_seed(rows)
    layer = nn.Linear(14336, 4096, bias=False)
    packed = PackedLinear(layer, 8, torch.bfloat16)
    if packed._kernel is None:
        pytest.skip("the CPU kernel could not be built here")
    x = torch.randn(rows, 14336)
    with torch.inference_mode():
        got = packed(x)
        want = nn.functional.linear(x.to(torch.bfloat16), packed.weight).float()
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)
    with pytest.raises(RuntimeError, match="weight must be a contiguous bfloat16"):
        packed._kernel(x, layer.weight.detach(), None, True)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        packed._kernel(x[:, :4095], packed.weight, None, True)
    # x as it comes: any leading shape, strided, another dtype (taken as fp32)
    strided = torch.stack([x, x], dim=-1)[..., 0].reshape(rows, 1, 14336)
    assert not strided.is_contiguous()
    got3 = packed._kernel(strided, packed.weight, None, True)
    assert got3.shape == (rows, 1, 4096) and torch.equal(got3.reshape(rows, 4096), got)
    assert torch.equal(packed._kernel(x.double(), packed.weight, None, True), got)
