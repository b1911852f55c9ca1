"""The trainer's LoRA forward (training/fast_lora.py): exact against PEFT's, exact gradients, and
dropout masks with the requested drop rate."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_kit.training import fast_lora


class TwoLinear(torch.nn.Module):
    """A stand-in for a decoder layer: two projections reading the same input."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(12, 10)
        self.up_proj = torch.nn.Linear(12, 16)

    def forward(self, x):
        return self.q_proj(x).sum(-1) + self.up_proj(x).sum(-1)


def peft_pair(dropout: float):
    """Two identical PEFT models (random, non-zero LoRA B); the second gets the fast forward."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        config = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "up_proj"], init_lora_weights=False
        )
        models.append(get_peft_model(TwoLinear(), config))
    assert fast_lora.install(models[1]) == 2
    assert fast_lora.install(models[1]) == 2  # idempotent: PEFT's forward is kept once
    return models


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["eval", "train, dropout 0"])
def test_fast_forward_equals_peft_without_dropout(mode):
    peft_model, fast_model = peft_pair(0.0 if mode != "eval" else 0.1)
    x = torch.randn(3, 5, 12)
    outs = []
    for model in (peft_model, fast_model):
        model.train(mode != "eval")
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.pow(2).sum().backward()
        outs.append((out.detach(), xi.grad, grads(model)))
    (o1, gx1, g1), (o2, gx2, g2) = outs
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx2, gx1, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) == 4  # lora_A and lora_B of both projections
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-5)


def test_lora_delta_matches_autograd_with_a_given_mask():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    dropped = fast_lora.drop_mask(x.shape, 0.3, x.device)
    assert dropped.any() and not dropped.all()
    scale = 1 / (1 - fast_lora.drop_probability(0.3))
    ours = fast_lora.LoraDelta.apply(x, a, b, dropped, scale, 2.0)
    reference = (x * ~dropped * scale) @ a.t() @ b.t() * 2.0
    torch.testing.assert_close(ours, reference)
    weight = torch.randn_like(ours)
    got = torch.autograd.grad((ours * weight).sum(), (x, a, b))
    want = torch.autograd.grad((reference * weight).sum(), (x, a, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(lambda x, a, b: fast_lora.LoraDelta.apply(x, a, b, dropped, scale, 2.0), (x, a, b))


def test_drop_mask_drops_at_the_requested_rate_and_follows_the_seed():
    assert fast_lora.drop_probability(0.05) == 3277 / 65536
    assert fast_lora.drop_probability(0.0) == 0.0
    n = 4_000_000
    torch.manual_seed(3)
    mask = fast_lora.drop_mask((1000, n // 1000), 0.05, torch.device("cpu"))
    assert mask.shape == (1000, n // 1000) and mask.dtype == torch.bool
    p = fast_lora.drop_probability(0.05)
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(mask.float().mean()) - p) < 5 * sigma
    # rows and columns are independent: the drop rate of every 100th row alone is p as well
    assert abs(float(mask[::100].float().mean()) - p) < 5 * sigma * 10**0.5
    torch.manual_seed(3)
    assert torch.equal(fast_lora.drop_mask((1000, n // 1000), 0.05, torch.device("cpu")), mask)


def test_train_mode_dropout_scales_kept_inputs_and_zeroes_the_rest():
    """With dropout, the LoRA delta equals the delta of the input masked by some 0/scale mask."""
    _, fast_model = peft_pair(0.5)
    fast_model.train()
    layer = fast_model.base_model.model.q_proj
    x = torch.ones(64, 12)
    torch.manual_seed(5)
    delta = layer(x) - layer.base_layer(x)
    torch.manual_seed(5)
    dropped = fast_lora.drop_mask(x.shape, 0.5, x.device)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = (x * ~dropped * 2.0) @ a.t() @ b.t() * layer.scaling["default"]
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-5)
