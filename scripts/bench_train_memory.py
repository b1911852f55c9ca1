"""Training memory: `lora-kit plan` vs the measured peak RSS, per phase, for several micro batches.

Each recipe variant runs in a fresh child process (a process's peak RSS never goes down), which
reports the peak RSS (``VmHWM``) of every phase of a run, resetting the peak between phases
(``/proc/self/clear_refs``, Linux): after imports, model setup, the training steps, the eval
loss, and the end-of-run task eval through the serving engine. The parent prints the plan's
total next to the measured peak of the training phases (setup, steps, eval loss) and their ratio.

    python scripts/bench_train_memory.py [--recipe recipes/demo-sentiment.yaml] [--micro-batch 1 4 8]
        [--steps 6] [--task-eval]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024**2


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(recipe_path: str, micro_batch: int, steps: int, task_eval: bool) -> None:
    """One measured run; prints one JSON line: phase -> (peak RSS MB, RSS after MB, seconds)."""
    phases: dict[str, dict[str, float]] = {}

    def mark(name: str, t0: float) -> None:
        phases[name] = {
            "peak_mb": _status_kb("VmHWM") / 1024,
            "after_mb": _status_kb("VmRSS") / 1024,
            "s": round(time.time() - t0, 2),
        }
        _reset_peak()

    t0 = time.time()
    import torch  # noqa: F401

    from lora_kit.training import recipe as recipe_mod
    from lora_kit.training.trainer import Trainer

    mark("imports", t0)
    overrides = [
        f"train.micro_batch_size={micro_batch}",
        f"train.max_steps={steps}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "output.register_adapter=false",
    ]
    if not task_eval:
        overrides.append("eval.task_metric=none")
    r = recipe_mod.load(recipe_path, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        r.output.run_dir = tmp
        trainer = Trainer(r, resume=False, log=lambda _m: None)
        t0 = time.time()
        trainer.setup()
        mark("setup", t0)
        t0 = time.time()
        trainer.fit()
        mark("train steps", t0)
        t0 = time.time()
        trainer._eval_loss()
        mark("eval loss", t0)
        if task_eval:
            t0 = time.time()
            trainer.finalize()
            mark("finalize (task eval)", t0)
    print(json.dumps(phases))


def planned_bytes(recipe_path: str, micro_batch: int) -> tuple[int, list[dict]]:
    from lora_kit.training import plan
    from lora_kit.training import recipe as recipe_mod

    r = recipe_mod.load(recipe_path, [f"train.micro_batch_size={micro_batch}"])
    report = plan.plan(r, device="cpu")
    return report["memory"]["total_bytes"], report["memory"]["terms"]


def run_child(recipe_path: str, micro_batch: int, steps: int, task_eval: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--recipe", recipe_path, "--micro-batch", str(micro_batch)]
    cmd += ["--steps", str(steps)] + (["--task-eval"] if task_eval else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "demo-sentiment.yaml"))
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    ap.add_argument("--task-eval", action="store_true", help="also measure the end-of-run task eval")
    ap.add_argument("--terms", action="store_true", help="print the plan's terms too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.recipe, args.micro_batch[0], args.steps, args.task_eval)
        return
    print("| micro batch | plan (MB) | measured peak, training (MB) | measured / plan | peak per phase (MB) |")
    print("|---:|---:|---:|---:|---|")
    for mb in args.micro_batch:
        total, terms = planned_bytes(args.recipe, mb)
        phases = run_child(args.recipe, mb, args.steps, args.task_eval)
        training = max(p["peak_mb"] for name, p in phases.items() if not name.startswith("finalize"))
        detail = ", ".join(f"{name} {p['peak_mb']:.0f} (after {p['after_mb']:.0f})" for name, p in phases.items())
        print(f"| {mb} | {total / MiB:.0f} | {training:.0f} | {training * MiB / total:.2f} | {detail} |")
        if args.terms:
            for t in terms:
                print(f"|   | {t['bytes'] / MiB:.0f} | {t['name']} | | |")


if __name__ == "__main__":
    main()
