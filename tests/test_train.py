"""Training end to end on a tiny 4-bit Mistral: loss drops, registry lineage, resume after SIGKILL, DDP."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "tiny-mistral-smoke.yaml")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random Mistral whose word-level vocabulary covers the sentiment data."""
    from helpers import make_tiny_mistral, make_tokenizer

    texts = [
        m["content"]
        for f in ("train", "eval")
        for line in (ROOT / "data" / "sentiment" / f"{f}.jsonl").read_text().splitlines()
        for m in json.loads(line)["messages"]
    ]
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny-base"), make_tokenizer(texts))


def train(home, base, run_dir, *extra, env_extra=None, launcher=None):
    env = {**os.environ, "LORA_KIT_HOME": str(home), **(env_extra or {})}
    cmd = launcher or [sys.executable, "-m", "lora_kit"]
    return subprocess.run(
        [*cmd, "train", RECIPE, "--set", f"model.base={base}", "--run-dir", str(run_dir), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_train_registers_adapter_with_lineage_and_loss_drops(tmp_path, tiny_base):
    out = train(
        tmp_path / "home",
        tiny_base,
        tmp_path / "run",
        "--set",
        "train.max_steps=12",
        "--set",
        "train.checkpoint_every=0",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "tiny-smoke@1"
    assert "train data audit: 200 examples, 200 kept" in out.stdout
    assert re.search(r"held-out exact match \(4 examples\): base [\d.]+% {2}-> {2}adapter [\d.]+%", out.stdout)
    curve = losses(tmp_path / "run")
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < 0.9 * sum(curve[:3]) / 3, curve
    run = tmp_path / "run"
    for name in (
        "loss_curve.png",
        "data_audit.json",
        "recipe.json",
        "lineage.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/chat_template.jinja",
    ):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base) and config["r"] == 4
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    from lora_kit.registry import Registry

    version = Registry(tmp_path / "home" / "registry").resolve("tiny-smoke")
    assert version.ref == "tiny-smoke@1" and version.rank == 4
    lineage = version.lineage
    recipe_json = json.loads((run / "recipe.json").read_text())
    assert lineage["recipe_hash"] == recipe_json["hash"]
    assert lineage["recipe"]["train"]["max_steps"] == 12
    assert len(lineage["dataset_fingerprint"]) == 64 and len(lineage["chat_template_sha256"]) == 64
    assert lineage["metrics"]["train_loss"] == pytest.approx(curve[-1], abs=1e-5)
    assert "eval_loss" in lineage["metrics"] and "base_exact_match" in lineage["metrics"]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tiny_base):
    common = (
        "--set",
        "output.register_adapter=false",
        "--set",
        "train.max_steps=8",
        "--set",
        "train.checkpoint_every=2",
    )
    full = train(tmp_path / "home", tiny_base, tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = train(
        tmp_path / "home", tiny_base, tmp_path / "cut", *common, env_extra={"LORA_KIT_TEST_SIGKILL_AFTER_STEP": "5"}
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "adapter").exists()
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step-0000002",
        "step-0000004",
    ]

    resumed = train(tmp_path / "home", tiny_base, tmp_path / "cut", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-0000004 (step 4)" in resumed.stdout
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_changed_recipe_refuses_to_resume(tmp_path, tiny_base):
    killed = train(
        tmp_path / "home",
        tiny_base,
        tmp_path / "run",
        "--set",
        "train.checkpoint_every=2",
        env_extra={"LORA_KIT_TEST_SIGKILL_AFTER_STEP": "2"},
    )
    assert killed.returncode == -signal.SIGKILL
    changed = train(
        tmp_path / "home",
        tiny_base,
        tmp_path / "run",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "lora.r=8",
        "--resume",
    )
    assert changed.returncode == 2
    assert "the recipe changed since the checkpoint" in changed.stderr


def test_two_process_ddp_keeps_ranks_in_sync_and_rank0_writes(tmp_path, tiny_base):
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "lora_kit",
    ]
    out = train(tmp_path / "home", tiny_base, tmp_path / "run", "--set", "train.max_steps=4", launcher=torchrun)
    assert out.returncode == 0, out.stderr[-3000:]
    sums = dict(re.findall(r"\[rank (\d)\] adapter checksum ([0-9a-f]{64})", out.stdout))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]
    assert out.stdout.strip().splitlines()[-1] == "tiny-smoke@1"
    assert out.stdout.count("tiny-smoke@") == 1  # rank 1 printed no reference
    steps = [
        json.loads(line).get("step")
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == [1, 2, 3, 4]  # one writer: each step logged once
    from lora_kit.registry import Registry

    assert [v.ref for v in Registry(tmp_path / "home" / "registry").list()] == ["tiny-smoke@1"]
