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


# -- what the registry accepts is what the engine can serve (issue 12, defect 6) ----------------


def _save_tensors(adapter_dir: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter_dir / fmt.WEIGHTS_FILE
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def _set_config(adapter_dir: Path, raw: str | None = None, **changes) -> None:
    path = adapter_dir / fmt.CONFIG_FILE
    if raw is None:
        raw = json.dumps(json.loads(path.read_text()) | changes)
    path.write_text(raw)


def _register(tmp_path: Path, adapter: Path):
    from lora_kit.registry import Registry

    return Registry(tmp_path / "reg").register(adapter, "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_at_registration(tmp_path, tiny_mistral_dir, dtype, value):
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a")

    def poison(tensors):
        for name in tensors:
            tensors[name] = tensors[name].to(dtype)
        key = next(k for k in sorted(tensors) if "layers.1.mlp.up_proj.lora_B" in k)
        tensors[key][3, 1] = value

    _save_tensors(adapter, poison)
    with pytest.raises(fmt.InvalidAdapter, match=r"tensor \S+layers.1.mlp.up_proj.lora_B\S* holds NaN or infinite"):
        _register(tmp_path, adapter)


def test_finite_low_precision_weights_are_accepted(tmp_path, tiny_mistral_dir):
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a")
    _save_tensors(adapter, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert _register(tmp_path, adapter).rank == 4


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"lora_alpha": 1e308}, r"LoRA scale 2.5e\+307 \(lora_alpha / r\) is not a finite number <= 10000"),
        ({"lora_alpha": 1e6, "use_rslora": True}, r"LoRA scale 5e\+05"),
        ({"alpha_pattern": {"q_proj": 1e300}}, r"self_attn.q_proj: LoRA scale 2.5e\+299"),
        ({"alpha_pattern": {"q_proj": -1}}, r"'alpha_pattern' must map module patterns to positive finite alphas"),
        ({"rank_pattern": {"q_proj": 0}}, r"'rank_pattern' must map module patterns to positive integer ranks"),
    ],
)
def test_absurd_scales_are_refused_at_registration(tmp_path, tiny_mistral_dir, changes, match):
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a")
    _set_config(adapter, **changes)
    with pytest.raises(fmt.InvalidAdapter, match=match):
        _register(tmp_path, adapter)


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_non_finite_lora_alpha_is_refused(tmp_path, tiny_mistral_dir, literal):
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a")
    raw = (adapter / fmt.CONFIG_FILE).read_text()
    _set_config(adapter, raw=raw.replace('"lora_alpha": 8', f'"lora_alpha": {literal}'))
    with pytest.raises(fmt.InvalidAdapter, match="'lora_alpha' must be a positive finite number"):
        _register(tmp_path, adapter)


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def _lying_adapter(tmp_path: Path, tiny_mistral_dir: Path, header: dict, data: bytes, r: int) -> Path:
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a")
    _set_config(adapter, r=r, target_modules=["q_proj"])
    _write_safetensors(adapter / fmt.WEIGHTS_FILE, header, data)
    return adapter


def test_a_header_claiming_more_bytes_than_it_holds_is_refused(tmp_path, tiny_mistral_dir):
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    header = {
        f"{q}.lora_A.weight": {"dtype": "F16", "shape": [10**9, 576], "data_offsets": [0, 4]},
        f"{q}.lora_B.weight": {"dtype": "F16", "shape": [576, 10**9], "data_offsets": [4, 8]},
    }
    adapter = _lying_adapter(tmp_path, tiny_mistral_dir, header, b"\0" * 8, r=10**9)
    with pytest.raises(
        fmt.InvalidAdapter, match=r"claims shape \[1000000000, 576\] of F16 \(1152000000000 bytes\).*hold 4 bytes"
    ):
        validate_adapter_dir(adapter)
    with pytest.raises(fmt.InvalidAdapter, match="inconsistent safetensors header"):
        _register(tmp_path, adapter)


def test_overlapping_tensor_bytes_are_refused(tmp_path, tiny_mistral_dir):
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    header = {  # both tensors read the same 8 bytes; the file's size matches the larger end
        f"{q}.lora_A.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
        f"{q}.lora_B.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]},
    }
    adapter = _lying_adapter(tmp_path, tiny_mistral_dir, header, b"\0" * 8, r=1)
    with pytest.raises(fmt.InvalidAdapter, match="data does not follow the previous tensor's bytes"):
        validate_adapter_dir(adapter)


def test_a_rank_above_the_engines_default_limit_is_a_warning_the_engine_enforces(tmp_path, tiny_mistral_dir):
    from lora_kit.engine import EngineConfig

    assert EngineConfig().max_rank == fmt.MAX_RANK  # one constant, shared
    rank = fmt.MAX_RANK + 1
    adapter = make_adapter(tiny_mistral_dir, tmp_path / "a", rank_pattern={"q_proj": rank})
    version = _register(tmp_path, adapter)
    assert version.rank == rank
    expected = (
        f"lora-kit serve cannot load it with the default max rank {fmt.MAX_RANK}: rank {rank} needs --max-rank {rank}"
    )
    assert expected in version.warnings
    with pytest.raises(AdapterError, match=f"exceeds the engine's max rank {fmt.MAX_RANK}"):
        load_adapter("a", adapter, _linear_shapes(tiny_mistral_dir), torch.float32, torch.device("cpu"), fmt.MAX_RANK)
    small = make_adapter(tiny_mistral_dir, tmp_path / "b")
    assert not [w for w in validate_adapter_dir(small).warnings if "max rank" in w]
