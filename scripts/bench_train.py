"""Training throughput: lora-kit vs TRL's SFTTrainer (default, and packing=True), side by side.

Like for like: the same base (the embedded SmolLM2-135M-Instruct in NF4, fp32 compute on the
CPU), the same recipe for both trainers (``--set`` overrides included: micro batch, gradient
accumulation, learning rate, schedule, LoRA, epochs), the same tokens and the same supervision.
TRL gets the examples lora-kit's data pipeline builds (the one chat renderer: token ids, and
labels on the assistant tokens and their end-of-turn token only) as a pre-tokenized dataset, so
its loss, like lora-kit's, counts assistant tokens only. (TRL's own ``assistant_only_loss`` needs
a chat template with ``{% generation %}`` markers; this model's has none, and TRL 1.x cannot patch
it: "patching is not supported for this template".)

Both are timed from the same point to the same point: the first optimizer step's start to the
last one's end (lora-kit: ``Trainer.fit``; TRL: its ``on_train_begin`` and ``on_train_end``
callbacks), model loading, tokenization and optimizer set-up excluded. Tokens/s counts the real
(non-padding) tokens each trainer fed its model over that time (lora-kit: ids that are not the
pad id; TRL: ``include_num_input_tokens_seen="non_padding"``). The final eval loss of every
adapter is measured by the same function (assistant tokens only, on the held-out file).

    python scripts/bench_train.py [--recipe recipes/demo-sentiment.yaml] [--epochs 1] [--runs trl lora-kit] \\
        [--set train.micro_batch_size=1]

Smoke check (about a minute): ``--runs trl lora-kit --set train.max_steps=2``.

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
from _harness import ROOT, cpu_summary

from lora_kit import models
from lora_kit.training import data, eval_loss
from lora_kit.training import recipe as recipe_mod
from lora_kit.training.trainer import Trainer, target_modules


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
        trainer = Trainer(r, resume=False, log=lambda _msg: None)
        trainer.setup()
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
        result = trainer.finalize()
        from peft import PeftModel

        base = models.load_model(r.model.base, r.model.quantization, r.model.double_quant)
        model = PeftModel.from_pretrained(base, str(result.adapter_dir))
        return {
            "tokens_per_s": round(trainer.tokens_seen / wall, 1),
            "optimizer_steps": result.metrics["steps"],
            "eval_loss": eval_loss_of(model, tokenizer, r),
        }


def run_trl(r, tokenizer, packing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        sys.exit("bench_train.py needs TRL: pip install -e '.[bench]' (or run `make bench`)")

    class Clock(TrainerCallback):
        """The wall time from the training loop's start to its end, as lora-kit's ``fit`` is timed."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

    train_records, _ = data.load_splits(r.data, r.train.seed)
    # lora-kit's own examples: the same token ids, labels on the assistant tokens (and their EOS) only
    examples, _ = data.build(tokenizer, train_records, r.data, "train")
    model = models.load_model(r.model.base, r.model.quantization, r.model.double_quant)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=r.train.micro_batch_size,
            gradient_accumulation_steps=r.train.gradient_accumulation_steps,
            num_train_epochs=r.train.epochs,
            max_steps=r.train.max_steps or -1,
            learning_rate=r.train.learning_rate,
            lr_scheduler_type=r.train.scheduler,
            warmup_steps=r.train.warmup_steps,
            max_grad_norm=r.train.max_grad_norm,
            weight_decay=r.train.weight_decay,
            seed=r.train.seed,
            gradient_checkpointing=r.train.gradient_checkpointing,
            max_length=r.data.max_seq_len,
            packing=packing,
            include_num_input_tokens_seen="non_padding",
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
        ds = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
        clock = Clock()
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[clock],
        )
        trainer.train()
        return {
            "tokens_per_s": round(trainer.state.num_input_tokens_seen / clock.seconds, 1),
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
    ap.add_argument(
        "--set", action="append", default=[], help="a recipe override (key.path=value) for every run, both trainers"
    )
    args = ap.parse_args()
    if args.strategy:
        main_distributed(args)
        return
    torch.set_num_threads(torch.get_num_threads())
    base = recipe_mod.load(args.recipe, [f"train.epochs={args.epochs}", *args.set])
    tokenizer = models.load_tokenizer(base.model.base)
    # Unpacked, lora-kit takes as many optimizer steps per epoch as TRL's default: the
    # eval losses of those two rows compare step for step. Packed rows carry more examples,
    # so an epoch is fewer, larger steps (for both trainers).
    runners = {
        "trl": ("TRL SFTTrainer (default)", lambda r: run_trl(r, tokenizer, packing=False)),
        "trl-packed": ("TRL SFTTrainer (packing=True)", lambda r: run_trl(r, tokenizer, packing=True)),
        "lora-kit-unpacked": ("lora-kit (packing: false)", lambda r: run_lora_kit(r, tokenizer, packing=False)),
        "lora-kit": ("lora-kit", lambda r: run_lora_kit(r, tokenizer, packing=True)),
    }
    results = {}
    for key in args.runs:
        name, run = runners[key]
        results[name] = run(base.model_copy(deep=True))
    ours = results.get("lora-kit", next(iter(results.values())))["tokens_per_s"]
    t = base.train
    print(
        f"\nbase {base.model.base} ({base.model.quantization}), r={base.lora.r} all-linear, both trainers: micro batch "
        f"{t.micro_batch_size} x {t.gradient_accumulation_steps} accumulated, max_seq_len {base.data.max_seq_len}, "
        f"{args.epochs} epoch(s){f', max {t.max_steps} steps' if t.max_steps else ''}, loss on assistant tokens only, "
        f"torch threads {torch.get_num_threads()}\nCPU: {cpu_summary()}; overrides: {' '.join(args.set) or 'none'}"
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
