"""Training throughput: lora-kit vs TRL's SFTTrainer (default, and packing=True), side by side.

Same base (the embedded SmolLM2-135M-Instruct in NF4, fp32 compute on the CPU), same
data, same LoRA (r=8, all linear layers) and hyper-parameters, one epoch each. Tokens/s
counts the real (non-padding) tokens of the epoch over the training wall time (model
loading excluded). The final eval loss of every adapter is measured by the same
function (assistant tokens only, on the held-out file), so the numbers compare.

    python scripts/bench_train.py [--recipe recipes/demo-sentiment.yaml] [--epochs 1] [--runs trl lora-kit]

With ``--strategy ddp fsdp --nproc 2`` it compares instead lora-kit on one process with lora-kit
on ``--nproc`` processes (torchrun + gloo on the CPU, NCCL on GPUs) under each strategy: tokens/s
(all ranks together) and the peak RSS of every rank, ``--max-steps`` optimizer steps each, the
same global batch per step (the micro batch per rank is divided by the process count).

    python scripts/bench_train.py --strategy ddp fsdp --nproc 2 [--max-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_kit import models
from lora_kit.training import data, eval_loss
from lora_kit.training import recipe as recipe_mod
from lora_kit.training.trainer import target_modules, train

ROOT = Path(__file__).resolve().parent.parent


def eval_loss_of(model, tokenizer, r) -> float:
    _, eval_records = data.load_splits(r.data, r.train.seed)
    examples, _ = data.build(tokenizer, eval_records, r.data, "eval")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return eval_loss.eval_loss(model, examples, r.data.max_seq_len, pad, r.train.micro_batch_size, torch.device("cpu"))


def run_lora_kit(r, tokenizer, packing: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r.data.packing = packing
        r.output.run_dir = tmp
        r.output.register_adapter = False
        r.eval.task_metric = "none"
        r.train.eval_every = 0
        r.train.checkpoint_every = 0
        result = train(r, resume=False, log=lambda _msg: None)
        from peft import PeftModel

        base = models.load_model(r.model.base, r.model.quantization, r.model.double_quant)
        model = PeftModel.from_pretrained(base, str(result.adapter_dir))
        return {
            "tokens_per_s": result.metrics["tokens_per_s"],
            "optimizer_steps": result.metrics["steps"],
            "eval_loss": eval_loss_of(model, tokenizer, r),
        }


def run_trl(r, tokenizer, packing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig

    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        sys.exit("bench_train.py needs TRL: pip install -e '.[bench]' (or run `make bench`)")

    train_records, _ = data.load_splits(r.data, r.train.seed)
    model = models.load_model(r.model.base, r.model.quantization, r.model.double_quant)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=r.train.micro_batch_size,
            gradient_accumulation_steps=r.train.gradient_accumulation_steps,
            num_train_epochs=r.train.epochs,
            learning_rate=r.train.learning_rate,
            lr_scheduler_type=r.train.scheduler,
            warmup_steps=r.train.warmup_steps,
            max_grad_norm=r.train.max_grad_norm,
            weight_decay=r.train.weight_decay,
            seed=r.train.seed,
            gradient_checkpointing=r.train.gradient_checkpointing,
            max_length=r.data.max_seq_len,
            packing=packing,
            save_strategy="no",
            report_to=[],
            logging_steps=10,
            use_cpu=True,
            bf16=False,
            fp16=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        peft_config = LoraConfig(
            r=r.lora.r,
            lora_alpha=r.lora.alpha,
            lora_dropout=r.lora.dropout,
            target_modules=target_modules(r),
            task_type="CAUSAL_LM",
        )
        ds = Dataset.from_list([{"messages": rec["messages"]} for rec in train_records])
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=peft_config
        )
        real_tokens = (
            sum(int(sum(x)) for x in trainer.train_dataset["attention_mask"])
            if "attention_mask" in trainer.train_dataset.column_names
            else sum(len(x) for x in trainer.train_dataset["input_ids"])
        )
        t0 = time.time()
        trainer.train()
        wall = time.time() - t0
        return {
            "tokens_per_s": round(real_tokens * r.train.epochs / wall, 1),
            "optimizer_steps": trainer.state.global_step,
            "eval_loss": eval_loss_of(trainer.model, tokenizer, r),
        }


def run_launched(recipe: str, strategy: str, nproc: int, max_steps: int, micro_batch: int, port: int) -> dict:
    """One `lora-kit train` in a subprocess (torchrun for several processes); tokens/s and per-rank peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        launcher = [sys.executable, "-m", "lora_kit"]
        if nproc > 1:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
            launcher = [*torchrun, "--master_port", str(port), "-m", "lora_kit"]
        overrides = [
            f"train.distributed={strategy}",
            f"train.max_steps={max_steps}",
            f"train.micro_batch_size={micro_batch}",
            "train.optimizer=adamw",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "eval.task_metric=none",
            "output.register_adapter=false",
        ]
        cmd = [*launcher, "train", recipe, "--run-dir", tmp, *[a for o in overrides for a in ("--set", o)]]
        env = {**os.environ, "LORA_KIT_HOME": os.environ.get("LORA_KIT_HOME", str(Path(tmp) / "home"))}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        done = json.loads((Path(tmp) / "done.json").read_text())["metrics"]
        rss = {int(r): float(mb) for r, mb in re.findall(r"\[rank (\d+)\] peak RSS ([\d.]+) MB", out.stderr)}
        return {"tokens_per_s": done["tokens_per_s"], "train_loss": done["train_loss"], "peak_rss_mb": rss}


def main_distributed(args: argparse.Namespace) -> None:
    """Single process vs ``args.nproc`` processes under each of ``args.strategy``, same global batch."""
    base = recipe_mod.load(args.recipe)
    global_mb = base.train.micro_batch_size
    if global_mb % args.nproc:
        sys.exit(f"the recipe's micro batch {global_mb} does not divide over {args.nproc} processes")
    rows = {"single process": run_launched(args.recipe, "none", 1, args.max_steps, global_mb, 29700)}
    for i, strategy in enumerate(args.strategy):
        name = f"{strategy}, {args.nproc} processes"
        rows[name] = run_launched(args.recipe, strategy, args.nproc, args.max_steps, global_mb // args.nproc, 29701 + i)
    print(
        f"\nbase {base.model.base} ({base.model.quantization}), r={base.lora.r}, global micro batch {global_mb}, "
        f"max_seq_len {base.data.max_seq_len}, {args.max_steps} steps, {os.cpu_count()} CPU cores"
    )
    print("| run | tokens/s (all ranks) | peak RSS per rank (MB) | final train loss |")
    print("|---|---:|---|---:|")
    for name, res in rows.items():
        rss = ", ".join(f"{mb:.0f}" for _, mb in sorted(res["peak_rss_mb"].items()))
        print(f"| {name} | {res['tokens_per_s']:.1f} | {rss} | {res['train_loss']:.4f} |")
    print(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "demo-sentiment.yaml"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--strategy", nargs="+", choices=["ddp", "fsdp"], help="compare multi-process lora-kit instead")
    ap.add_argument("--nproc", type=int, default=2, help="processes for --strategy")
    ap.add_argument("--max-steps", type=int, default=20, help="optimizer steps per run for --strategy")
    ap.add_argument(
        "--runs",
        nargs="+",
        choices=["trl", "trl-packed", "lora-kit-unpacked", "lora-kit"],
        default=["trl", "trl-packed", "lora-kit-unpacked", "lora-kit"],
        help="which trainers to run (default: all four)",
    )
    ap.add_argument("--set", action="append", default=[], help="a recipe override for the lora-kit runs only")
    args = ap.parse_args()
    if args.strategy:
        main_distributed(args)
        return
    torch.set_num_threads(torch.get_num_threads())
    base = recipe_mod.load(args.recipe, [f"train.epochs={args.epochs}"])
    tokenizer = models.load_tokenizer(base.model.base)
    # Unpacked, lora-kit takes as many optimizer steps per epoch as TRL's default: the
    # eval losses of those two rows compare step for step. Packed rows carry more examples,
    # so an epoch is fewer, larger steps.
    runners = {
        "trl": ("TRL SFTTrainer (default)", lambda r: run_trl(r, tokenizer, packing=False)),
        "trl-packed": ("TRL SFTTrainer (packing=True)", lambda r: run_trl(r, tokenizer, packing=True)),
        "lora-kit-unpacked": ("lora-kit (packing: false)", lambda r: run_lora_kit(r, tokenizer, packing=False)),
        "lora-kit": ("lora-kit", lambda r: run_lora_kit(r, tokenizer, packing=True)),
    }
    ours_recipe = recipe_mod.load(args.recipe, [f"train.epochs={args.epochs}", *args.set])
    results = {}
    for key in args.runs:
        name, run = runners[key]
        results[name] = run((ours_recipe if key.startswith("lora-kit") else base).model_copy(deep=True))
    ours = results.get("lora-kit", next(iter(results.values())))["tokens_per_s"]
    print(
        f"\nbase {base.model.base} ({base.model.quantization}), r={base.lora.r} all-linear, micro batch {base.train.micro_batch_size}, "
        f"max_seq_len {base.data.max_seq_len}, {args.epochs} epoch(s), torch threads {torch.get_num_threads()}"
    )
    print("| trainer | tokens/s | lora-kit (packed) speed-up | optimizer steps | eval loss (assistant tokens) |")
    print("|---|---:|---:|---:|---:|")
    for name, res in results.items():
        print(
            f"| {name} | {res['tokens_per_s']:.1f} | {ours / res['tokens_per_s']:.2f}x | {res['optimizer_steps']} | {res['eval_loss']:.4f} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
