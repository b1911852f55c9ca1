"""Builders the tests share (no hub needed): the tiny random Mistral and its word-level tokenizer,
random PEFT adapters, engines over the tiny Mistral, and the HTTP tests' constants.

Test modules import these from here, never from each other. What the scripts also use (the tiny
Mistral, its tokenizer, random adapters) is defined once in ``scripts/_harness.py`` and taken
from there; the rest is the tests' own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _load_harness() -> Any:
    """``scripts/_harness.py`` as the module ``_harness``, loaded by path (scripts/ stays off sys.path)."""
    if "_harness" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_harness", ROOT / "scripts" / "_harness.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["_harness"] = module
        spec.loader.exec_module(module)
    return sys.modules["_harness"]


_harness = _load_harness()
SPECIALS = _harness.SPECIALS
make_tokenizer = _harness.make_tokenizer
make_tiny_mistral = _harness.make_tiny_mistral
make_sentiment_mistral = _harness.make_sentiment_mistral
random_adapter = _harness.random_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all linear


def make_adapter(base_dir: Path, out: Path, seed: int = 0, r: int = 4, **lora_kwargs) -> Path:
    """A real PEFT LoRA adapter on the tiny Mistral (all linear, alpha 8), A and B random (std 0.3),
    so it changes outputs."""
    return random_adapter(base_dir, out, seed=seed, rank=r, alpha=8, targets=TARGETS, std=0.3, **lora_kwargs)


# -- the engine tests: PEFT-initialised adapters and engines over the tiny Mistral ------------------

MISTRAL_ADAPTERS = {
    # name: (target modules, r, alpha, use_rslora)
    "all": (TARGETS, 4, 8, False),
    "qv": (["q_proj", "v_proj"], 8, 16, True),
    "mlp": (["down_proj", "o_proj"], 2, 4, False),
}


def make_peft_init_adapter(
    base_dir: Path, out: Path, targets: list[str], r: int, alpha: int, rslora: bool, seed: int
) -> Path:
    """Save a PEFT LoRA adapter with PEFT's own random A and B (``init_lora_weights=False``), scaled
    by 3 (B non-zero and big enough to flip greedy choices of the random base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(out)
    return out


def mistral_engine(tiny_mistral_dir, word_tokenizer, adapters, backend=None, **settings) -> Any:
    """An engine over a fresh tiny Mistral; ``settings`` are EngineConfig fields (weights in exact
    fp32 unless they say otherwise: these tests compare with PEFT token for token)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig, mapping_resolver

    settings.setdefault("weight_dtype", "float32")
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    return Engine(
        EngineConfig(model="tiny-mistral", **settings),
        model=model,
        tokenizer=word_tokenizer,
        adapter_resolver=mapping_resolver(adapters),
        backend=backend,
    )


def registry_engine(root: Path, names, tiny_mistral_dir, word_tokenizer, **settings) -> tuple[Any, Any]:
    """A registry under ``root`` holding one random adapter per name in ``names`` (seeds 1, 2, ...)
    and an engine (not started) over a fresh fp32 tiny Mistral resolving through it; ``settings``
    are EngineConfig fields."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_kit.engine import Engine, EngineConfig
    from lora_kit.registry import Registry

    reg = Registry(root / "registry")
    for seed, name in enumerate(names, start=1):
        reg.register(make_adapter(tiny_mistral_dir, root / name, seed=seed), name)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    config = EngineConfig(model="tiny-mistral", **settings)
    return reg, Engine(config, model=model, tokenizer=word_tokenizer, registry_root=reg.root)


def prompts(tok) -> list[list[int]]:
    from lora_kit import chat

    texts = ["What is two plus two ?", "hello world", "And three plus three ? Six .", "You are terse . Four"]
    return [chat.render_prompt(tok, t, raw=True) for t in texts]


def greedy(prompt: list[int], adapter: str | None, max_tokens: int = 12) -> Any:
    from lora_kit.engine import GenerationRequest, SamplingParams

    return GenerationRequest(prompt_ids=prompt, params=SamplingParams(max_tokens=max_tokens), adapter=adapter)


def run_together(eng, requests: list) -> list:
    """Submit all requests before the loop starts, so the first step batches them all."""
    eng.stop()
    seqs = [eng.submit(r) for r in requests]
    eng.start()
    return [eng.result(s) for s in seqs]


# -- the HTTP tests: the embedded model and its random adapters ---------------------------------------

MODEL = "smollm2-135m-instruct"
ACCOUNT = "acc"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/"


def make_embedded_adapter(out_dir: Path, seed: int) -> Path:
    """A rank-8 LoRA on q_proj/v_proj of the embedded model with random weights (lora_B non-zero), saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_kit import models

    base = models.load_model(MODEL)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # strong enough to change a greedy answer of the base
                param.normal_(0.0, 0.1)
    peft_model.save_pretrained(out_dir)
    return out_dir


def sse_payloads(text: str) -> list:
    from lora_kit.server.sse import parse

    return parse(text)


# -- the training tests: the smoke recipe on the tiny Mistral ---------------------------------------

SMOKE_RECIPE = str(ROOT / "recipes" / "tiny-mistral-smoke.yaml")


def smoke_recipe(base, run_dir, *overrides):
    """The smoke recipe on ``base``, with ``--set``-style overrides, running in ``run_dir``."""
    from lora_kit.training import recipe as recipe_mod

    r = recipe_mod.load(SMOKE_RECIPE, [f"model.base={base}", *overrides])
    r.output.run_dir = str(run_dir)
    return r


def cli_train(home, base, run_dir, *extra, env_extra=None, launcher=None):
    """`lora-kit train` of the smoke recipe in a subprocess (progress lines on stderr, the reference on stdout)."""
    env = {**os.environ, "LORA_KIT_HOME": str(home), **(env_extra or {})}
    cmd = launcher or [sys.executable, "-m", "lora_kit"]
    return subprocess.run(
        [*cmd, "train", SMOKE_RECIPE, "--set", f"model.base={base}", "--run-dir", str(run_dir), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def needs_compiler() -> Any:
    """A mark for the tests of the CPU BGMV kernel: skipped where no C++ compiler can build it,
    except under CI (``CI`` set), where ``.ci/run`` installs one: there a missing compiler fails
    the tests instead of leaving the engine's default kernel silently untested."""
    import shutil

    import pytest

    from lora_kit.engine.backends import bgmv

    compiler = bgmv.compiler()
    missing = compiler is None or shutil.which(compiler) is None
    return pytest.mark.skipif(
        missing and not os.environ.get("CI"),
        reason=f"no C++ compiler ({compiler or '$CXX, c++ or g++'}) to build the CPU BGMV kernel; the engine uses torch's bmm",
    )
