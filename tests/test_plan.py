"""`lora-kit plan`: exact memory terms for Mistral-7B, token counts for the demo recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

from lora_kit.training import plan, recipe

ROOT = Path(__file__).resolve().parent.parent


def test_mistral_7b_terms_are_exact():
    r = recipe.load(ROOT / "recipes" / "mistral-7b-instruct-v0.1-qlora.yaml")
    shape = plan.model_shape("mistralai/Mistral-7B-Instruct-v0.1")
    terms = {name: b for name, b, _ in plan.estimate(r, shape, seq_len=2048, cuda=True, supervised_share=0.25)}
    linear = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    assert linear == 6_979_321_856
    assert terms["4-bit linear weights"] == linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8
    assert terms["embeddings, lm_head, norms (fp32)"] == (2 * 32000 * 4096 + 32 * 2 * 4096 + 4096) * 4
    lora = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert lora == 41_943_040  # rank 16 all-linear (rank 8 is half: 21.0 M)
    assert terms["LoRA weights + grads (fp32)"] == lora * 8
    assert terms["optimizer states"] == lora * 2  # paged 8-bit AdamW
    assert terms["checkpointed layer inputs"] == 32 * 2 * 2048 * 4096 * 2
    assert terms["logits + loss (fp32)"] == 2 * 1024 * 32000 * 4 * 3  # a quarter of the positions kept
    total = sum(terms.values())
    assert 8 * 2**30 < total < 12 * 2**30


def test_plan_cli_counts_the_demo_tokens():
    out = subprocess.run(
        [sys.executable, "-m", "lora_kit", "plan", str(ROOT / "recipes" / "demo-sentiment.yaml"), "--json"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["data"]["train_examples"] == 200 and report["data"]["supervised_tokens"] == 400
    assert report["data"]["steps"] == report["data"]["steps_per_epoch"] * 2
    assert report["memory"]["total_bytes"] == sum(t["bytes"] for t in report["memory"]["terms"])


def test_cpu_plan_counts_the_saved_activations_and_the_heap():
    """The CPU terms found by measuring (scripts/bench_train_memory.py): what each layer saves with the
    trainer's LoRA forward, the allocator's slack over it, and the base read at full precision."""
    r = recipe.load(ROOT / "recipes" / "demo-sentiment.yaml")
    shape = plan.model_shape("smollm2-135m-instruct")
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]) == (576, 1536, 30)
    terms = {name: b for name, b, _ in plan.estimate(r, shape, seq_len=256, cuda=False)}
    per_token = (8 * 576 + 4 * 1536) * 4 + (6 * 576 + 1536)  # fp32 saved values + 1-byte dropout masks
    activations = 30 * (4 * 256 * per_token + 4 * 256 * 256 * 4)  # + the fp32 attention mask per layer
    assert terms["activations, all layers"] == activations
    assert terms["allocator slack (glibc heap)"] == plan.HEAP_SLACK * activations
    params = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536) + 49152 * 576 + 576 + 30 * 2 * 576
    assert params == 134_515_008
    assert terms["base loaded before quantizing (freed, kept by the heap)"] == params * 4
    no_dropout = recipe.load(ROOT / "recipes" / "demo-sentiment.yaml", ["lora.dropout=0"])
    lean = {name: b for name, b, _ in plan.estimate(no_dropout, shape, seq_len=256, cuda=False)}
    assert activations - lean["activations, all layers"] == 30 * 4 * 256 * (6 * 576 + 1536)
    assert "allocator slack (glibc heap)" not in dict(
        (n, b) for n, b, _ in plan.estimate(r, shape, seq_len=256, cuda=True)
    )
