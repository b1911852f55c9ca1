"""The `lora-kit` command through a subprocess."""

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
