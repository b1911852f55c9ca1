"""scripts/make_random_model.py: true-shape random Mistral checkpoints (issue #23, item 1).

Runs the CI-sized shape (``mistral-tiny``: the true vocabulary and tokenizer, 64 wide, 2 layers)
end to end; the 7B shapes are checked through their config and tensor table only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_random_model.py"

# Mistral-7B-Instruct-v0.1's config.json, written out independently of the script (an exact-value
# expectation): the dimensions as published; max_position_embeddings, rms_norm_eps and torch_dtype as
# issue 23 states them, not yet checked against the published file (see the script's docstring).
V01 = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}


def _script():
    if "make_random_model" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_random_model", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_random_model"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_random_model"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _script().make("mistral-tiny", tmp_path_factory.mktemp("tiny") / "model", seed=7)


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_mistral_7b_config_is_v01s_exactly(tmp_path):
    out = tmp_path / "m7b"
    subprocess.run([sys.executable, str(SCRIPT), "--shape", "mistral-7b", "--config-only", str(out)], check=True)
    assert json.loads((out / "config.json").read_text()) == V01
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json"]
    two = _script().shape_config("mistral-7b-2layers")
    assert two == {**V01, "num_hidden_layers": 2}


def test_mistral_7b_tensor_table_and_shards():
    mod = _script()
    tensors = mod.tensor_shapes(mod.shape_config("mistral-7b"))
    assert len(tensors) == 2 + 32 * 9 + 1
    shapes = dict(tensors)
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 14336)
    total = sum(mod.nbytes(s) for _, s in tensors)
    assert total == 2 * 7_241_732_096  # Mistral-7B's parameter count, in bf16
    shards = mod.plan_shards(tensors)
    assert [name for shard in shards for name, _ in shard] == [name for name, _ in tensors]
    sizes = [sum(mod.nbytes(s) for _, s in shard) for shard in shards]
    assert len(shards) == 4 and all(size <= mod.MAX_SHARD_BYTES for size in sizes) and min(sizes) > 1e9


def test_index_maps_every_tensor_with_the_configs_shapes(tiny):
    from safetensors import safe_open

    mod = _script()
    config = json.loads((tiny / "config.json").read_text())
    assert config == {**V01, **mod.SHAPES["mistral-tiny"]}
    expected = dict(mod.tensor_shapes(config))
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    seen, total = {}, 0
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(tiny / fname), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16 and index["weight_map"][name] == fname
                seen[name] = tuple(t.shape)
                total += t.numel() * 2
                if name.endswith("norm.weight"):
                    assert bool((t == 1).all())
                else:
                    assert 0.015 < t.float().std().item() < 0.025
    assert seen == expected
    assert index["metadata"]["total_size"] == total


def test_shards_split_and_same_seed_gives_same_bytes(tmp_path, tiny):
    mod = _script()
    again = mod.make("mistral-tiny", tmp_path / "again", seed=7)
    assert _digests(again) == _digests(tiny)
    other = mod.make("mistral-tiny", tmp_path / "other", seed=8, max_bytes=3 * 2**20)
    assert len(list(other.glob("model-*-of-00003.safetensors"))) == 3
    index = json.loads((other / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(dict(mod.tensor_shapes(mod.shape_config("mistral-tiny"))))
    assert _digests(other)["model-00001-of-00003.safetensors"] != _digests(tiny)["model-00001-of-00001.safetensors"]


def test_loads_with_transformers_and_lora_kit_and_generates(tiny):
    from transformers import AutoModelForCausalLM

    from lora_kit import chat, models

    model = AutoModelForCausalLM.from_pretrained(str(tiny))
    assert model.config.sliding_window == 4096 and model.config.vocab_size == 32000
    tok = models.load_tokenizer(str(tiny))
    ids = chat.render(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True).input_ids
    base = models.load_model(str(tiny), device=torch.device("cpu"))
    for m in (model, base):
        out = m.generate(
            torch.tensor([ids]), max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        assert out.sequences.shape == (1, len(ids) + 1)
        assert bool(out.scores[0].isfinite().all())
        assert 0 <= int(out.sequences[0, -1]) < 32000


def test_real_v01_tokenizer_renders_the_builtin_chat_format(tiny):
    from lora_kit import chat, models

    tok = models.load_tokenizer(str(tiny))
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert chat.uses_builtin_format(tok)
    # The ids Mistral documents for v0.1 (mistral_common's tokenization).
    prompt = chat.render(tok, [{"role": "user", "content": "What is your favourite condiment?"}], True)
    assert prompt.input_ids == [
        1,
        733,
        16289,
        28793,
        1824,
        349,
        574,
        16020,
        2076,
        2487,
        28804,
        733,
        28748,
        16289,
        28793,
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say ok."},
    ]
    rendered = chat.render(tok, messages)
    assert rendered.input_ids.count(1) == 1 and rendered.input_ids[0] == 1
    assert tok.decode(rendered.input_ids) == (
        "<s> [INST] Be brief.\n\nHi there [/INST] Hello! How can I help?</s> [INST] Say ok. [/INST]"
    )
    reply = [i for i, m in zip(rendered.input_ids, rendered.assistant_mask, strict=True) if m]
    assert tok.decode(reply) == "Hello! How can I help?</s>"
    text = "Héllo wörld 😀\n  two  spaces"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_list_shapes():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--list-shapes"], check=True, capture_output=True, text=True
    ).stdout
    assert {"mistral-7b", "mistral-7b-2layers", "mistral-tiny"} <= {line.split()[0] for line in out.splitlines()}
