"""Training throughput: lora-kit vs TRL's SFTTrainer (default, and packing=True), side by side.

Same base (the embedded SmolLM2-135M-Instruct in NF4, fp32 compute on the CPU), same
data, same LoRA (r=8, all linear layers) and hyper-parameters, one epoch each. Tokens/s
counts the real (non-padding) tokens of the epoch over the training wall time (model
loading excluded). The final eval loss of every adapter is measured by the same
function (assistant tokens only, on the held-out file), so the numbers compare.

    python scripts/bench_train.py [--recipe recipes/demo-sentiment.yaml] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_kit import models
from lora_kit.training import data, evaluate
from lora_kit.training import recipe as recipe_mod
from lora_kit.training.trainer import target_modules, train

ROOT = Path(__file__).resolve().parent.parent


def eval_loss_of(model, tokenizer, r) -> float:
    _, eval_records = data.load_splits(r.data, r.train.seed)
    examples, _ = data.build(tokenizer, eval_records, r.data, "eval")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return evaluate.eval_loss(model, examples, r.data.max_seq_len, pad, r.train.micro_batch_size, torch.device("cpu"))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "demo-sentiment.yaml"))
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    base = recipe_mod.load(args.recipe, [f"train.epochs={args.epochs}"])
    tokenizer = models.load_tokenizer(base.model.base)
    results = {}
    results["TRL SFTTrainer (default)"] = run_trl(base.model_copy(deep=True), tokenizer, packing=False)
    results["TRL SFTTrainer (packing=True)"] = run_trl(base.model_copy(deep=True), tokenizer, packing=True)
    # Unpacked, lora-kit takes as many optimizer steps per epoch as TRL's default: the
    # eval losses of those two rows compare step for step. Packed rows carry more examples,
    # so an epoch is fewer, larger steps.
    results["lora-kit (packing: false)"] = run_lora_kit(base.model_copy(deep=True), tokenizer, packing=False)
    results["lora-kit"] = run_lora_kit(base.model_copy(deep=True), tokenizer, packing=True)
    ours = results["lora-kit"]["tokens_per_s"]
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
