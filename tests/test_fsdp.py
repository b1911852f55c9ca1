"""FSDP2-sharded QLoRA on the CPU: 2 processes (torchrun, accelerate launch) + gloo, the tiny random
Mistral in NF4; and `lora-kit plan`'s per-rank memory.

The runs share one module-scope fixture (each launch costs ~20-40 s on 2 cores):
ddp and fsdp with the same global batch and seed, an uninterrupted fsdp run with a checkpoint,
and an fsdp run killed by SIGKILL after step 3 and resumed from its step-2 checkpoint.
Compute is fp32 on the CPU, so the fsdp and ddp numbers are compared at 1e-6 (reduce-scatter
and all-reduce sum the same two values; measured: bit-identical).
"""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import SMOKE_RECIPE, cli_train, losses, make_sentiment_mistral, smoke_recipe
from safetensors.torch import load_file

from lora_kit.training.checkpoint import check_resume_layout
from lora_kit.training.trainer import Trainer, TrainError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random Mistral whose word-level vocabulary covers the sentiment data."""
    return make_sentiment_mistral(tmp_path_factory.mktemp("tiny-base"))


TOL = 1e-6
# 4 steps of 2 micro-batches (gradient accumulation: FSDP2's no-sync path), a checkpoint and an eval loss at step 2.
COMMON = ("--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=2")
COMMON += ("--set", "eval.max_examples=0")
# No LoRA dropout: ddp runs the trainer's fast LoRA forward (its own 16-bit dropout masks) and fsdp
# PEFT's (FSDP2 gathers the LoRA weights around each layer), so with dropout their random draws
# differ; without it both compute the same products and the comparison is about the sharding.
COMMON += ("--set", "lora.dropout=0")


def eval_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def torchrun(port: int) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    return [*launch, "-m", "lora_kit"]


def accelerate_launch(port: int) -> list[str]:
    """The shipped N-GPU config: it only launches processes (on a machine without GPUs they run on the CPU)."""
    config = str(ROOT / "recipes" / "accelerate" / "fsdp-2gpu.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    return [*launch, "--main_process_port", str(port), "-m", "lora_kit"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base):
    """The four runs: ddp, fsdp (launched by accelerate, registered, task eval through the serving engine),
    fsdp killed after step 3 and fsdp resumed (torchrun)."""
    root = tmp_path_factory.mktemp("fsdp")
    home = root / "home"
    no_register = ("--set", "output.register_adapter=false")
    fsdp = ("--set", "train.distributed=fsdp")
    out = {"root": root, "home": home, "base": tiny_base}
    out["ddp"] = cli_train(home, tiny_base, root / "ddp", *COMMON, *no_register, launcher=torchrun(29611))
    out["fsdp"] = cli_train(
        home,
        tiny_base,
        root / "fsdp",
        *COMMON,
        *fsdp,
        "--set",
        "eval.max_examples=2",
        launcher=accelerate_launch(29612),
    )
    kill = {"LORA_KIT_TEST_SIGKILL_AFTER_STEP": "3"}
    out["cut"] = cli_train(
        home, tiny_base, root / "cut", *COMMON, *fsdp, *no_register, env_extra=kill, launcher=torchrun(29613)
    )
    out["cut_checkpoints"] = sorted(p.name for p in (root / "cut" / "checkpoints").iterdir())
    out["cut_had_adapter"] = (root / "cut" / "adapter").exists()
    # The resume removes its checkpoints when it finishes: keep the real sharded one for the layout test.
    shutil.copytree(root / "cut" / "checkpoints" / "step-0000002", root / "cut-step-2")
    out["resumed"] = cli_train(
        home, tiny_base, root / "cut", *COMMON, *fsdp, *no_register, "--resume", launcher=torchrun(29614)
    )
    return out


def test_each_rank_holds_half_of_the_4bit_base_and_of_the_lora_parameters(runs):
    assert runs["fsdp"].returncode == 0, runs["fsdp"].stderr[-3000:]
    shards = re.findall(
        r"\[rank (\d)\] fsdp shard: (\d+) of (\d+) 4-bit base bytes, (\d+) of (\d+) LoRA parameters",
        runs["fsdp"].stderr,
    )
    assert sorted(s[0] for s in shards) == ["0", "1"]
    # The tiny Mistral: 2 layers x (64x64 q, o + 64x32 k, v + 3 x 64x128 MLP) = 36,864 weights,
    # 4 bits each = 18,432 bytes per layer; r=4 LoRA on all 7 projections = 8,192 parameters.
    for _, base_local, base_total, lora_local, lora_total in shards:
        assert (int(base_total), int(lora_total)) == (2 * 18_432, 8_192)
        assert (int(base_local), int(lora_local)) == (18_432, 4_096)


def test_fsdp_losses_and_adapter_equal_ddp(runs):
    assert runs["ddp"].returncode == 0, runs["ddp"].stderr[-3000:]
    assert runs["fsdp"].returncode == 0, runs["fsdp"].stderr[-3000:]
    root = runs["root"]
    ddp_losses, fsdp_losses = losses(root / "ddp"), losses(root / "fsdp")
    assert len(fsdp_losses) == 4 and fsdp_losses == pytest.approx(ddp_losses, abs=TOL)
    assert len(eval_losses(root / "fsdp")) == 2  # at step 2 (mid-run, sharded forward) and at the end
    assert eval_losses(root / "fsdp") == pytest.approx(eval_losses(root / "ddp"), abs=TOL)
    a = load_file(str(root / "ddp" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(root / "fsdp" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28
    for key in a:
        assert a[key].shape == b[key].shape and (a[key] - b[key]).abs().max().item() <= TOL, key
    sums = dict(re.findall(r"\[rank (\d)\] adapter checksum ([0-9a-f]{64})", runs["fsdp"].stderr))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]  # both ranks gathered the same weights


def test_fsdp_adapter_is_registered_like_a_single_process_one_and_loads_in_peft(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_kit.adapters import validation
    from lora_kit.registry import Registry

    fsdp = runs["fsdp"]
    assert fsdp.stdout.strip().splitlines()[-1] == "tiny-smoke@1" and fsdp.stdout.count("tiny-smoke@") == 1
    assert re.search(r"held-out exact match \(2 examples\): base [\d.]+% {2}-> {2}adapter", fsdp.stderr)
    adapter_dir = runs["root"] / "fsdp" / "adapter"
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
    ]
    info = validation.validate_adapter_dir(adapter_dir, Path(runs["base"]))
    assert info.rank == 4
    version = Registry(runs["home"] / "registry").resolve("tiny-smoke@1")
    assert version.lineage["distributed"] == {"strategy": "fsdp", "world_size": 2}
    assert list((runs["root"] / "fsdp" / "checkpoints").glob("step-*")) == []  # dropped once registered
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), str(adapter_dir))
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    weight = model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    assert torch.equal(weight, saved["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"])
    assert weight.abs().max().item() > 0  # trained: lora_B starts at zero


def test_sigkill_then_resume_equals_the_uninterrupted_fsdp_run(runs):
    assert runs["cut"].returncode != 0 and re.search(r"exitcode\s*:\s*-9", runs["cut"].stderr)  # SIGKILLed ranks
    assert not runs["cut_had_adapter"]
    assert runs["cut_checkpoints"] == ["step-0000002"]  # the sharded checkpoint, nothing half-written
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-0000002 (step 2)" in resumed.stderr
    root = runs["root"]
    a = load_file(str(root / "fsdp" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(root / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= TOL, key
    assert losses(root / "cut") == pytest.approx(losses(root / "fsdp"), abs=TOL)
    assert eval_losses(root / "cut") == pytest.approx(eval_losses(root / "fsdp"), abs=TOL)


def test_resuming_fsdp_shards_on_another_world_size_or_strategy_is_refused(runs):
    ckpt = runs["root"] / "cut-step-2"  # the killed run's real sharded checkpoint: one directory per rank
    assert sorted(p.name for p in ckpt.iterdir()) == ["complete.json", "rank-00000", "rank-00001", "scheduler.json"]
    check_resume_layout(ckpt, "fsdp", 2)  # the same layout resumes (as the resumed run did)
    with pytest.raises(TrainError, match="holds FSDP shards of 2 processes, this run has 4: resume with 2"):
        check_resume_layout(ckpt, "fsdp", 4)
    with pytest.raises(TrainError, match="written by a fsdp run, this run is ddp: resume with train.distributed: fsdp"):
        check_resume_layout(ckpt, "ddp", 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.optimizer=paged_adamw_8bit"],
            "fsdp cannot shard or checkpoint paged_adamw_8bit.*set train.optimizer: adamw",
        ),
        (["model.compute_dtype=float16"], "fsdp does not scale fp16 losses.*bfloat16"),
        ([], "fsdp needs more than one process: launch with `torchrun --nproc_per_node N"),
    ],
)
def test_impossible_fsdp_requests_fail_before_the_model_loads(tmp_path, tiny_base, monkeypatch, overrides, message):
    monkeypatch.setenv("LORA_KIT_HOME", str(tmp_path / "home"))
    recipe = smoke_recipe(tiny_base, tmp_path / "run", "train.distributed=fsdp", *overrides)
    trainer = Trainer(recipe, log=lambda _msg: None)
    with pytest.raises(TrainError, match=message):
        trainer.setup()
    assert not hasattr(trainer, "model") and not (tmp_path / "run").exists()


def test_plan_per_rank_memory_of_mistral_7b_under_fsdp_and_ddp():
    from lora_kit.training import plan, recipe

    r = recipe.load(ROOT / "recipes" / "mistral-7b-instruct-v0.1-qlora.yaml", ["train.optimizer=adamw"])
    shape = plan.model_shape("mistralai/Mistral-7B-Instruct-v0.1")

    def terms(strategy, world):
        est = plan.estimate(
            r, shape, seq_len=2048, cuda=True, supervised_share=0.25, strategy=strategy, world_size=world
        )
        return {name: b for name, b, _ in est}

    linear, lora, root = 6_979_321_856, 41_943_040, 2 * 32000 * 4096 + 4096
    ddp, fsdp2, fsdp4 = terms("ddp", 2), terms("fsdp", 2), terms("fsdp", 4)
    assert ddp["4-bit linear weights"] == linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8  # a full replica per rank
    assert ddp["optimizer states"] == lora * 8 and ddp["DDP gradient buckets (fp32)"] == lora * 4
    for world, t in ((2, fsdp2), (4, fsdp4)):
        assert t["4-bit linear weights (1/N)"] == linear / 2 / world
        assert t["4-bit block constants (replicated)"] == linear * (8 / 64 + 32 / (64 * 256)) / 8
        assert t["embeddings, lm_head (root unit, gathered)"] == root * 4
        assert t["LoRA weights + grads (fp32, 1/N)"] == lora * 8 / world
        assert t["optimizer states (1/N)"] == lora * 8 / world
        layer = linear / 32 / 2 + (lora / 32 + 2 * 4096) * 4  # one decoder layer, gathered
        assert t["2 decoder layers gathered"] == 2 * layer * (world - 1) / world
    for name in ("checkpointed layer inputs", "one layer recomputed for backward", "logits + loss (fp32)"):
        assert ddp[name] == fsdp2[name] == fsdp4[name]  # each rank still runs its own micro-batch
    assert sum(fsdp4.values()) < sum(fsdp2.values()) < sum(ddp.values())


def test_plan_cli_prints_per_rank_memory_and_refuses_fsdp_on_one_process(tmp_path, tiny_base, capsys):
    from lora_kit.cli import main

    recipe_args = ["plan", SMOKE_RECIPE, "--set", f"model.base={tiny_base}", "--device", "cuda"]
    assert main([*recipe_args, "--strategy", "fsdp", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "fsdp over 2 processes (memory per rank)" in out and "4-bit linear weights (1/N)" in out
    assert re.search(r"per rank at 2 processes: ddp [\d.]+ GiB, fsdp [\d.]+ GiB", out)
    assert main([*recipe_args, "--strategy", "fsdp"]) == 2
    assert "fsdp shards across processes: plan it with --world-size 2 or more" in capsys.readouterr().err


def test_a_launch_with_accelerates_own_fsdp_is_refused(tmp_path, tiny_base, monkeypatch):
    """What `accelerate launch` sets for a config with distributed_type: FSDP, which lora-kit does not use."""
    monkeypatch.setenv("LORA_KIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    trainer = Trainer(smoke_recipe(tiny_base, tmp_path / "run", "train.distributed=fsdp"), log=lambda _msg: None)
    with pytest.raises(
        TrainError, match="launch with recipes/accelerate/fsdp-2gpu.yaml .* set train.distributed: fsdp"
    ):
        trainer.setup()
