"""Issue 23: Mistral-7B's code paths at its true width, in every ``make test``.

A random ``mistral-7b-2layers`` checkpoint (scripts/make_random_model.py: v0.1's config exactly,
hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 32000, but 2 layers; bf16 shards,
v0.1's own tokenizer) goes through what a 7B user runs: the production recipe (NF4, r=16 on all
linear layers, gradient checkpointing, ``adamw``) trained 2 steps with a SIGKILL after step 1
and ``--resume``, its end-of-run evaluation and registration; the engine serving that adapter and
a random rank-16 one in one batch (the kernel at width 14336); ``adapters merge`` and a load of
the merged model; ``adapters export --target gguf``. About 3 minutes on 2 cores; 1.4 GB of disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, greedy, run_together

from lora_kit.evaluation.runner import serving_precision

RECIPE = ROOT / "recipes" / "mistral-7b-instruct-v0.1-qlora.yaml"
OVERRIDES = [
    "data.max_seq_len=128",
    "train.micro_batch_size=1",
    "train.gradient_accumulation_steps=1",
    "train.optimizer=adamw",
    "train.max_steps=2",
    "train.checkpoint_every=1",
    "train.log_every=1",
    "train.eval_every=1000",
    "eval.max_examples=2",
    "eval.max_new_tokens=2",
]


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def lora_kit(home: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORA_KIT_HOME": str(home), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "lora_kit", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The 2-layer true-width checkpoint and a run of the production recipe on it: SIGKILLed after
    step 1, resumed to step 2 (which evaluates and registers the adapter)."""
    root = tmp_path_factory.mktemp("true-width")
    base, home, run_dir = root / "mistral-7b-2layers", root / "home", root / "run"
    made = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_random_model.py"), "--shape", "mistral-7b-2layers", str(base)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    sets = [arg for o in [f"model.base={base}", *OVERRIDES] for arg in ("--set", o)]
    train = ["train", RECIPE, *sets, "--name", "wide", "--run-dir", run_dir]
    killed = lora_kit(home, *train, env_extra={"LORA_KIT_TEST_SIGKILL_AFTER_STEP": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = lora_kit(home, *train, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    yield {"base": base, "home": home, "run": run_dir, "resumed": resumed, "root": root}
    shutil.rmtree(root, ignore_errors=True)  # 1.4 GB of checkpoint, and the run's


def test_the_production_recipe_trains_resumes_evaluates_and_registers_at_true_width(world):
    rows = [json.loads(line) for line in (world["run"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps][-2:] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert "resum" in world["resumed"].stderr.lower()  # it went on from the step-1 checkpoint
    assert world["resumed"].stdout.strip().splitlines()[-1] == "wide@1"
    evaluated = json.loads((world["run"] / "task_eval.json").read_text())
    # As served (what `serve` picks on this CPU for a 0.7B: fp32, or bf16w where the CPU multiplies
    # bf16 natively) and as trained.
    assert set(evaluated) == {serving_precision(str(world["base"])), "nf4"}
    assert all(report["n"] == 2 and report["results"] for report in evaluated.values())


def test_the_engine_serves_the_trained_and_a_rank_16_adapter_in_one_batch(world, tmp_path):
    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.registry import Registry

    bench = _script("bench_true_size")
    reg = Registry(world["home"] / "registry")
    reg.register(bench.write_random_adapter(world["base"], tmp_path / "r16", seed=1, rank=16, std=0.05), "r16")
    engine = Engine(EngineConfig(model=str(world["base"]), max_slots=2), registry_root=reg.root)
    prompt = engine.tokenizer.encode("[INST] Say something [/INST]")
    requests = [greedy(prompt, adapter, max_tokens=2) for adapter in (None, "wide", "r16")]
    for i, request in enumerate(requests):
        request.request_id = f"r{i}"
    with engine.recording_logits() as seen:
        done = run_together(engine, requests)
    engine.stop()
    assert all(len(out.token_ids) == 2 for out in done)
    base, trained, random16 = (torch.stack(seen[f"r{i}"]) for i in range(3))
    assert all(torch.isfinite(t).all() for t in (base, trained, random16))
    assert (random16 - base).abs().max() > 1e-3  # the rank-16 adapter at width 14336 changed the logits


def test_merge_loads_and_gguf_exports_at_true_width(world, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    out = lora_kit(world["home"], "adapters", "merge", "wide@1", merged, "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    assert model.config.hidden_size == 4096 and model.config.intermediate_size == 14336
    with torch.no_grad():
        logits = model(torch.tensor([[1, 733, 16289, 28793]])).logits
    assert logits.shape == (1, 4, 32000) and torch.isfinite(logits).all()
    del model
    gguf = tmp_path / "wide.gguf"
    exported = lora_kit(world["home"], "adapters", "export", "wide@1", gguf, "--target", "gguf")
    assert exported.returncode == 0, exported.stderr[-2000:]
    lora_params = 2 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # 2 layers, r=16
    assert gguf.read_bytes()[:4] == b"GGUF" and gguf.stat().st_size > lora_params * 2
