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


# -- a 16-bit cache (EngineConfig.kv_dtype) ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_layer_stores_rounded_values_and_widens_them_for_an_fp32_caller(dtype):
    g = torch.Generator().manual_seed(4)
    keys, values = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    layer = GrowingLayer(keys, values, dtype=dtype)
    assert layer._k.dtype == dtype and torch.equal(layer.keys, keys.to(dtype))
    ref_k, ref_v = keys.to(dtype), values.to(dtype)
    for _ in range(MIN_SPARE + 3):  # across a reallocation, which keeps the dtype
        k, v = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
        got_k, got_v = layer.update(k, v)  # an fp32 caller: widened copies of the rounded values
        ref_k, ref_v = torch.cat([ref_k, k.to(dtype)], dim=2), torch.cat([ref_v, v.to(dtype)], dim=2)
        assert got_k.dtype == torch.float32 and torch.equal(got_k, ref_k.float()) and torch.equal(got_v, ref_v.float())
    assert layer._k.dtype == dtype and layer.capacity > 5 + MIN_SPARE
    k16, v16 = layer.update(torch.ones(2, 3, 1, 8, dtype=dtype), torch.ones(2, 3, 1, 8, dtype=dtype))
    assert k16.dtype == dtype and k16.data_ptr() == layer._k.data_ptr()  # a caller in the cache's dtype: views


def test_growing_cache_narrows_a_prefills_cache_to_its_dtype():
    keys = torch.randn(2, 1, 7, 4)
    converted = growing_cache([(keys, keys + 1)], dtype=torch.bfloat16)
    layer = converted.layers[0]
    assert layer._k.dtype == torch.bfloat16 and layer.capacity == 7 + MIN_SPARE
    assert torch.equal(layer.keys, keys.to(torch.bfloat16)) and torch.equal(layer.values, (keys + 1).to(torch.bfloat16))
    assert growing_cache([(keys, keys)]).layers[0].keys.dtype == torch.float32  # no dtype: as given


def test_a_prefills_cache_narrowed_to_16_bits_holds_the_fp32_cache_rounded_and_decodes_on(tiny_mistral_dir):
    """The engine's path: prefill in fp32 into a ``DynamicCache``, narrow it to bf16, decode on.
    Every layer holds exactly the fp32 keys and values rounded; the next step's logits are close
    to the fp32 cache's but not equal (it attends over rounded values)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(input_ids=ids[:, :9], past_key_values=DynamicCache(), use_cache=True)
        kv = layer_kv(ref.past_key_values)
        narrow = growing_cache(kv, dtype=torch.bfloat16)
        for (k, v), (ref_k, ref_v) in zip(layer_kv(narrow), kv):
            assert k.dtype == torch.bfloat16
            assert torch.equal(k, ref_k.to(torch.bfloat16)) and torch.equal(v, ref_v.to(torch.bfloat16))
        wide = growing_cache(kv)
        step_ref = model(input_ids=ids[:, 9:], past_key_values=wide, use_cache=True)
        step = model(input_ids=ids[:, 9:], past_key_values=narrow, use_cache=True)
    assert narrow.get_seq_length() == 10 and narrow.layers[0]._k.dtype == torch.bfloat16
    assert torch.allclose(step.logits, step_ref.logits, atol=0.05) and not torch.equal(step.logits, step_ref.logits)


def test_the_running_batch_keeps_its_cache_in_its_dtype_as_rows_join_and_leave():
    from lora_kit.engine.batch import RunningBatch

    batch = RunningBatch(torch.device("cpu"), torch.bfloat16)
    fp32 = lambda rows, length: [(torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 4))]  # noqa: E731
    batch.add(["a"], growing_cache(fp32(1, 5)), torch.ones(1, 5), [1])  # a cache in another dtype: converted
    assert batch.cache.layers[0].dtype == torch.bfloat16
    batch.add(["b", "c"], growing_cache(fp32(2, 3)), torch.ones(2, 3), [2, 3])  # merged, left-padded
    assert [layer.dtype for layer in batch.cache.layers] == [torch.bfloat16] and batch.cache.layers[0].keys.shape[
        :3
    ] == (3, 2, 5)
    batch.keep([2])
    assert batch.cache.layers[0].keys.dtype == torch.bfloat16 and batch.cache.layers[0].keys.shape[:3] == (1, 2, 3)
