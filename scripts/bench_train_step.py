"""One training step's forward + backward: lora-kit's CPU LoRA forward (training/fast_lora.py) vs PEFT's own.

The demo recipe's model as the trainer sets it up (SmolLM2-135M-Instruct in NF4, fp32 compute,
r=8 all-linear, dropout 0.05), in one process. Each round times the same ``--micro-batches``
packed micro-batches (the trainer's own, forward + backward, gradients discarded) once with
the fast forward installed and once with every LoRA layer back on PEFT's forward, alternating;
prints the best of ``--rounds`` of each and their ratio. Measures what BENCHMARKS.md's
"1.33x per step" (issue 15) states:

    .venv/bin/python scripts/bench_train_step.py [--recipe recipes/demo-sentiment.yaml] [--micro-batches 3] [--rounds 3]

Smoke check (seconds): ``--recipe recipes/tiny-mistral-smoke.yaml --set model.base=DIR --rounds 1``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from _harness import ROOT, cpu_summary

from lora_kit.training import fast_lora, packing
from lora_kit.training import recipe as recipe_mod
from lora_kit.training.trainer import Trainer


def peft_forward(model: torch.nn.Module) -> int:
    """Put every layer that ``fast_lora.install`` changed back on PEFT's forward; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "_lora_kit_peft_forward"):
            module.forward = module._lora_kit_peft_forward
            del module._lora_kit_peft_forward
            count += 1
    return count


def timed(trainer: Trainer, collated: list[dict[str, torch.Tensor]]) -> float:
    """Seconds of the forward + backward of ``collated`` (the trainer's own step body, no optimizer step)."""
    start = time.perf_counter()
    trainer._accumulate(collated)  # the step's micro-batches, as Trainer._train_step runs them
    took = time.perf_counter() - start
    trainer.model.zero_grad(set_to_none=True)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "demo-sentiment.yaml"))
    ap.add_argument("--set", action="append", default=[], help="a recipe override (key.path=value)")
    ap.add_argument("--micro-batches", type=int, default=3, help="micro-batches timed per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = recipe_mod.load(args.recipe, [*args.set, "eval.task_metric=none", "output.register_adapter=false"])
        r.output.run_dir = tmp
        trainer = Trainer(r, resume=False, log=lambda _msg: None)
        trainer.setup()  # installs the fast forward (one process, no FSDP)
        trainer.model.train()
        collated = [packing.collate(next(trainer.batches)[1], trainer.pad_id) for _ in range(args.micro_batches)]
        fast, peft = [], []
        timed(trainer, collated)  # warm-up
        for i in range(args.rounds):
            fast.append(timed(trainer, collated))
            n = peft_forward(trainer.model)
            peft.append(timed(trainer, collated))
            fast_lora.install(trainer.model)
            print(f"round {i + 1}/{args.rounds} done ({n} LoRA layers switched)", file=sys.stderr)
    rows = collated[0]["input_ids"].shape
    print(f"\n{r.model.base} ({r.model.quantization}), r={r.lora.r}, dropout {r.lora.dropout}, {args.micro_batches} "
          f"micro-batches of {rows[0]} x {rows[1]} tokens, forward + backward, best of {args.rounds}, "
          f"torch threads {torch.get_num_threads()}\nCPU: {cpu_summary()}")  # fmt: skip
    print("| LoRA forward | seconds |\n|---|---:|")
    print(f"| PEFT's | {min(peft):.2f} |\n| lora-kit's (fast_lora.py) | {min(fast):.2f} |")
    print(f"speed-up: {min(peft) / min(fast):.2f}x")


if __name__ == "__main__":
    main()
