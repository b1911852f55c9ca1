"""The engine's in-place KV cache: exactly what concatenation gives, without copying per step."""

from __future__ import annotations

import pytest
import torch

from lora_kit.engine.kv_cache import MIN_SPARE, GrowingLayer, growing_cache, layer_kv, spare_for


def test_growing_layer_equals_concatenation_across_reallocations():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    layer = GrowingLayer(keys, values)
    assert layer.capacity == 5 + MIN_SPARE
    ref_k, ref_v = keys, values
    capacities = {layer.capacity}
    for step in range(150):
        n = 1 if step % 10 else 3  # mostly decode steps, some multi-token writes
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        got_k, got_v = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
        assert layer.get_seq_length() == ref_k.shape[2]
        capacities.add(layer.capacity)
    assert len(capacities) >= 3  # it did reallocate, more than once


def test_decode_step_writes_in_place():
    layer = GrowingLayer(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4))
    before = layer.keys.data_ptr()
    for _ in range(MIN_SPARE):  # the spare columns: no reallocation, no copy of the cache
        k, _ = layer.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4))
        assert k.data_ptr() == before
    layer.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4))
    assert layer.keys.data_ptr() != before  # full: moved to a larger buffer
    assert layer.capacity == layer.length + spare_for(layer.length)


def test_spare_grows_with_length():
    assert spare_for(10) == MIN_SPARE
    assert spare_for(1000) == 500


def test_cache_round_trip_and_model_forward_match_dynamic_cache(tiny_mistral_dir):
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        first = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        dyn = first.past_key_values
        grow = growing_cache(layer_kv(dyn))
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(layer_kv(dyn), layer_kv(grow)))
        token = first.logits[:, -1:].argmax(-1)
        for _ in range(5):
            ref = model(input_ids=token, past_key_values=dyn, use_cache=True).logits
            got = model(input_ids=token, past_key_values=grow, use_cache=True).logits
            assert torch.equal(got, ref)
            token = ref[:, -1:].argmax(-1)
        assert grow.get_seq_length() == dyn.get_seq_length() == 12


def test_crop_select_and_repeat_keep_the_filled_part_exact():
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(3, 2, 6, 4, generator=g), torch.randn(3, 2, 6, 4, generator=g)
    layer = GrowingLayer(keys, values)
    layer.crop(-2)
    assert torch.equal(layer.keys, keys[:, :, :4]) and layer.get_seq_length() == 4
    new_k, new_v = torch.randn(3, 2, 1, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g)
    k, v = layer.update(new_k, new_v)  # writes over the cropped columns
    assert torch.equal(k, torch.cat([keys[:, :, :4], new_k], dim=2)) and torch.equal(
        v, torch.cat([values[:, :, :4], new_v], dim=2)
    )
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, k[[2, 0]]) and torch.equal(layer.values, v[[2, 0]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, k[[2, 2, 0, 0]])
    assert layer.update(torch.zeros(4, 2, 1, 4), torch.zeros(4, 2, 1, 4))[0].shape == (4, 2, 6, 4)
    with pytest.raises(ValueError):
        layer.crop(3)
