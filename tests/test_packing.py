"""Packing: several examples per row, and no attention across them (exact loss equality)."""

import torch

from lora_kit.training import data, packing
from lora_kit.training.recipe import DataSection

CONVS = [
    [{"role": "user", "content": "What is two plus two ?"}, {"role": "assistant", "content": "Four ."}],
    [{"role": "user", "content": "And three plus three ?"}, {"role": "assistant", "content": "Six ."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "weather sunny ."},
    ],
]


def test_first_fit_decreasing_packs_within_the_limit():
    exs = [data.Example([1] * n, [1] * n) for n in (7, 5, 4, 3, 3, 2)]
    rows = packing.pack(exs, 10)
    assert [[len(e) for e in row] for row in rows] == [[7, 3], [5, 4], [3, 2]]
    assert sorted(len(e) for row in rows for e in row) == sorted(len(e) for e in exs)


def test_packed_loss_equals_token_weighted_loss_of_examples_alone(word_tokenizer, tiny_mistral_dir):
    from lora_kit import models

    model = models.load_model(str(tiny_mistral_dir), quantization="none")
    model.config._attn_implementation = "sdpa"
    examples, audit = data.build(word_tokenizer, [{"messages": c} for c in CONVS], DataSection(train="x"))
    assert audit.kept == 3
    with torch.no_grad():
        packed = packing.collate([examples], pad_id=0)  # one row with all three
        assert packed["input_ids"].shape == (1, sum(len(e) for e in examples))
        loss_packed, n_packed = packing.loss_sum(model, packed)
        alone = [packing.loss_sum(model, packing.collate([[e]], pad_id=0)) for e in examples]
    total = sum(float(loss_i) for loss_i, _ in alone)
    count = sum(n for _, n in alone)
    assert n_packed == count == sum(e.supervised for e in examples)
    assert abs(float(loss_packed) / n_packed - total / count) < 1e-5
    # and per-token: the logits of the last example match it run alone
    with torch.no_grad():
        out_packed = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0, -len(examples[2]) :]
        out_alone = model(input_ids=torch.tensor([examples[2].input_ids])).logits[0]
    assert torch.allclose(out_packed, out_alone, atol=1e-5)


def test_padding_rows_do_not_change_the_loss(word_tokenizer, tiny_mistral_dir):
    from lora_kit import models

    model = models.load_model(str(tiny_mistral_dir), quantization="none")
    examples, _ = data.build(word_tokenizer, [{"messages": c} for c in CONVS], DataSection(train="x"))
    with torch.no_grad():
        batch = packing.collate([[examples[0]], [examples[1], examples[2]]], pad_id=0)
        loss, n = packing.loss_sum(model, batch)
        alone = [packing.loss_sum(model, packing.collate([[e]], pad_id=0)) for e in examples]
    assert torch.isfinite(loss)
    assert abs(float(loss) - sum(float(loss_i) for loss_i, _ in alone)) < 1e-4
