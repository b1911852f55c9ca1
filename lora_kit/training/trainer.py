"""The training recipe: QLoRA on accelerate, with checkpoints, resume, eval and export.

One explicit loop (no Hugging Face Trainer), split as torchtune splits its recipes:
``Trainer.setup()`` builds everything a run needs, one ``_setup_*`` step at a time (run
directory and resume decision, data and its audit, model, optimizer, checkpoint state),
``fit()`` is only the loop (one ``_train_step`` per optimizer step, eval loss and checkpoints
between steps), and ``finalize()`` takes the final eval loss and hands the adapter on: the task
metric is measured by ``training/task_eval.py``, the export, lineage and registration are
``training/publish.py``'s. ``train()`` runs the three.

Runs unchanged under ``torchrun``/``accelerate launch``: DDP, or with ``train.distributed: fsdp``
FSDP2 applied by ``training/fsdp.py`` (each rank then writes its checkpoint shard); only rank 0
writes the other files.
Progress lines go to the ``lora_kit.training.trainer`` logger (the CLI shows them on stderr).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_kit import models, paths
from lora_kit.evaluation.runner import release_memory
from lora_kit.training import checkpoint, data, fast_lora, fsdp, metrics, packing, publish
from lora_kit.training.errors import TrainError
from lora_kit.training.eval_loss import eval_loss
from lora_kit.training.recipe import LINEAR_TARGETS, Recipe
from lora_kit.training.task_eval import TaskEval

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    ref: str | None  # NAME@VERSION when the adapter was registered
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
    """``model.compute_dtype``, with ``auto`` resolved for ``device``."""
    if recipe.model.compute_dtype == "auto":
        return models.default_compute_dtype(device)
    return getattr(torch, recipe.model.compute_dtype)


def mixed_precision(compute_dtype: torch.dtype) -> str:
    """accelerate's ``mixed_precision`` for the compute dtype, on any device: ``fp16`` (autocast to
    float16 with a GradScaler's loss scaling: T4/V100, which lack bf16), ``bf16`` (autocast, no
    scaling needed) or ``no`` (fp32). The LoRA weights, their gradients and the optimizer stay fp32."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(compute_dtype, "no")


def _scale_fp16_on_cpu(accelerator: Any) -> None:
    """fp16 on the CPU: accelerate leaves it without autocast or a GradScaler there, though torch
    has both; give it them, so an fp16 run takes the CUDA run's branch (autocast, scaled backward,
    unscale before clipping, steps skipped on overflow) wherever it runs."""
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None and accelerator.device.type == "cpu":
        accelerator.scaler = torch.amp.GradScaler("cpu")
        accelerator.native_amp = True


def target_modules(recipe: Recipe) -> list[str]:
    """The module names LoRA adapts (``all-linear`` = every projection of a Mistral/Llama layer)."""
    return LINEAR_TARGETS if recipe.lora.target_modules == "all-linear" else list(recipe.lora.target_modules)


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float, cuda: bool) -> Any:
    """``train.optimizer`` over ``params``: torch's AdamW, or bitsandbytes' 8-bit AdamW.

    ``paged_adamw_8bit`` is paged (state in unified memory, evicted to the host under pressure)
    where CUDA is present and unpaged on the CPU (bitsandbytes >= 0.49 runs its 8-bit optimizer
    there; paging needs CUDA). Either way bitsandbytes keeps the moments as uint8 blocks with
    their absmax and quantization map for every tensor of at least 4,096 elements (smaller
    ones stay fp32), and the checkpoint saves and restores that state as it is.
    """
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if cuda else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _micro_batches(
    rows: list[packing.Row], mb: int, world: int, rank: int, seed: int, start_micro: int
) -> Iterator[tuple[int, list[packing.Row]]]:
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


# -- TEST HOOK (not a feature) -----------------------------------------------------------------
# The crash-resume test kills a real training process after a given optimizer step, to prove
# that resuming from the last checkpoint gives the same adapter as an uninterrupted run.
SIGKILL_AFTER_STEP_ENV = "LORA_KIT_TEST_SIGKILL_AFTER_STEP"


def _test_hook_sigkill_after(step: int) -> None:
    """TEST HOOK: with ``$LORA_KIT_TEST_SIGKILL_AFTER_STEP=N``, die by SIGKILL right after step N."""
    kill_after = os.environ.get(SIGKILL_AFTER_STEP_ENV)
    if kill_after and int(kill_after) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class Trainer:
    """One run of a recipe: ``setup()``, then ``fit()``, then ``finalize()`` (``run()`` does all three).

    ``resume=None`` resumes an interrupted run if one exists, ``True`` requires a checkpoint,
    ``False`` starts fresh. ``log`` receives the progress lines (default: this module's logger
    at INFO); only the main process emits them, except the per-rank adapter checksum.
    """

    def __init__(self, recipe: Recipe, resume: bool | None = None, log: Callable[[str], None] | None = None):
        self.recipe = recipe
        self.resume = resume
        self._say = log or logger.info

    def _info(self, msg: str) -> None:
        """A progress line, from the main process only."""
        if self.main:
            self._say(msg)

    def run(self) -> TrainResult:
        """The whole run: setup, the loop, and finalize."""
        self.setup()
        self.fit()
        return self.finalize()

    # -- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything the loop needs, in the order the run's random state depends on."""
        self.t_start = time.time()
        self._setup_accelerator()
        self._setup_run_dir()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._load_checkpoint()
        self.metrics_logger = metrics.run_logger(self.run_dir, self.main, self.start_step)
        tcfg = self.recipe.train
        start_micro = self.start_step * tcfg.gradient_accumulation_steps
        self.batches = _micro_batches(self.rows, tcfg.micro_batch_size, self.world, self.rank, tcfg.seed, start_micro)

    def _setup_accelerator(self) -> None:
        """The accelerate state (one process, or this rank of a DDP group) and the global seed."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            raise TrainError(
                "this launch asks for accelerate's own FSDP (distributed_type: FSDP), which lora-kit does not use: "
                "launch with recipes/accelerate/fsdp-2gpu.yaml (distributed_type: MULTI_GPU) and set "
                "train.distributed: fsdp; lora-kit shards the model itself"
            )
        self.cuda = torch.cuda.is_available()
        self.compute_dtype = _compute_dtype(self.recipe, models.default_device())
        # accelerate keeps one AcceleratorState per process and refuses a later Accelerator another
        # mixed precision: a process that trains several recipes (train() in-process) starts each
        # from a fresh one (the process group, PartialState, is kept).
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(cpu=not self.cuda, mixed_precision=mixed_precision(self.compute_dtype))
        _scale_fp16_on_cpu(self.accelerator)
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.device = self.accelerator.device
        self.strategy = self._strategy()
        self.run_dir = run_dir_for(self.recipe)
        scaling = " with loss scaling" if self.accelerator.scaler is not None else ""
        self._info(
            f"compute {str(self.compute_dtype).removeprefix('torch.')}, mixed precision {self.accelerator.mixed_precision}{scaling}"
        )
        set_seed(self.recipe.train.seed)

    def _strategy(self) -> str:
        """none, ddp or fsdp: ``train.distributed`` (unset: ddp when launched with several processes),
        checked against the launch before any model loads."""
        tcfg = self.recipe.train
        strategy = tcfg.distributed or ("ddp" if self.world > 1 else "none")
        if strategy == "fsdp" and tcfg.optimizer == "paged_adamw_8bit":
            raise TrainError(
                "train.distributed fsdp cannot shard or checkpoint paged_adamw_8bit's state (bitsandbytes keeps it "
                "outside the sharded parameters); set train.optimizer: adamw, whose state FSDP shards across processes"
            )
        if strategy == "fsdp" and self.compute_dtype == torch.float16:
            raise TrainError(
                "train.distributed fsdp does not scale fp16 losses (its optimizer is not accelerate's): "
                "set model.compute_dtype: bfloat16 (or float32), or train fp16 with train.distributed: ddp"
            )
        if strategy == "fsdp" and self.world < 2:
            raise TrainError(
                "train.distributed fsdp needs more than one process: launch with `torchrun --nproc_per_node N "
                "-m lora_kit train ...` or `accelerate launch --config_file recipes/accelerate/fsdp-2gpu.yaml "
                "-m lora_kit train ...`, or set train.distributed: none for one process"
            )
        if strategy == "none" and self.world > 1:
            raise TrainError(
                f"train.distributed none, but {self.world} processes were launched (each would train alone): "
                "launch one process, or set train.distributed: ddp or fsdp"
            )
        return strategy

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from, or None to start fresh; refuses a changed recipe."""
        ckpt_path = checkpoint.latest(self.run_dir)
        if self.resume is True and ckpt_path is None:
            raise TrainError(f"--resume: no checkpoint in {self.run_dir}")
        if self.resume is False or (ckpt_path is not None and (self.run_dir / "done.json").exists()):
            return None  # asked to start over, or the run finished: a re-run starts over
        if ckpt_path is not None:
            saved_hash = json.loads((ckpt_path / checkpoint.COMPLETE).read_text()).get("recipe_hash")
            if saved_hash != self.recipe.content_hash():
                raise TrainError(
                    f"the recipe changed since the checkpoint in {self.run_dir}; use --fresh or another output.run_dir"
                )
            checkpoint.check_resume_layout(ckpt_path, self.strategy, self.world)
        return ckpt_path

    def _setup_run_dir(self) -> None:
        """Decide resume vs fresh; a fresh run empties the directory. Writes recipe.json."""
        self.ckpt_path = self._resume_point()
        if self.main:
            if self.ckpt_path is None and self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            recipe_json = {"recipe": self.recipe.to_dict(), "hash": self.recipe.content_hash()}
            (self.run_dir / "recipe.json").write_text(json.dumps(recipe_json, indent=2))
        self.accelerator.wait_for_everyone()
        self._info(f"run directory: {self.run_dir}")

    def _setup_data(self) -> None:
        """Tokenized, audited examples and the (packed) training rows; sizes the run in steps."""
        recipe, tcfg = self.recipe, self.recipe.train
        tok = self.tokenizer = models.load_tokenizer(recipe.model.base)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.train_records, self.eval_records = data.load_splits(recipe.data, tcfg.seed)
        train_examples, self.audit = data.build(tok, self.train_records, recipe.data, "train")
        self.eval_examples, self.eval_audit = (
            data.build(tok, self.eval_records, recipe.data, "eval") if self.eval_records else ([], None)
        )
        self._check_audit()
        self.task_eval = TaskEval(recipe, self.eval_records, self.compute_dtype, self.run_dir, self._say)
        self.task_eval.check_data()
        self.rows = packing.rows_for(train_examples, recipe.data.max_seq_len, recipe.data.packing)
        micro_per_epoch = math.ceil(len(self.rows) / (tcfg.micro_batch_size * self.world))
        steps_per_epoch = math.ceil(micro_per_epoch / tcfg.gradient_accumulation_steps)
        self.total_steps = tcfg.max_steps or steps_per_epoch * tcfg.epochs
        self._info(
            f"{len(train_examples)} examples in {len(self.rows)} rows "
            f"({'packed' if recipe.data.packing else 'unpacked'}), {self.world} process(es), "
            f"{steps_per_epoch} steps/epoch, {self.total_steps} steps"
        )

    def _check_audit(self) -> None:
        """Show the data audit, keep it as data_audit.json, and stop on its failures."""
        audit, eval_audit = self.audit, self.eval_audit
        self._info(audit.summary("train data audit"))
        if eval_audit:
            self._info(eval_audit.summary("eval data audit"))
        if self.main:
            both = {"train": audit.to_dict(), "eval": eval_audit.to_dict() if eval_audit else None}
            (self.run_dir / "data_audit.json").write_text(json.dumps(both, indent=2))
        failures = audit.failures + (eval_audit.failures if eval_audit else [])
        if failures:
            raise TrainError("the data audit failed: " + "; ".join(failures))

    def _setup_model(self) -> None:
        """The (4-bit) base ready for k-bit training, with fresh LoRA weights (seeded, the same on every rank)."""
        from peft import LoraConfig, get_peft_model

        mcfg, lcfg, tcfg = self.recipe.model, self.recipe.lora, self.recipe.train
        model = models.load_model(
            mcfg.base,
            mcfg.quantization,
            mcfg.double_quant,
            self.compute_dtype,
            self.device,
            attn_implementation=mcfg.attn_implementation,
            # FSDP shards the packed 4-bit weights only when they are stored as the compute dtype.
            quant_storage=self.compute_dtype if self.strategy == "fsdp" else None,
        )
        model = self._prepare_base(model)
        lora_config = LoraConfig(
            r=lcfg.r,
            lora_alpha=lcfg.alpha,
            lora_dropout=lcfg.dropout,
            target_modules=target_modules(self.recipe),
            use_rslora=lcfg.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(tcfg.seed)  # LoRA weights are initialised from the seed, identically on every rank
        self.model = get_peft_model(model, lora_config)
        if self.strategy == "fsdp":
            fsdp.shard(self.model, self.device)
            self._log_shard()
        else:  # FSDP2 gathers and frees the LoRA weights around each layer: PEFT's forward stays there
            fast_lora.install(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.params)
        self._info(f"trainable LoRA parameters: {self.n_trainable:,}")

    def _log_shard(self) -> None:
        """Every rank logs the share of the 4-bit base and of the LoRA parameters it holds (FSDP)."""
        sizes = fsdp.shard_sizes(self.model)
        logger.info(
            "[rank %d] fsdp shard: %d of %d 4-bit base bytes, %d of %d LoRA parameters",
            self.rank,
            sizes["base_4bit_bytes_local"],
            sizes["base_4bit_bytes_total"],
            sizes["lora_params_local"],
            sizes["lora_params_total"],
        )

    def _prepare_base(self, model: Any) -> Any:
        """Gradient checkpointing, and (4-bit) PEFT's k-bit preparation, on the loaded base."""
        from peft import prepare_model_for_kbit_training

        checkpointing = self.recipe.train.gradient_checkpointing
        gc_kwargs = {"use_reentrant": False}
        if self.recipe.model.quantization != "none":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=gc_kwargs
            )
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
        for module in model.modules():
            # bitsandbytes repacks 4-bit weights in place the first time a module runs in eval mode
            # on an AVX512-bf16 CPU, which changes the numerics of every later training step: a
            # mid-run eval would then make a resumed run differ from an uninterrupted one.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        return model

    def _setup_optimizer(self) -> None:
        """Optimizer and LR schedule over the LoRA parameters; wraps the model for DDP."""
        from transformers import get_scheduler

        tcfg = self.recipe.train
        optimizer = make_optimizer(tcfg.optimizer, self.params, tcfg.learning_rate, tcfg.weight_decay, self.cuda)
        self.scheduler = get_scheduler(
            tcfg.scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=self.total_steps
        )
        if self.strategy == "fsdp":  # sharded by training/fsdp.py: accelerate must not wrap it in DDP
            self.optimizer, self.peft_model = optimizer, self.model
            return
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.peft_model = self.accelerator.unwrap_model(self.model)

    def _load_checkpoint(self) -> None:
        """Restore adapter, optimizer, schedule and this rank's RNG state from the resume point, if any."""
        from peft import set_peft_model_state_dict

        self.start_step = 0
        if self.ckpt_path is None:
            return
        if self.strategy == "fsdp":  # this rank's shards (check_resume_layout: same world size)
            state = checkpoint.load_shard(self.ckpt_path, self.rank)
            fsdp.load_local_lora_state(self.model, state["adapter"])
            self.optimizer.load_state_dict(fsdp.sharded_optimizer_state(self.optimizer, state["optimizer"]))
            rng = state["rng"]
        else:
            state = checkpoint.load(self.ckpt_path, self.device)
            set_peft_model_state_dict(self.peft_model, state["adapter"])
            self.optimizer.load_state_dict(state["optimizer"])
            rng = state["rng"][self.rank]
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and "grad_scaler" in state["meta"]:
            self.accelerator.scaler.load_state_dict(state["meta"]["grad_scaler"])
        checkpoint.set_rng_state(rng)
        self.start_step = state["meta"]["step"]
        self._info(f"resumed from {self.ckpt_path.name} (step {self.start_step})")

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> None:
        """Optimizer steps from the resume point to the last, with eval, metrics and checkpoints between."""
        from tqdm.auto import tqdm

        tcfg, total = self.recipe.train, self.total_steps
        self.model.train()
        bar = tqdm(
            total=total, initial=self.start_step, disable=not self.main, desc="train", unit="step", file=sys.stderr
        )
        self.last_loss = float("nan")
        self.tokens_seen, self.t_loop, self.peak_rss_mb = 0, time.time(), 0.0
        for step in range(self.start_step + 1, total + 1):
            record = self._train_step(step)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step != total:
                ev = self._eval_loss()
                if ev is not None:
                    record["eval_loss"] = round(ev, 6)
            if step % tcfg.log_every == 0 or "eval_loss" in record or step == total:
                self.metrics_logger.log(record)
            bar.set_postfix(loss=f"{self.last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step != total:
                self._save_checkpoint(step)
            _test_hook_sigkill_after(step)
        bar.close()

    def _train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its metrics record.

        The loss is the mean over every supervised token of the step on all ranks (the sum of
        per-token losses divided by their count), whatever the packing or the batch split.
        """
        tcfg = self.recipe.train
        micro = [next(self.batches)[1] for _ in range(tcfg.gradient_accumulation_steps)]
        step_loss, n_local, step_tokens = self._accumulate([packing.collate(rows, self.pad_id) for rows in micro])
        grad_norm = None
        if tcfg.max_grad_norm:
            grad_norm = (
                fsdp.clip_grad_norm_(self.params, tcfg.max_grad_norm)
                if self.strategy == "fsdp"
                else float(self.accelerator.clip_grad_norm_(self.params, tcfg.max_grad_norm))
            )
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16: an overflow skips the step (and halves the scale)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        local = torch.tensor([float(step_loss), float(n_local), float(step_tokens)], device=self.device)
        totals = self.accelerator.reduce(local, reduction="sum")
        self.last_loss = float(totals[0] / max(float(totals[1]), 1.0))
        self.tokens_seen += int(totals[2])
        elapsed = time.time() - self.t_loop
        tps = self.tokens_seen / elapsed if elapsed > 0 else 0.0
        self.peak_rss_mb = max(self.peak_rss_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        record: dict[str, Any] = {
            "step": step,
            "loss": round(self.last_loss, 6),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": round(tps, 1),
        }
        if grad_norm is not None:
            record["grad_norm"] = round(grad_norm, 6)
        return record

    def _accumulate(self, collated: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int, int]:
        """Forward + backward of one step's micro-batches (each ``(mb, T)`` ids/labels, ``(mb, 1, T, T)`` mask).

        Returns this rank's summed loss, supervised-token count and non-padding token count.
        Gradients are all-reduced across ranks only on the last micro-batch (``no_sync`` before).
        """
        n_local = sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in collated)
        step_loss = torch.zeros((), device=self.device)
        step_tokens = 0
        for i, batch in enumerate(collated):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            sync = i == len(collated) - 1
            if self.strategy == "fsdp":
                no_sync = fsdp.gradient_sync(self.model, sync)
            else:
                no_sync = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)
            with no_sync, self.accelerator.autocast():
                loss, _ = packing.loss_sum(self.model, batch)
                self.accelerator.backward(loss / max(n_local, 1))
            step_loss += loss.detach()
            ids = batch["input_ids"]
            step_tokens += int((ids != self.pad_id).sum()) if self.pad_id is not None else ids.numel()
        return step_loss, n_local, step_tokens

    def _eval_loss(self) -> float | None:
        """Mean loss over the held-out examples (None without any)."""
        if not self.eval_examples:
            return None
        dcfg, tcfg = self.recipe.data, self.recipe.train
        return eval_loss(
            self.model, self.eval_examples, dcfg.max_seq_len, self.pad_id, tcfg.micro_batch_size, self.device
        )

    def _save_checkpoint(self, step: int) -> None:
        """Adapter, optimizer, schedule and every rank's RNG state (rank 0 writes)."""
        from peft import get_peft_model_state_dict

        if self.strategy == "fsdp":
            self._save_sharded_checkpoint(step)
            return
        rngs = [checkpoint.rng_state()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.main:
            checkpoint.save(
                self.run_dir,
                step,
                get_peft_model_state_dict(self.peft_model),
                self.optimizer.state_dict(),
                self.scheduler.state_dict(),
                rngs,
                {"recipe_hash": self.recipe.content_hash(), **self._scaler_meta()},
            )
        self.accelerator.wait_for_everyone()

    def _scaler_meta(self) -> dict[str, Any]:
        """fp16: the GradScaler's state (its scale and growth tracker), for a resume to continue from."""
        scaler = self.accelerator.scaler
        return {"grad_scaler": scaler.state_dict()} if scaler is not None else {}

    def _save_sharded_checkpoint(self, step: int) -> None:
        """FSDP: every rank writes its shards of the LoRA weights and optimizer state and its RNG
        state; rank 0 the schedule and metadata (strategy, world size: a resume must match them)."""
        tmp = checkpoint.sharded_tmp(self.run_dir, step)
        if self.main:
            checkpoint.begin_sharded(tmp)
        self.accelerator.wait_for_everyone()
        optimizer_shard = fsdp.local_state(self.optimizer.state_dict())
        checkpoint.save_shard(
            tmp, self.rank, fsdp.local_lora_state(self.model), optimizer_shard, checkpoint.rng_state()
        )
        self.accelerator.wait_for_everyone()
        if self.main:
            meta = {"recipe_hash": self.recipe.content_hash(), "strategy": "fsdp", "world_size": self.world}
            checkpoint.commit_sharded(tmp, self.run_dir, step, self.scheduler.state_dict(), meta)
        self.accelerator.wait_for_everyone()

    # -- finalize --------------------------------------------------------------------------------

    def finalize(self) -> TrainResult:
        """Final eval loss and adapter checksum on every rank; the main process exports the adapter;
        then every rank frees its training model and leaves the process group, and only after that
        does the main process measure the task metric and register the adapter (minutes at 7B,
        loading the base afresh: no rank waits for it in a collective, whose timeout it could pass)."""
        run_metrics = self._final_metrics()
        # FSDP: the LoRA weights gathered from every rank (a collective), for rank 0 to export.
        full_state = fsdp.full_lora_state(self.model) if self.strategy == "fsdp" else None
        self._log_checksum(full_state)
        logger.info("[rank %d] peak RSS %.1f MB", self.rank, self.peak_rss_mb)
        adapter_dir = self.run_dir / "adapter"
        if self.main:
            self._export(adapter_dir, run_metrics, full_state)
        self._leave_training()
        ref = self._publish(adapter_dir, run_metrics) if self.main else None
        return TrainResult(self.run_dir, adapter_dir, ref, run_metrics, self.main)

    def _export(
        self, adapter_dir: Path, run_metrics: dict[str, Any], full_state: dict[str, torch.Tensor] | None
    ) -> None:
        """Main process: the loss plot, and the adapter exported from the training model."""
        if "eval_loss" in run_metrics:
            self._say(f"eval loss: {run_metrics['eval_loss']:.4f}   train loss: {self.last_loss:.4f}")
        self.metrics_logger.close()
        metrics.plot_losses(self.run_dir)
        publish.export_adapter(self.peft_model, self.tokenizer, self.recipe, adapter_dir, state_dict=full_state)

    def _leave_training(self) -> None:
        """Every rank: the last barrier (the adapter is exported), then the training model freed and,
        under torchrun, the process group left, so the main process's evaluation holds no other rank."""
        self.accelerator.wait_for_everyone()
        self._release_training_model()
        if self.world > 1:
            torch.distributed.destroy_process_group()
        logger.info("[rank %d] training model freed, process group left", self.rank)

    def _publish(self, adapter_dir: Path, run_metrics: dict[str, Any]) -> str | None:
        """Main process, after :meth:`_leave_training`: measure the exported adapter's task metric,
        write its lineage and register it, mark the run done, and keep the task eval with the
        version. Returns NAME@VERSION or None."""
        reports = self.task_eval.run(adapter_dir, run_metrics, release=self._release_training_model)
        run_metrics["wall_s"] = round(time.time() - self.t_start, 1)
        ref = publish.register_run(adapter_dir, self.run_dir, self.recipe, self._training_facts(run_metrics))
        self._mark_done(ref, run_metrics)
        if ref is not None:
            publish.record_evals(ref, reports)
        return ref

    def _final_metrics(self) -> dict[str, Any]:
        """The run's summary metrics, with the final eval loss (logged as a metrics record too)."""
        run_metrics: dict[str, Any] = {
            "train_loss": self.last_loss,
            "steps": self.total_steps,
            "tokens_per_s": round(self.tokens_seen / max(time.time() - self.t_loop, 1e-9), 1),
            "trainable_params": self.n_trainable,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }
        ev = self._eval_loss()
        if ev is not None:
            run_metrics["eval_loss"] = ev
            self.metrics_logger.log({"step": self.total_steps, "eval_loss": round(ev, 6)})
        # A compact train-loss curve [[step, loss], ...] (<= 200 points, the last step kept) goes
        # into the lineage, so a registry viewer draws it without the run directory.
        log_path = self.run_dir / metrics.METRICS_FILE
        if self.main and log_path.exists():
            rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            points = [[r["step"], round(float(r["loss"]), 6)] for r in rows if "loss" in r]
            stride = max(1, math.ceil((len(points) - 1) / 199))
            run_metrics["loss_curve"] = points[:-1][::stride] + points[-1:]
        return run_metrics

    def _log_checksum(self, full_state: dict[str, torch.Tensor] | None = None) -> None:
        """Every rank logs a hash of its LoRA weights: under DDP they must all be equal (FSDP: of
        ``full_state``, the weights gathered from the shards)."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.peft_model, state_dict=full_state)
        weights = b"".join(v.detach().cpu().float().numpy().tobytes() for _, v in sorted(state.items()))
        logger.info("[rank %d] adapter checksum %s", self.rank, hashlib.sha256(weights).hexdigest())

    def _release_training_model(self) -> None:
        """Drop the training model, optimizer and their accelerate references before the eval engine
        loads the base: a 7B base on a GPU cannot be held twice (NF4 for training plus bf16 for
        serving). Reusing the training weights is no option: they are PEFT-wrapped and quantized
        as trained, not as served. The adapter is already exported; nothing after this needs them."""
        self.accelerator.free_memory()
        self.model = self.peft_model = self.optimizer = self.scheduler = self.params = None  # type: ignore[assignment]
        release_memory()

    def _mark_done(self, ref: str | None, run_metrics: dict[str, Any]) -> None:
        """done.json (a re-run of the recipe starts over), then drop the checkpoints."""
        done = {"ref": ref, "metrics": run_metrics}
        (self.run_dir / "done.json").write_text(json.dumps(done, indent=2, default=str))
        for old in checkpoint.list_complete(self.run_dir):
            shutil.rmtree(old, ignore_errors=True)

    def _training_facts(self, run_metrics: dict[str, Any]) -> dict[str, Any]:
        """What only the trainer knows about the adapter; the registry's lineage builder adds the rest."""
        recipe = self.recipe
        return {
            "recipe": recipe.to_dict(),
            "recipe_hash": recipe.content_hash(),
            "dataset_fingerprint": data.fingerprint(self.train_records),
            "eval_dataset_fingerprint": data.fingerprint(self.eval_records) if self.eval_records else None,
            "data_audit": self.audit.to_dict(),
            "metrics": run_metrics,
            "run_dir": str(self.run_dir),
            "distributed": {"strategy": self.strategy, "world_size": self.world},
        }


def train(recipe: Recipe, resume: bool | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run a recipe end to end (see :class:`Trainer` for ``resume`` and ``log``)."""
    return Trainer(recipe, resume=resume, log=log).run()
