"""The training recipe: QLoRA on accelerate, with checkpoints, resume, eval and export.

One explicit loop (no Trainer): every micro-batch, every optimizer step and every
file written is visible here. Runs unchanged under ``torchrun``/``accelerate launch``
(DDP); only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_kit import __version__, models, paths
from lora_kit.errors import LoraKitError
from lora_kit.training import checkpoint, data, evaluate, packing
from lora_kit.training.recipe import LINEAR_TARGETS, Recipe


class TrainError(LoraKitError):
    """Training cannot start or go on; the message says why."""


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    ref: str | None
    metrics: dict[str, Any]
    main_process: bool = True


def run_dir_for(recipe: Recipe) -> Path:
    """The run directory: ``output.run_dir`` or ``LORA_KIT_HOME/runs/<name>-<recipe hash>``.

    Derived from the recipe hash, so re-running an interrupted recipe finds its checkpoints.
    """
    if recipe.output.run_dir:
        return Path(recipe.output.run_dir).expanduser()
    return paths.runs_dir() / f"{recipe.output.name}-{recipe.content_hash()[:10]}"


def _compute_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    if recipe.model.compute_dtype == "auto":
        return models.default_compute_dtype(device)
    return getattr(torch, recipe.model.compute_dtype)


def target_modules(recipe: Recipe) -> list[str]:
    return LINEAR_TARGETS if recipe.lora.target_modules == "all-linear" else list(recipe.lora.target_modules)


def base_fingerprint(spec: str) -> str | None:
    """A cheap content hash of a local base model: config + weight file names and sizes."""
    try:
        path = Path(models.resolve(spec))
    except models.ModelError:
        return None
    if not path.exists():
        return None
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def chat_template_hash(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) or "builtin:mistral-v0.1"
    return hashlib.sha256(str(template).encode()).hexdigest()


class _Writer:
    """Metrics to JSONL + TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            # Drop lines past the checkpoint we resume from, so the file has each step once.
            kept = [
                l
                for l in self.path.read_text().splitlines()
                if l.strip() and json.loads(l).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(l + "\n" for l in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_losses(run_dir: Path) -> Path | None:
    """loss_curve.png from metrics.jsonl (train and eval loss)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out = run_dir / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fault_injection(step: int) -> None:
    """Tests kill the process for real after a given step to prove resume works."""
    kill_after = os.environ.get("LORA_KIT_TEST_SIGKILL_AFTER_STEP")
    if kill_after and int(kill_after) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _micro_batches(rows: list[packing.Row], mb: int, world: int, rank: int, seed: int, start_micro: int):
    """Yield (epoch, this rank's rows) for every micro-step from ``start_micro`` on, forever.

    A micro-step takes ``mb * world`` rows of the epoch order; the last one wraps around
    to the start of the epoch so every rank always has a full micro-batch.
    """
    per_step = mb * world
    per_epoch = math.ceil(len(rows) / per_step)
    micro = start_micro
    while True:
        epoch, k = divmod(micro, per_epoch)
        order = packing.epoch_order(len(rows), seed, epoch)
        picks = [order[(k * per_step + rank * mb + j) % len(order)] for j in range(mb)]
        yield epoch, [rows[i] for i in picks]
        micro += 1


def train(
    recipe: Recipe,
    resume: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Run a recipe end to end. ``resume=None`` resumes an interrupted run if one exists,
    ``True`` requires a checkpoint, ``False`` starts fresh."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import (
        LoraConfig,
        get_peft_model,
        get_peft_model_state_dict,
        prepare_model_for_kbit_training,
        set_peft_model_state_dict,
    )
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    t_start = time.time()
    cuda = torch.cuda.is_available()
    compute_dtype = _compute_dtype(recipe, models.default_device())
    accelerator = Accelerator(
        cpu=not cuda, mixed_precision="bf16" if cuda and compute_dtype == torch.bfloat16 else "no"
    )
    main = accelerator.is_main_process
    say = log or (lambda msg: print(msg, flush=True))

    def info(msg: str) -> None:
        if main:
            say(msg)

    run_dir = run_dir_for(recipe)
    tcfg = recipe.train
    set_seed(tcfg.seed)

    # -- resume or start ------------------------------------------------------------------
    ckpt_path = checkpoint.latest(run_dir)
    if resume is True and ckpt_path is None:
        raise TrainError(f"--resume: no checkpoint in {run_dir}")
    if resume is False or (ckpt_path is not None and (run_dir / "done.json").exists()):
        ckpt_path = None
    if ckpt_path is not None:
        saved_hash = json.loads((ckpt_path / checkpoint.COMPLETE).read_text()).get("recipe_hash")
        if saved_hash != recipe.content_hash():
            raise TrainError(
                f"the recipe changed since the checkpoint in {run_dir}; use --fresh or another output.run_dir"
            )
    if main:
        if ckpt_path is None and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.json").write_text(
            json.dumps({"recipe": recipe.to_dict(), "hash": recipe.content_hash()}, indent=2)
        )
    accelerator.wait_for_everyone()
    info(f"run directory: {run_dir}")

    # -- data -------------------------------------------------------------------------------
    tokenizer = models.load_tokenizer(recipe.model.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_records, eval_records = data.load_splits(recipe.data, tcfg.seed)
    train_examples, audit = data.build(tokenizer, train_records, recipe.data, "train")
    eval_examples, eval_audit = data.build(tokenizer, eval_records, recipe.data, "eval") if eval_records else ([], None)
    info(audit.summary("train data audit"))
    if eval_audit:
        info(eval_audit.summary("eval data audit"))
    if main:
        (run_dir / "data_audit.json").write_text(
            json.dumps({"train": audit.to_dict(), "eval": eval_audit.to_dict() if eval_audit else None}, indent=2)
        )
    if audit.failures or (eval_audit and eval_audit.failures):
        raise TrainError(
            "the data audit failed: " + "; ".join(audit.failures + (eval_audit.failures if eval_audit else []))
        )
    rows = packing.rows_for(train_examples, recipe.data.max_seq_len, recipe.data.packing)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = math.ceil(len(rows) / (tcfg.micro_batch_size * world))
    steps_per_epoch = math.ceil(micro_per_epoch / tcfg.gradient_accumulation_steps)
    total_steps = tcfg.max_steps or steps_per_epoch * tcfg.epochs
    info(
        f"{len(train_examples)} examples in {len(rows)} rows ({'packed' if recipe.data.packing else 'unpacked'}), "
        f"{world} process(es), {steps_per_epoch} steps/epoch, {total_steps} steps"
    )

    # -- model --------------------------------------------------------------------------------
    device = accelerator.device
    model = models.load_model(
        recipe.model.base, recipe.model.quantization, recipe.model.double_quant, compute_dtype, device
    )
    gc_kwargs = {"use_reentrant": False}
    if recipe.model.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=tcfg.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights in place the first time a module runs in eval mode
        # on an AVX512-bf16 CPU, which changes the numerics of every later training step: a
        # mid-run eval would then make a resumed run differ from an uninterrupted one.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    lora_config = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=target_modules(recipe),
        use_rslora=recipe.lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # LoRA weights are initialised from the seed, identically on every rank.
    torch.manual_seed(tcfg.seed)
    model = get_peft_model(model, lora_config)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    info(f"trainable LoRA parameters: {n_trainable:,}")
    if tcfg.optimizer == "paged_adamw_8bit":
        if not cuda:
            raise TrainError("train.optimizer paged_adamw_8bit needs CUDA; use adamw on the CPU")
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    scheduler = get_scheduler(
        tcfg.scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=total_steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    peft_model = accelerator.unwrap_model(model)

    start_step = 0
    if ckpt_path is not None:
        state = checkpoint.load(ckpt_path, device)
        set_peft_model_state_dict(peft_model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"][rank])
        start_step = state["meta"]["step"]
        info(f"resumed from {ckpt_path.name} (step {start_step})")

    writer = _Writer(run_dir, main, start_step)
    batches = _micro_batches(
        rows, tcfg.micro_batch_size, world, rank, tcfg.seed, start_step * tcfg.gradient_accumulation_steps
    )

    def save_checkpoint(step: int) -> None:
        rngs = [checkpoint.rng_state()]
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if main:
            checkpoint.save(
                run_dir,
                step,
                get_peft_model_state_dict(peft_model),
                optimizer.state_dict(),
                scheduler.state_dict(),
                rngs,
                {"recipe_hash": recipe.content_hash()},
            )
        accelerator.wait_for_everyone()

    def global_eval_loss() -> float | None:
        if not eval_examples:
            return None
        return evaluate.eval_loss(model, eval_examples, recipe.data.max_seq_len, pad_id, tcfg.micro_batch_size, device)

    # -- the loop --------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, disable=not main, desc="train", unit="step", file=sys.stderr)
    last_loss = float("nan")
    tokens_seen, t_loop = 0, time.time()
    peak_rss_mb = 0.0
    for step in range(start_step + 1, total_steps + 1):
        micro = [next(batches)[1] for _ in range(tcfg.gradient_accumulation_steps)]
        collated = [packing.collate(rows_, pad_id) for rows_ in micro]
        n_local = sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in collated)
        step_loss = torch.zeros((), device=device)
        step_tokens = 0
        for i, batch in enumerate(collated):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = i == len(collated) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                loss, n = packing.loss_sum(model, batch)
                accelerator.backward(loss / max(n_local, 1))
            step_loss += loss.detach()
            step_tokens += (
                int((batch["input_ids"] != pad_id).sum()) if pad_id is not None else batch["input_ids"].numel()
            )
        grad_norm = None
        if tcfg.max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_(params, tcfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        totals = accelerator.reduce(
            torch.tensor([float(step_loss), float(n_local), float(step_tokens)], device=device), reduction="sum"
        )
        last_loss = float(totals[0] / max(float(totals[1]), 1.0))
        tokens_seen += int(totals[2])
        elapsed = time.time() - t_loop
        tps = tokens_seen / elapsed if elapsed > 0 else 0.0
        peak_rss_mb = max(peak_rss_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        record: dict[str, Any] = {
            "step": step,
            "loss": round(last_loss, 6),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": round(tps, 1),
        }
        if grad_norm is not None:
            record["grad_norm"] = round(grad_norm, 6)
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step != total_steps:
            ev = global_eval_loss()
            if ev is not None:
                record["eval_loss"] = round(ev, 6)
        if step % tcfg.log_every == 0 or "eval_loss" in record or step == total_steps:
            writer.log(record)
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step != total_steps:
            save_checkpoint(step)
        _fault_injection(step)
    bar.close()

    # -- end: eval, export, register -----------------------------------------------------------
    metrics: dict[str, Any] = {
        "train_loss": last_loss,
        "steps": total_steps,
        "tokens_per_s": round(tokens_seen / max(time.time() - t_loop, 1e-9), 1),
        "trainable_params": n_trainable,
        "peak_rss_mb": round(peak_rss_mb, 1),
    }
    ev = global_eval_loss()
    if ev is not None:
        metrics["eval_loss"] = ev
        writer.log({"step": total_steps, "eval_loss": round(ev, 6)})
    checksum = hashlib.sha256(
        b"".join(
            v.detach().cpu().float().numpy().tobytes() for _, v in sorted(get_peft_model_state_dict(peft_model).items())
        )
    ).hexdigest()
    print(f"[rank {rank}] adapter checksum {checksum}", flush=True)
    adapter_dir = run_dir / "adapter"
    ref = None
    if main:
        if eval_records and recipe.eval.task_metric == "exact_match" and recipe.eval.max_examples:
            convs = [
                data.to_messages(r, recipe.data, i) for i, r in enumerate(eval_records[: recipe.eval.max_examples])
            ]
            adapter_em = evaluate.exact_match(
                peft_model, tokenizer, convs, recipe.eval.max_new_tokens, device, use_adapter=True
            )
            metrics["eval_exact_match"] = adapter_em["exact_match"]
            if recipe.eval.compare_base:
                base_em = evaluate.exact_match(
                    peft_model, tokenizer, convs, recipe.eval.max_new_tokens, device, use_adapter=False
                )
                metrics["base_exact_match"] = base_em["exact_match"]
                say(
                    f"held-out exact match ({adapter_em['n']} examples): base {base_em['exact_match']:.1%}  ->  adapter {adapter_em['exact_match']:.1%}"
                )
                for s in base_em["samples"][:2]:
                    say(f"  base    : {s['got']!r}   (expected {s['expected']!r})")
            else:
                say(f"held-out exact match ({adapter_em['n']} examples): adapter {adapter_em['exact_match']:.1%}")
            for s in adapter_em["samples"][:2]:
                say(f"  adapter : {s['got']!r}   (expected {s['expected']!r})")
        if "eval_loss" in metrics:
            say(f"eval loss: {metrics['eval_loss']:.4f}   train loss: {last_loss:.4f}")
        metrics["wall_s"] = round(time.time() - t_start, 1)
        writer.close()
        plot_losses(run_dir)
        export_adapter(peft_model, tokenizer, recipe, adapter_dir)
        lineage = {
            "recipe": recipe.to_dict(),
            "recipe_hash": recipe.content_hash(),
            "base_model": recipe.model.base,
            "base_fingerprint": base_fingerprint(recipe.model.base),
            "chat_template_sha256": chat_template_hash(tokenizer),
            "dataset_fingerprint": data.fingerprint(train_records),
            "eval_dataset_fingerprint": data.fingerprint(eval_records) if eval_records else None,
            "data_audit": audit.to_dict(),
            "metrics": metrics,
            "lora_kit_version": __version__,
            "run_dir": str(run_dir),
        }
        (run_dir / "lineage.json").write_text(json.dumps(lineage, indent=2, default=str))
        if recipe.output.register_adapter:
            ref = register(adapter_dir, recipe, lineage)
        (run_dir / "done.json").write_text(json.dumps({"ref": ref, "metrics": metrics}, indent=2, default=str))
        for old in checkpoint.list_complete(run_dir):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if world > 1:
        torch.distributed.destroy_process_group()
    return TrainResult(run_dir, adapter_dir, ref, metrics, main)


def export_adapter(peft_model: Any, tokenizer: Any, recipe: Recipe, adapter_dir: Path) -> Path:
    """Write the PEFT adapter (config + safetensors) and the chat template it was trained with."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # The spec the user gave (hub id, path or embedded name), not a cache path.
    config["base_model_name_or_path"] = recipe.model.base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    template = getattr(tokenizer, "chat_template", None)
    (adapter_dir / "chat_template.jinja").write_text(
        template if template else "{# built-in Mistral-7B-Instruct-v0.1 format (lora_kit.chat) #}\n"
    )
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.unlink()  # PEFT's model card template: replaced by the registry's lineage
    return adapter_dir


def register(adapter_dir: Path, recipe: Recipe, lineage: dict[str, Any]) -> str:
    """Register the exported adapter; returns NAME@VERSION."""
    from lora_kit.registry import Registry

    version = Registry().register(
        adapter_dir,
        recipe.output.name,
        base_model=recipe.model.base,
        description=recipe.output.description,
        tags=recipe.output.tags,
        lineage=lineage,
    )
    return version.ref
