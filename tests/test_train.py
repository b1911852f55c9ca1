"""Training end to end on a tiny 4-bit Mistral: loss drops, registry lineage, every recipe field
used, resume after SIGKILL, DDP.

Tests call the trainer in-process; a subprocess runs only where the process itself is under
test: the CLI, a real SIGKILL mid-run and its resume, and DDP under torchrun.
"""

import json
import math
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import _harness, cli_train, losses, make_sentiment_mistral, make_tiny_mistral, smoke_recipe
from safetensors.torch import load_file

from lora_kit.training import recipe as recipe_mod
from lora_kit.training.trainer import Trainer, TrainError, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random Mistral whose word-level vocabulary covers the sentiment data."""
    return make_sentiment_mistral(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh LORA_KIT_HOME (registry, runs) for in-process runs; the recipe's data paths are relative to ROOT."""
    monkeypatch.setenv("LORA_KIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    return tmp_path / "home"


def test_train_registers_adapter_with_lineage_and_loss_drops(tmp_path, tiny_base, home):
    lines = []
    r = smoke_recipe(tiny_base, tmp_path / "run", "train.max_steps=12", "train.checkpoint_every=0")
    result = train(r, log=lines.append)
    assert result.ref == "tiny-smoke@1"
    text = "\n".join(lines)
    assert "train data audit: 200 examples, 200 kept" in text
    assert re.search(r"held-out exact match \(4 examples\): base [\d.]+% {2}-> {2}adapter [\d.]+%", text)
    curve = losses(tmp_path / "run")
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < 0.9 * sum(curve[:3]) / 3, curve
    run = tmp_path / "run"
    for name in (
        "loss_curve.png",
        "data_audit.json",
        "recipe.json",
        "lineage.json",
        "done.json",
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

    version = Registry(home / "registry").resolve("tiny-smoke")
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
    full = cli_train(tmp_path / "home", tiny_base, tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = cli_train(
        tmp_path / "home", tiny_base, tmp_path / "cut", *common, env_extra={"LORA_KIT_TEST_SIGKILL_AFTER_STEP": "5"}
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "adapter").exists()
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step-0000002",
        "step-0000004",
    ]

    resumed = cli_train(tmp_path / "home", tiny_base, tmp_path / "cut", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-0000004 (step 4)" in resumed.stderr  # progress lines are logged to stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(tmp_path / "cut" / "adapter")  # not registered
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """The tiny Mistral at hidden size 256: at LoRA rank 16 most of its LoRA tensors have the
    4,096 elements bitsandbytes needs to keep a tensor's optimizer state in 8 bits."""
    tok = _harness.make_tokenizer(_harness.sentiment_texts())
    return make_tiny_mistral(
        tmp_path_factory.mktemp("wide-base"), tok, hidden_size=256, intermediate_size=512, head_dim=64
    )


def test_8bit_optimizer_runs_on_cpu_and_resumes_after_sigkill(tmp_path, wide_base, home):
    """#27 item 1: paged_adamw_8bit was refused on the CPU, so its state (uint8 moments, absmax,
    one quantization map shared by every parameter) never went through a checkpoint. bitsandbytes
    runs it unpaged on the CPU: a SIGKILL and --resume must give the uninterrupted run's adapter."""
    from lora_kit.training import checkpoint

    overrides = ["output.register_adapter=false", "train.max_steps=4", "train.checkpoint_every=2"]
    overrides += ["train.optimizer=paged_adamw_8bit", "lora.r=16", "lora.alpha=16"]
    overrides += ["train.eval_every=0", "eval.max_examples=0"]
    common = [arg for o in overrides for arg in ("--set", o)]
    full = cli_train(home, wide_base, tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = cli_train(home, wide_base, tmp_path / "cut", *common, env_extra={"LORA_KIT_TEST_SIGKILL_AFTER_STEP": "3"})
    assert killed.returncode == -signal.SIGKILL

    # The checkpoint holds the 8-bit state: uint8 moments for every tensor of >= 4,096 elements.
    ckpt = tmp_path / "cut" / "checkpoints" / "step-0000002"
    state = checkpoint.load_state(ckpt, "optimizer")["state"]
    adapter = load_file(str(ckpt / "adapter.safetensors"))
    big = sum(t.numel() >= 4096 for t in adapter.values())
    assert len(state) == len(adapter) == 28 and 0 < big < 28  # k/v_proj's lora_B (128 x 16) stay fp32
    moments = [s["__bnb_optimizer_quant_state__"] for s in state.values()]  # bitsandbytes 0.50's layout
    quantized = [s for s in moments if s["state1"].dtype == torch.uint8]
    assert len(quantized) == big
    for s in quantized:
        assert s["state2"].dtype == torch.uint8 and s["qmap1"].dtype == torch.float32 and s["absmax1"].numel() > 0

    resumed = cli_train(home, wide_base, tmp_path / "cut", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-0000002 (step 2)" in resumed.stderr
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_fp16_compute_trains_with_autocast_and_loss_scaling(tmp_path, tiny_base, home):
    """#27 item 2: fp16 compute (T4/V100) trained with mixed precision "no": no autocast, no loss
    scaling. It is accelerate's fp16 now, with a GradScaler (on the CPU too, where accelerate sets
    none up but torch has both): an overflow skips the step, the schedule and the weights stay, the
    scale halves; the scale is checkpointed and resumed. The CUDA run is gpu-check's fp16 line."""
    from lora_kit.training.trainer import mixed_precision

    assert [mixed_precision(d) for d in (torch.float16, torch.bfloat16, torch.float32)] == ["fp16", "bf16", "no"]
    overrides = ["model.compute_dtype=float16", "train.max_steps=3", "train.warmup_steps=0", "eval.max_examples=0"]
    trainer = Trainer(smoke_recipe(tiny_base, tmp_path / "run", *overrides), log=lambda _msg: None)
    trainer.setup()
    acc = trainer.accelerator
    assert acc.mixed_precision == "fp16" and acc.scaler is not None and trainer.optimizer.scaler is acc.scaler
    with acc.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    trainer.model.train()
    trainer.tokens_seen, trainer.t_loop, trainer.peak_rss_mb = 0, 0.0, 0.0

    def scale(value):
        acc.scaler.load_state_dict(
            {"scale": value, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}
        )

    before, lr = [p.detach().clone() for p in trainer.params], trainer.scheduler.get_last_lr()
    scale(3e38)  # the scaled loss overflows: the step is skipped
    trainer._train_step(1)
    assert acc.optimizer_step_was_skipped and acc.scaler.get_scale() == pytest.approx(1.5e38)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params)) and trainer.scheduler.get_last_lr() == lr
    scale(1024.0)
    record = trainer._train_step(2)
    assert not acc.optimizer_step_was_skipped and math.isfinite(record["grad_norm"])
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.params)) and trainer.scheduler.get_last_lr() != lr
    assert {p.dtype for p in trainer.params} == {torch.float32}  # fp32 master weights, unscaled updates
    trainer._save_checkpoint(2)
    trainer.metrics_logger.close()

    resumed = Trainer(smoke_recipe(tiny_base, tmp_path / "run", *overrides), resume=True, log=lambda _msg: None)
    resumed.setup()
    resumed.metrics_logger.close()
    assert resumed.start_step == 2 and resumed.accelerator.scaler.get_scale() == 1024.0


def test_changed_recipe_refuses_to_resume(tmp_path, tiny_base, home):
    killed = cli_train(
        home,
        tiny_base,
        tmp_path / "run",
        "--set",
        "train.checkpoint_every=2",
        env_extra={"LORA_KIT_TEST_SIGKILL_AFTER_STEP": "2"},
    )
    assert killed.returncode == -signal.SIGKILL
    changed = smoke_recipe(tiny_base, tmp_path / "run", "train.checkpoint_every=2", "lora.r=8")
    with pytest.raises(TrainError, match="the recipe changed since the checkpoint"):
        train(changed, resume=True, log=lambda _msg: None)


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
    out = cli_train(tmp_path / "home", tiny_base, tmp_path / "run", "--set", "train.max_steps=4", launcher=torchrun)
    assert out.returncode == 0, out.stderr[-3000:]
    sums = dict(re.findall(r"\[rank (\d)\] adapter checksum ([0-9a-f]{64})", out.stderr))  # logged by every rank
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]
    # #27 item 4: every rank frees its training model and leaves the process group before rank 0's
    # task eval, instead of rank 1 waiting at a barrier (NCCL's timeout) while rank 0 loads the base.
    freed = re.findall(r"\[rank (\d)\] training model freed, process group left", out.stderr)
    assert sorted(freed) == ["0", "1"], out.stderr[-3000:]
    assert out.stderr.index("[rank 0] training model freed") < out.stderr.index("held-out exact match")
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


def test_lineage_is_the_same_whichever_way_an_adapter_enters(tmp_path, tiny_base, home):
    """Bug 1: `lora-kit train` recorded base_model as a plain string and its own fingerprint and
    chat-template hash; `adapters add` of the same directory recorded the registry's."""
    from lora_kit.registry import Registry, lineage

    r = smoke_recipe(tiny_base, tmp_path / "run", "train.max_steps=1", "train.eval_every=0", "eval.max_examples=0")
    result = train(r, log=lambda _msg: None)
    registry = Registry()
    trained = registry.resolve(result.ref).lineage
    added = registry.register(result.adapter_dir, "added").lineage  # what `lora-kit adapters add DIR` does

    assert isinstance(trained["base_model"], dict), trained["base_model"]
    assert set(trained["base_model"]) == {"spec", "local_dir", "fingerprint"}
    assert trained["base_model"] == added["base_model"]
    assert trained["chat_template_sha256"] == added["chat_template_sha256"]
    registry_keys = {k: v for k, v in trained.items() if k in added}
    assert registry_keys == added  # the training facts add keys, they never replace the registry's
    assert trained["recipe_hash"] == r.content_hash() and trained["run_dir"] == str(result.run_dir)
    # The run directory keeps the very record the registry stores.
    assert json.loads((result.run_dir / "lineage.json").read_text()) == trained
    # One fingerprint: the builder's, whichever way the adapter entered.
    assert trained["base_model"]["fingerprint"] == lineage.base_fingerprint(Path(tiny_base))


class _RecordingSection:
    """Wraps a recipe (section) and records the dotted path of every field the code reads.

    Methods (``content_hash``, ``to_dict``) run on the real object, so hashing or dumping the
    whole recipe does not count as reading its fields: only a use of the value does.
    """

    def __init__(self, section, path, reads):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name):
        from pydantic import BaseModel

        value = getattr(self._section, name)
        if name not in type(self._section).model_fields:
            return value
        if isinstance(value, BaseModel):
            return _RecordingSection(value, f"{self._path}{name}.", self._reads)
        self._reads.add(f"{self._path}{name}")
        return value


def _leaf_fields(cls, prefix=""):
    from pydantic import BaseModel

    leaves = set()
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            leaves |= _leaf_fields(ann, f"{prefix}{name}.")
        else:
            leaves.add(prefix + name)
    return leaves


def _records(fmt, n):
    """``n`` sentiment examples in the data format ``fmt``."""
    rows = [json.loads(line)["messages"] for line in (ROOT / "data/sentiment/train.jsonl").read_text().splitlines()]
    out = []
    for user, assistant in ((m[0]["content"], m[1]["content"]) for m in rows[:n]):
        if fmt == "messages":
            out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
        elif fmt == "prompt_completion":
            out.append({"prompt": user, "completion": assistant})
        else:
            out.append({"instruction": user, "input": "", "output": assistant, "system": "Be terse ."})
    return out


def test_every_recipe_field_is_read_by_the_training_code(tmp_path, tiny_base, home):
    """Bug 2: `model.attn_implementation` was validated and set, and nothing read it.

    Runs the trainer on recipes whose every field is recorded when read; the runs together
    take each branch a field is read on (each data format, an eval split, epochs rather than
    max_steps, registration). A field no run reads does nothing: wire it through or remove it.
    """
    reads: set[str] = set()
    runs = {
        # One epoch (no max_steps) of a split file, with eval, exact match and registration.
        "messages": ["train.max_steps=null", "data.eval=null", "data.eval_split=0.25", "eval.max_examples=2"],
        "prompt_completion": ["train.max_steps=1", "data.eval=null", "output.register_adapter=false"],
        "alpaca": ["train.max_steps=1", "data.eval=null", "output.register_adapter=false"],
    }
    for fmt, overrides in runs.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _records(fmt, 16)))
        r = smoke_recipe(
            tiny_base, tmp_path / fmt, f"data.format={fmt}", f"data.train={path}", "eval.max_new_tokens=2", *overrides
        )
        train(_RecordingSection(r, "", reads), log=lambda _msg: None)
    assert sorted(_leaf_fields(recipe_mod.Recipe) - reads) == []


def test_attn_implementation_reaches_the_model(tmp_path, tiny_base, home):
    """Bug 2's wiring: the recipe's attention kernel is the one the loaded model runs."""
    trainer = Trainer(
        smoke_recipe(tiny_base, tmp_path / "run", "model.attn_implementation=eager"), log=lambda _msg: None
    )
    trainer.setup()
    trainer.metrics_logger.close()
    assert trainer.peft_model.get_base_model().config._attn_implementation == "eager"
