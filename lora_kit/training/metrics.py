"""Training metrics: where the per-step records go (JSONL + TensorBoard), and the loss plot.

The trainer sees one :class:`MetricsLogger` and calls ``log(record)`` with a flat dict per
logged step (``{"step": 12, "loss": 0.41, "lr": 1e-4, ...}``) and ``close()`` at the end.
Only the main process writes: the other DDP ranks get a :class:`NullLogger`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss_curve.png"


class MetricsLogger(Protocol):
    """A sink for per-step metric records (each has an int ``step``)."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """Logs nothing (DDP ranks other than the main one)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """One JSON line per record in ``run_dir/metrics.jsonl``.

    On resume from step ``resume_step``, lines past that step are dropped first: the steps
    after the checkpoint are run again and logged again, so the file holds each step once.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Every numeric value of a record as a scalar at ``record["step"]`` in ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path, resume_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard hides the events a killed run wrote past the checkpoint.
        self.writer = SummaryWriter(
            str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None
        )

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class FanOut:
    """Sends each record to several loggers."""

    def __init__(self, *loggers: MetricsLogger) -> None:
        self.loggers = loggers

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def run_logger(run_dir: Path, main_process: bool, resume_step: int = 0) -> MetricsLogger:
    """The trainer's logger: JSONL + TensorBoard on the main process, nothing elsewhere."""
    if not main_process:
        return NullLogger()
    return FanOut(JsonlLogger(run_dir, resume_step), TensorBoardLogger(run_dir, resume_step))


def plot_losses(run_dir: Path) -> Path | None:
    """``run_dir/loss_curve.png``: train loss per step and eval loss, from metrics.jsonl (None if absent)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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
    out = Path(run_dir) / LOSS_PLOT
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
