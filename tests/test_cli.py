"""The `lora-kit` command through a subprocess."""

import json
import os
import subprocess
import sys

import pytest

LORA_KIT = [sys.executable, "-m", "lora_kit"]


def run(*args, **kw):
    return subprocess.run([*LORA_KIT, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300, **kw)


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom lora_kit import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: lora-kit" in out.stdout
    assert out.stdout.strip().endswith("NO-TORCH")


@pytest.mark.parametrize("sub", [["models"], ["models", "list"], ["models", "prepare"], ["generate"]])
def test_every_subcommand_has_help(sub):
    out = run(*sub, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: lora-kit" in out.stdout


def test_generate_prints_paris():
    out = run("generate", "--model", "smollm2-135m-instruct", "--max-tokens", "24", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_bad_model_is_one_line_error():
    out = run("generate", "--model", "no such model", "hi")
    assert out.returncode == 2
    assert "lora-kit: error: unknown model 'no such model'" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_adapter_is_an_error_not_the_base_model(tmp_path):
    env = {**os.environ, "LORA_KIT_HOME": str(tmp_path)}
    # the embedded model is converted per LORA_KIT_HOME; point at the shared one to keep it quick
    from lora_kit import models

    base = str(models.embedded_dir("smollm2-135m-instruct"))
    out = subprocess.run(
        [*LORA_KIT, "generate", "--model", base, "--lora", "nope", "hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2
    assert "nope" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_models_list_json():
    import json

    out = run("models", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows[0]["name"] == "smollm2-135m-instruct" and rows[0]["prepared"] is True


# -- issue 29 item 8: a user file that is not UTF-8, or is nested 100,000 deep, is one error line ------

DEEP = "[" * 100_000
NOT_UTF8 = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'


def run_home(home, *args):
    env = {**os.environ, "LORA_KIT_HOME": str(home)}
    return subprocess.run([*LORA_KIT, *args], capture_output=True, text=True, env=env, timeout=300)


def one_error_line(out, *needles):
    """The command failed as the CLI reports a user error: exit status 2, one `lora-kit: error:` line."""
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-kit: error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("content", [NOT_UTF8, b"\xff\xfe" + "{}\n".encode("utf-16-le"), DEEP.encode() + b"\n"])
def test_eval_data_not_utf8_or_nested_too_deep_is_one_error_line(tmp_path, content):
    data = tmp_path / "held out.jsonl"
    data.write_bytes(content)
    out = run_home(tmp_path / "home", "eval", "base", "--model", "smollm2-135m-instruct", "--data", str(data))
    line = one_error_line(out, "held out.jsonl")
    assert ("UTF-8" in line) if content != DEEP.encode() + b"\n" else ("nested" in line)


@pytest.mark.parametrize("config", [DEEP.encode(), b'{"r": 8, "peft_type": "LORA\xff"}', ('{"a":' * 50_000).encode()])
def test_adapters_add_config_not_utf8_or_nested_too_deep_is_one_error_line(tmp_path, config):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(config)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    out = run_home(tmp_path / "home", "adapters", "add", str(adapter), "--name", "deep")
    line = one_error_line(out, "adapter_config.json")
    assert ("UTF-8" in line) if b"\xff" in config else ("nested" in line)


def test_adapters_add_safetensors_header_nested_too_deep_is_one_error_line(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}')
    header = DEEP.encode()
    (adapter / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    out = run_home(tmp_path / "home", "adapters", "add", str(adapter), "--name", "deep")
    one_error_line(out, "adapter_model.safetensors", "nested")


@pytest.mark.parametrize("command", ["plan", "train"])
@pytest.mark.parametrize("content", [b"model: caf\xe9\n", b"model: " + DEEP.encode() + b"\n"])
def test_recipe_not_utf8_or_nested_too_deep_is_one_error_line(tmp_path, command, content):
    recipe = tmp_path / "my recipe.yaml"
    recipe.write_bytes(content)
    out = run_home(tmp_path / "home", command, str(recipe))
    line = one_error_line(out, "my recipe.yaml")
    assert ("UTF-8" in line) if b"\xe9" in content else ("nested" in line)


@pytest.mark.parametrize("value", ["[" * 100_000, "[1, 2"])
def test_set_override_not_yaml_or_nested_too_deep_is_one_error_line(tmp_path, value):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {base: smollm2-135m-instruct}\ndata: {train: x.jsonl}\noutput: {name: x}\n")
    out = run_home(tmp_path / "home", "plan", str(recipe), "--set", f"lora.r={value}")
    line = one_error_line(out, "--set lora.r")
    assert ("nested" in line) if value.startswith("[[") else ("not valid YAML" in line)


@pytest.mark.parametrize(
    ("suffix", "content"),
    [
        (".jsonl", NOT_UTF8),
        (".jsonl", DEEP.encode()),
        (".json", NOT_UTF8),
        (".json", DEEP.encode()),
        (".json", b"[{"),
        (".csv", b"prompt,completion\ncaf\xe9,x\n"),
    ],
)
def test_training_data_not_utf8_or_nested_too_deep_is_a_data_error(tmp_path, suffix, content):
    """What `lora-kit train` reads as its data: a DataError (a LoraKitError, one CLI line) naming the file."""
    from lora_kit.errors import LoraKitError
    from lora_kit.training.data import load_records

    data = tmp_path / f"train set{suffix}"
    data.write_bytes(content)
    with pytest.raises(LoraKitError, match="train set"):
        load_records(str(data))


def tiny_adapter(directory):
    """A valid rank-2 LoRA on layers.0.self_attn.q_proj (in 8, out 8)."""
    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": np.ones((2, 8), np.float32),
        f"{prefix}.lora_B.weight": np.ones((8, 2), np.float32),
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.mark.parametrize(
    ("fname", "content"),
    [
        ("config.json", DEEP.encode()),
        ("config.json", b'{"model_type": "caf\xe9"}'),
        ("model.safetensors.index.json", DEEP.encode()),
        ("model.safetensors.index.json", b'{"weight_map": "\xff"}'),
    ],
)
def test_adapters_add_base_json_not_utf8_or_nested_too_deep_is_one_error_line(tmp_path, fname, content):
    """`adapters add --base DIR` reads the base's config.json and weight index: the user's files too."""
    adapter = tiny_adapter(tmp_path / "adapter")
    base = tmp_path / "my base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "mistral"}')
    (base / fname).write_bytes(content)
    out = run_home(tmp_path / "home", "adapters", "add", str(adapter), "--name", "deep", "--base", str(base))
    line = one_error_line(out, fname)
    assert ("UTF-8" in line) if b"\xe9" in content or b"\xff" in content else ("nested" in line)
