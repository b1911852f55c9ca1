"""The PEFT adapter format has one owner (lora_kit.adapters.format): the registry's validation,
the engine's loader and PEFT itself must read an adapter the same way."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import make_adapter

from lora_kit.adapters import format as fmt
from lora_kit.adapters.validation import validate_adapter_dir
from lora_kit.engine.adapters import load_adapter, read_config
from lora_kit.engine.types import AdapterError


@pytest.mark.parametrize(
    "name, expected",
    [
        ("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", ("model.layers.0.mlp.up_proj", "linear", "A")),
        (
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
            ("model.layers.1.self_attn.q_proj", "linear", "B"),
        ),
        (
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight",
            ("model.layers.0.mlp.up_proj", "linear", "A"),
        ),
        ("model.layers.0.mlp.up_proj.lora_B.weight", ("model.layers.0.mlp.up_proj", "linear", "B")),
        ("base_model.model.model.embed_tokens.lora_embedding_A", ("model.embed_tokens", "embedding", "A")),
        (
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector",
            ("model.layers.0.mlp.up_proj", "dora", "m"),
        ),
        ("base_model.model.lm_head.weight", None),
    ],
)
def test_tensor_names(name, expected):
    key = fmt.parse_tensor_name(name)
    assert (None if key is None else (key.module, key.kind, key.part)) == expected


def test_rank_and_alpha_patterns_and_rslora():
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {r"layers\.1\.mlp\.up_proj": 2}}
    assert fmt.module_rank(config, "model.layers.0.self_attn.q_proj") == 4
    assert fmt.module_rank(config, "model.layers.0.self_attn.k_proj") == 8
    assert fmt.module_scale(config, "model.layers.0.self_attn.q_proj") == 16 / 4
    assert fmt.module_scale(config, "model.layers.1.mlp.up_proj") == 2 / 8
    assert fmt.module_scale(config, "model.layers.0.mlp.up_proj") == 16 / 8
    # a pattern key matches on a dot boundary only: "proj" is not the end of "q_proj"'s name
    assert fmt.module_rank({"r": 8, "rank_pattern": {"proj": 2}}, "model.layers.0.self_attn.q_proj") == 8
    assert fmt.module_scale({"r": 16, "lora_alpha": 8, "use_rslora": True}, "x") == 8 / math.sqrt(16)


def _drop_alpha(adapter_dir: Path) -> None:
    path = adapter_dir / fmt.CONFIG_FILE
    config = json.loads(path.read_text())
    del config["lora_alpha"]
    path.write_text(json.dumps(config))


def test_missing_lora_alpha_means_the_same_to_registry_engine_and_peft(tmp_path, tiny_mistral_dir):
    """Validation once read a missing lora_alpha as ``r`` while the engine read PEFT's default (8)."""
    from peft import PeftModel
    from transformers import MistralForCausalLM

    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a", r=2)
    _drop_alpha(adapter)
    peft = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(tiny_mistral_dir), adapter)
    q_proj = peft.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 8 / 2  # PEFT's own reading

    info = validate_adapter_dir(adapter, tiny_mistral_dir)
    assert info.alpha == peft.peft_config["default"].lora_alpha == 8

    weights = load_adapter("a", adapter, _linear_shapes(tiny_mistral_dir), torch.float32, torch.device("cpu"), 8)
    a, b = weights.modules["model.layers.0.self_attn.q_proj"]  # A (r, in), scale * B (out, r)
    torch.testing.assert_close(b, q_proj.lora_B["default"].weight.detach() * q_proj.scaling["default"])
    torch.testing.assert_close(a, q_proj.lora_A["default"].weight.detach())


def _linear_shapes(base_dir: Path) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of every linear layer of the tiny Mistral's decoder."""
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(base_dir)
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }


@pytest.mark.parametrize("key", sorted(fmt.UNSERVABLE))
def test_registry_warns_about_exactly_what_the_engine_refuses(tmp_path, tiny_mistral_dir, key):
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a")
    path = adapter / fmt.CONFIG_FILE
    config = json.loads(path.read_text())
    config[key] = ["lm_head"] if key in ("modules_to_save", "target_parameters") else True
    path.write_text(json.dumps(config))
    reason = fmt.UNSERVABLE[key]

    info = validate_adapter_dir(adapter)
    assert f"lora-kit serve cannot load it: {reason}" in info.warnings
    with pytest.raises(AdapterError, match=reason.split(" (")[0].split(":")[0]):
        read_config(adapter)


def test_a_servable_adapter_gets_no_serving_warning(tmp_path, tiny_mistral_dir):
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a")
    info = validate_adapter_dir(adapter, tiny_mistral_dir)
    assert not [w for w in info.warnings if "cannot load" in w]
    assert read_config(adapter)["r"] == 4
