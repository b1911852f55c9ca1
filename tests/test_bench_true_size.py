"""scripts/bench_true_size.py: its pure helpers, its process measurement and its --dry-run (seconds;
the benchmark itself runs by hand, never here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_true_size.py"


def _load():
    if "bench_true_size" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_true_size", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_true_size"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_true_size"]


bts = _load()


def test_checkpoint_bytes_is_mistral_7b_in_bf16():
    # Mistral-7B-v0.1 has 7,241,732,096 parameters; the 2-layer shape keeps the embeddings and head
    assert bts.checkpoint_bytes(bts.mrm.shape_config("mistral-7b")) == 2 * 7_241_732_096
    per_layer = (7_241_732_096 - 2 * 32000 * 4096 - 4096) // 32
    assert bts.checkpoint_bytes(bts.mrm.shape_config("mistral-7b-2layers")) == 2 * (
        2 * 32000 * 4096 + 4096 + 2 * per_layer
    )


def test_meminfo_and_shortage():
    text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12345678 kB\n"
    assert bts.meminfo_available(text) == 12345678 * 1024
    with pytest.raises(ValueError):
        bts.meminfo_available("MemTotal: 1 kB\n")
    model = bts.checkpoint_bytes(bts.mrm.shape_config("mistral-7b"))
    disk, mem = bts.step_needs("make", model)
    assert 14.5e9 < disk < 15.5e9 and mem == 2 * bts.GiB
    assert bts.step_needs("train", model, planned=7 * bts.GiB, precision="nf4")[1] == 7 * bts.GiB
    assert model < bts.step_needs("serve", model)[1] < 1.2 * model  # bf16 weights (bf16w) and a margin
    fp32 = bts.step_needs("serve", model, precision="fp32")[1]
    assert 2 * model < fp32 < 2.4 * model > 24 * bts.GiB  # a 7B base at fp32 cannot fit 24 GiB
    assert bts.step_needs("eval", model, precision="nf4")[1] < model / 2
    # training also loads the base for its end-of-run eval, at serving precision
    assert bts.step_needs("train", model, planned=7 * bts.GiB, precision="fp32")[1] == fp32
    assert bts.flag_precision("serve", "--weight-dtype bfloat16 --threads 2", "fp32") == "bf16w"
    assert bts.flag_precision("serve", "--quantization=nf4", "fp32") == "nf4"
    assert bts.flag_precision("serve", "--weight-dtype auto", "fp32") == "fp32"
    assert bts.flag_precision("eval", "--precision bf16w", "fp32") == "bf16w"
    assert bts.flag_precision("eval", "--weight-dtype bfloat16", "fp32") == "fp32"  # not an eval flag
    where = Path("/data")
    assert bts.shortage("make", (disk, mem), (disk, mem), where) is None
    short = bts.shortage("make", (disk, mem), (10 * 10**9, mem), where)
    assert short is not None and "GB free disk in /data (has 10.0 GB)" in short and "memory" not in short
    both = bts.shortage("serve", (0, 16 * bts.GiB), (0, 8 * bts.GiB), where)
    assert both == "serve needs 16.0 GiB available memory (has 8.0 GiB)"


def test_overrides_make_a_valid_three_step_recipe(tmp_path):
    from lora_kit.training.recipe import load

    train, evaluation = bts.write_data(tmp_path)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == bts.TRAIN_EXAMPLES and len(evaluation.read_text().splitlines()) == bts.EVAL_EXAMPLES
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    assert 140 < len(rows[0]["messages"][0]["content"].split()) < 200  # ~200 tokens: rows of 256 pack
    args = bts.recipe_overrides(tmp_path / "model", train, evaluation)
    assert args[::2] == ["--set"] * (len(args) // 2)
    recipe = load(bts.RECIPE, args[1::2])
    assert recipe.model.base == str(tmp_path / "model") and recipe.model.quantization == "nf4"
    assert (recipe.lora.r, recipe.lora.target_modules) == (16, "all-linear")
    assert (recipe.data.max_seq_len, recipe.train.micro_batch_size, recipe.train.gradient_accumulation_steps) == (
        256,
        1,
        1,
    )
    assert recipe.train.optimizer == "adamw" and recipe.train.gradient_checkpointing
    assert (recipe.train.max_steps, recipe.train.checkpoint_every) == (3, 1)
    assert (recipe.eval.max_examples, recipe.eval.max_new_tokens) == (4, 8)


def test_adapter_shapes_follow_peft_layout():
    config = bts.mrm.shape_config("mistral-tiny")  # hidden 64, intermediate 128, 4 heads, 2 KV heads
    shapes = bts.adapter_shapes(config, 16)
    assert len(shapes) == 2 * 7 * config["num_hidden_layers"]
    layer = "base_model.model.model.layers.1"
    assert shapes[f"{layer}.self_attn.q_proj.lora_A.weight"] == (16, 64)
    assert shapes[f"{layer}.self_attn.k_proj.lora_B.weight"] == (32, 16)  # 2 KV heads x head_dim 16
    assert shapes[f"{layer}.mlp.down_proj.lora_A.weight"] == (16, 128)
    assert shapes[f"{layer}.mlp.up_proj.lora_B.weight"] == (128, 16)
    big = bts.adapter_shapes(bts.mrm.shape_config("mistral-7b"), 16)
    assert sum(a * b for a, b in big.values()) == 32 * 16 * 81920  # 41.9M parameters at r=16


def test_registered_ref_table_and_last_line(tmp_path):
    assert bts.registered_ref("loading\nheld-out exact match\nbench-true-size@3\n") == "bench-true-size@3"
    assert bts.registered_ref("no ref here\n") is None
    rows = [bts.Row("plan", "lora-kit plan", "ok", 2048.0, 5.0), bts.Row("eval", "-", "failed (exit 1): a | b")]
    lines = bts.table(rows)
    assert lines[2] == "| plan | lora-kit plan | 2.00 GiB | 5.00 s | ok |  |"
    assert lines[3] == "| eval | - | - | - | failed (exit 1): a / b |  |"
    log = tmp_path / "x.log"
    log.write_text("Traceback\n  ...\nValueError: boom\n\n")
    assert bts.last_line(tmp_path / "missing", log) == "ValueError: boom"


def test_run_measured_peak_and_kill(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    big = "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    m = bts.run_measured([sys.executable, "-c", big], tmp_path / "big", env, 30)
    assert m.code == 0 and not m.killed and m.failure() is None
    assert m.peak_mib > 200
    flag = tmp_path / "flag"
    slow = f"import pathlib, time; pathlib.Path({str(flag)!r}).touch(); time.sleep(60)"
    m = bts.run_measured(
        [sys.executable, "-c", slow], tmp_path / "slow", env, 30, kill_when=flag.exists, watch={"f": flag}
    )
    assert m.killed and m.code == -9 and m.failure() is None and m.seconds < 20 and "f" in m.events
    m = bts.run_measured([sys.executable, "-c", "import sys; print('bad input', file=sys.stderr); sys.exit(3)"],
                         tmp_path / "fail", env, 30)  # fmt: skip
    assert m.failure() == "failed (exit 3): bad input"


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    work = tmp_path / "work"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--llama", "--work-dir", str(work), "--tokens", "4"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    text = out.stdout
    assert "make_random_model.py --shape mistral-7b" in text
    assert "lora_kit plan" in text and "--set train.max_steps=3" in text and "--json --device cpu" in text
    train = [ln for ln in text.splitlines() if " lora_kit train " in ln]
    assert len(train) == 2 and train[1].endswith("--resume") and not train[0].endswith("--resume")
    assert "step-0000002/complete.json" in text
    assert text.count("lora_kit adapters add") == 8 and f"{work}/run/adapter --name a7" in text
    assert "lora_kit serve --model" in text and "--preload a0 a1 a2 a3 a4 a5 a6 a7" in text
    assert "--outtype q8_0" in text and text.count("convert_lora_to_gguf.py --outtype f16") == 8
    assert "llama-quantize --allow-requantize" in text and "base-q4_0.gguf Q4_0" in text
    assert "lora_kit adapters merge" in text and "--target gguf" in text
    assert all(f"LORA_KIT_HOME={work}/home" in ln for ln in text.splitlines() if " -m lora_kit " in ln)
    assert not work.exists()  # nothing ran
    skip = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--steps", "serve", "--model-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "make_random_model" not in skip.stdout and " train " not in skip.stdout
    assert "adapters/a7 --name a7" in skip.stdout  # no training: a random 8th adapter


def test_random_adapter_is_a_valid_peft_adapter_of_the_checkpoint(tmp_path):
    from lora_kit.adapters.validation import validate_adapter_dir

    base = bts.mrm.make("mistral-tiny", tmp_path / "base", config_only=True)
    bts.mrm.write_weights(base, bts.mrm.shape_config("mistral-tiny"), seed=0)  # no tokenizer: not needed here
    adapter = bts.write_random_adapter(base, tmp_path / "a0", seed=0)
    info = validate_adapter_dir(adapter, base)  # against the checkpoint's own tensor shapes
    assert info.rank == 16 and info.alpha == 32
    assert info.target_modules == sorted(bts.harness.linear_targets())
    assert len(info.modules) == 7 * 2
    again = bts.write_random_adapter(base, tmp_path / "again", seed=0)
    other = bts.write_random_adapter(base, tmp_path / "other", seed=1)
    data = (adapter / "adapter_model.safetensors").read_bytes()
    assert (again / "adapter_model.safetensors").read_bytes() == data  # seeded
    assert (other / "adapter_model.safetensors").read_bytes() != data


def test_llama_server_gets_v01s_template_only_where_the_checkpoint_has_none(tmp_path):
    """A random checkpoint has no chat template (lora-kit renders v0.1 itself): llama-server is
    given v0.1's, so both servers see the same prompt; a checkpoint with its own keeps it."""
    bare, templated, work = tmp_path / "bare", tmp_path / "templated", tmp_path / "work"
    for d in (bare, templated, work):
        d.mkdir()
    (bare / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    (templated / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert bts.chat_template_flags(templated, work) == []
    flags = bts.chat_template_flags(bare, work)
    assert flags == ["--chat-template-file", str(work / "mistral-v0.1.jinja")]
    from jinja2 import Template

    text = Template(Path(flags[1]).read_text()).render(
        bos_token="<s>", eos_token="</s>", messages=[{"role": "user", "content": "Hi?"}]
    )
    assert text == "<s>[INST] Hi? [/INST]"
    assert bts.chat_template_flags(bare, tmp_path / "absent", write=False)[1].endswith("mistral-v0.1.jinja")
