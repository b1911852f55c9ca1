"""lora-kit's whole path on a true-shape random Mistral checkpoint: peak RSS and wall time of each step.

By hand only (minutes on ``mistral-tiny``, about an hour or more at ``mistral-7b`` on 2 cores; never
in CI). Issue #23, item 2.

**What it measures**, one step after the other (each a subprocess; nothing runs concurrently):

- ``make``: ``scripts/make_random_model.py --shape SHAPE`` writes the bf16 checkpoint (skipped with
  ``--model-dir``).
- ``plan``: ``lora-kit plan --json --device cpu`` of the production recipe
  (``recipes/mistral-7b-instruct-v0.1-qlora.yaml``) with the benchmark's overrides (below); its
  ``memory.total_bytes`` is the planned peak.
- ``train``: ``lora-kit train`` with the same overrides, SIGKILLed (its whole process group) once
  the step-2 checkpoint is complete (``RUN/checkpoints/step-0000002/complete.json``), then
  ``lora-kit train --resume`` to step 3, which also runs the end-of-run evaluation and registers
  the adapter. The ratio plan / measured uses the larger peak of the two processes; a second ratio
  uses the training-only peaks (the killed process, and the resumed loop's own ``peak_rss_mb`` from
  ``RUN/done.json``), since the resumed process's peak includes the end-of-run evaluation.
- ``eval``: ``lora-kit eval REF --data EVAL --max-examples 4 --max-tokens 8``.
- ``serve``: 7 random rank-16 all-linear adapters and the trained one registered, ``lora-kit serve
  --model CHECKPOINT --preload`` (all 8), one request on the trained adapter, then 8 concurrent
  requests on the 8 adapters: tokens/s, seconds per token, and the server's peak RSS.
- ``llama`` (only with ``--llama``): the checkpoint converted to GGUF Q8_0 (``convert_hf_to_gguf.py
  --outtype q8_0``) and Q4_0 (``llama-quantize --allow-requantize`` of the Q8_0 file, which saves
  a 14.5 GB f16 intermediate), the 8 adapters to f16 GGUF, ``llama-server`` with the same prompts
  and token counts; ratios lora-kit / llama.cpp. The GGUFs are deleted afterwards.
- ``merge``: ``lora-kit adapters merge REF OUT``, ``lora-kit adapters export REF DEST --target
  gguf``, then a subprocess loads the merged model with transformers (``low_cpu_mem_usage``, bf16)
  and runs one forward of a few tokens. The merged model is deleted afterwards.

The overrides (``recipe_overrides``): the checkpoint as ``model.base``; a generated messages JSONL of
32 examples of about 200 tokens (so rows of 256 tokens pack) and a 4-example eval file;
``data.max_seq_len`` 256, micro batch 1, no accumulation, ``adamw``, gradient checkpointing,
``train.max_steps`` 3, a checkpoint every step, ``eval.max_examples`` 4, ``eval.max_new_tokens`` 8.
The recipe's NF4 quantization, r=16 all-linear and everything else stay as the recipe has them.

**How**: each step is a subprocess in its own process group; its peak RSS is ``ru_maxrss`` of the
rusage ``os.wait4`` returns (the process, or its largest waited-for descendant: the maximum, not a
sum); a server's is VmHWM of its process tree (``bench_vs_llamacpp.peak_rss_mib``), read just before
it is stopped. Wall time is from the start of the subprocess to its exit. Before each step the free
disk of ``--work-dir`` and MemAvailable (``/proc/meminfo``) are checked against what that step needs
(``step_needs``; e.g. the 7B checkpoint is 14.5 GB on disk); a step that does not fit is refused
with what it needs and what there is (``--force`` only warns). Where the base is loaded to serve (the
end-of-run evaluation, ``eval``, ``serve``) the need follows the precision it is loaded at: the
step's flags (``--eval-args '--precision bf16w'``, ``--serve-args '--weight-dtype bfloat16'``), else
the product's serving default for this checkpoint on this CPU
(``lora_kit.evaluation.runner.serving_precision``: bf16 weights for a 7B on a 24 GiB machine,
where fp32 would take ~31 GiB). Every temporary home,
registry and run directory is under ``--work-dir`` (``LORA_KIT_HOME=WORK/home``, sharing the real
home's compiled kernels); nothing is written to the user's registry.

**Pitfalls**:

- The machine must be otherwise idle: a test suite or a second benchmark meanwhile changes both
  times and (through the page cache) what fits. Before the servers the script waits (up to 60 s)
  for quiet CPUs, as ``bench_vs_llamacpp.py`` does.
- The random adapters are written directly from ``config.json`` (PEFT's file layout, N(0, 0.02)
  A and B), not with ``_harness.random_adapter``, which loads the base in fp32: 29 GB at 7B.
- A 7B model on 2 CPU cores decodes at seconds per token: keep ``--tokens`` small (16 default).
- The random checkpoint has no chat template (lora-kit uses its built-in v0.1 format);
  llama-server's ``--jinja`` then falls back to its own default template, so the prompt token
  counts of the two servers may differ a little (they are printed).
- ``ru_maxrss`` counts pages touched, including a checkpoint's mmapped safetensors pages that were
  read: that is what the machine had to hold, which is what the issue asks.
- The first training process may reach step 3 before the poll sees the step-2 checkpoint (only on
  tiny shapes); it is then killed during its end-of-run evaluation, which is still after step 2.

**How long at 7B** (2 cores, 24 GiB): make ~5-10 min; plan seconds; train: NF4 quantization of the
base on load (minutes, twice: once per process) and 3 steps at seq 256 (minutes each) plus the
end-of-run evaluation (loads the base again, at serving precision, and at NF4); eval and serve each
load the base once more (minutes) and decode at seconds per token; merge minutes. Expect 1-2 hours;
``--timeout-per-step`` (default 3600 s) bounds each subprocess.

    .venv/bin/python scripts/bench_true_size.py --shape mistral-tiny --tokens 4          # 2-3 minutes
    .venv/bin/python scripts/bench_true_size.py --work-dir /data/bench7b --keep --json bench7b.json
    .venv/bin/python scripts/bench_true_size.py --dry-run                                  # commands only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent


def load_script(name: str) -> ModuleType:
    """``scripts/NAME.py`` as the module ``NAME``, loaded by path (scripts/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


harness = load_script("_harness")  # first: bench_vs_llamacpp imports it as `_harness`
vs = load_script("bench_vs_llamacpp")
V01_TEMPLATE, chat_template_flags = vs.V01_TEMPLATE, vs.chat_template_flags  # llama-server's prompt format
mrm = load_script("make_random_model")

RECIPE = ROOT / "recipes" / "mistral-7b-instruct-v0.1-qlora.yaml"
STEPS = ["make", "plan", "train", "eval", "serve", "llama", "merge"]
DEFAULT_STEPS = ["make", "plan", "train", "eval", "serve", "merge"]
ADAPTER_NAME = "bench-true-size"
RANDOM_ADAPTERS = 7
RANK = 16
TRAIN_EXAMPLES, EVAL_EXAMPLES = 32, 4
SEQ_LEN, MAX_STEPS, KILL_AFTER = 256, 3, 2
GB, GiB, MiB = 10**9, 2**30, 2**20
LLAMA_KINDS = ["q8_0", "q4_0"]
WORDS = (
    "the a model adapter train serve memory token layer weight batch step value cat dog river mountain "
    "green blue quick slow bright dark morning evening number letter window garden music paper stone"
).split()


class StepFailed(Exception):
    """A step could not run or failed; the message is the table's status."""


# -- pure helpers --------------------------------------------------------------------------------


def checkpoint_bytes(config: dict[str, Any]) -> int:
    """The bf16 checkpoint's tensor bytes for ``config`` (make_random_model's own tensor list)."""
    return sum(mrm.nbytes(shape) for _, shape in mrm.tensor_shapes(config))


def meminfo_available(text: str) -> int:
    """MemAvailable of a /proc/meminfo text, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemAvailable line in /proc/meminfo")


# bytes per parameter of the base as `lora-kit serve`/`eval` hold it, by precision (runner.PRECISIONS);
# nf4/fp4: 4-bit weights plus bf16 embeddings, norms and the head, about 0.6 bytes per parameter at 7B
BYTES_PER_PARAM = {"fp32": 4.0, "bf16w": 2.0, "int8w": 1.13, "bf16": 2.0, "fp16": 2.0, "nf4": 0.6, "fp4": 0.6}


def flag_precision(step: str, extra: str, default: str) -> str:
    """The base's precision a step's extra flags ask for (``eval``: ``--precision``; ``serve``:
    ``--quantization``, ``--weight-dtype``), else ``default`` (the product's own default here)."""
    words = shlex.split(extra)
    flags: dict[str, str] = {}
    for i, word in enumerate(words):
        key, eq, value = word.partition("=")
        if key.startswith("--"):
            flags[key] = value if eq else (words[i + 1] if i + 1 < len(words) else "")
    if step == "eval" and flags.get("--precision") in BYTES_PER_PARAM:
        return flags["--precision"]
    if step == "serve":
        if flags.get("--quantization") in ("nf4", "fp4"):
            return flags["--quantization"]
        dtype = flags.get("--weight-dtype")
        if dtype in ("bfloat16", "float32", "int8"):
            return {"bfloat16": "bf16w", "float32": "fp32", "int8": "int8w"}[dtype]
    return default


def step_needs(step: str, model_bytes: int, planned: Optional[int] = None, precision: str = "bf16w") -> tuple[int, int]:
    """(free disk, available memory) in bytes a step needs, for a bf16 checkpoint of ``model_bytes``.

    make: the checkpoint on disk, one fp32 embedding in memory. eval/serve: the base's weights at
    ``precision`` (fp32: twice the bf16 bytes), +10%, +1 GiB. train: the plan's peak when known
    (else a third of the bf16 bytes, NF4, + 2 GiB), and at least what its end-of-run evaluation
    needs (it loads the base again at serving ``precision``, after releasing the training model); a
    GiB of checkpoints. llama: Q8_0 (~0.53x) + Q4_0 (~0.28x) GGUFs on disk, the Q8_0 server in
    memory. merge: the merged bf16 model on disk, the base held once in memory.
    """
    small = 2 * GiB
    served = int(model_bytes / 2 * BYTES_PER_PARAM[precision] * 1.1) + GiB
    needs = {
        "make": (int(model_bytes * 1.02) + 100 * MiB, small),
        "plan": (0, small),
        "train": (GiB, max(planned if planned else model_bytes // 3 + small, served)),
        "eval": (0, served),
        "serve": (2 * GiB, served),
        "llama": (int(model_bytes * 0.85) + GiB, int(model_bytes * 0.55) + GiB),
        "merge": (int(model_bytes * 1.02) + GiB, int(model_bytes * 1.1) + GiB),
    }
    return needs[step]


def shortage(step: str, need: tuple[int, int], have: tuple[int, int], where: Path) -> Optional[str]:
    """None when ``have`` (free disk, available memory) covers ``need``; else what is short, in words."""
    short = []
    if have[0] < need[0]:
        short.append(f"{need[0] / GB:.1f} GB free disk in {where} (has {have[0] / GB:.1f} GB)")
    if have[1] < need[1]:
        short.append(f"{need[1] / GiB:.1f} GiB available memory (has {have[1] / GiB:.1f} GiB)")
    return f"{step} needs {' and '.join(short)}" if short else None


def example(i: int, words: int = 150) -> dict:
    """A messages example of about 200 tokens (``words`` words of user text, a one-word answer)."""
    text = " ".join(WORDS[(i * 7 + j * 3 + j // 5) % len(WORDS)] for j in range(words))
    answer = "positive" if i % 2 else "negative"
    return {"messages": [{"role": "user", "content": f"Classify: {text}"}, {"role": "assistant", "content": answer}]}


def write_data(out: Path) -> tuple[Path, Path]:
    """The training (32 examples) and eval (4 examples) messages JSONL files under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    train, evaluation = out / "train.jsonl", out / "eval.jsonl"
    train.write_text("".join(json.dumps(example(i)) + "\n" for i in range(TRAIN_EXAMPLES)))
    evaluation.write_text("".join(json.dumps(example(1000 + i)) + "\n" for i in range(EVAL_EXAMPLES)))
    return train, evaluation


def recipe_overrides(base: Path, train: Path, evaluation: Path) -> list[str]:
    """The ``--set`` values that turn the production recipe into the 3-step benchmark run."""
    values = {
        "model.base": base,
        "data.train": train,
        "data.eval": evaluation,
        "data.max_seq_len": SEQ_LEN,
        "train.micro_batch_size": 1,
        "train.gradient_accumulation_steps": 1,
        "train.optimizer": "adamw",
        "train.gradient_checkpointing": "true",
        "train.max_steps": MAX_STEPS,
        "train.checkpoint_every": 1,
        "train.eval_every": 0,
        "train.log_every": 1,
        "eval.max_examples": EVAL_EXAMPLES,
        "eval.max_new_tokens": 8,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def lora_kit(*args: object) -> list[str]:
    return [sys.executable, "-m", "lora_kit", *map(str, args)]


def train_command(overrides: list[str], run_dir: Path, resume: bool) -> list[str]:
    return lora_kit("train", RECIPE, *overrides, "--name", ADAPTER_NAME, "--run-dir", run_dir) + (
        ["--resume"] if resume else []
    )


def checkpoint_done(run_dir: Path, step: int) -> Path:
    """The file that marks checkpoint ``step`` complete (training/checkpoint.py's layout)."""
    return run_dir / "checkpoints" / f"step-{step:07d}" / "complete.json"


def registered_ref(stdout: str) -> Optional[str]:
    """The NAME@VERSION `lora-kit train` prints last."""
    found = re.findall(r"^([a-z0-9][a-z0-9._-]*@[\w.-]+)\s*$", stdout, re.M)
    return found[-1] if found else None


def adapter_shapes(config: dict[str, Any], rank: int) -> dict[str, tuple[int, int]]:
    """PEFT's saved key -> shape of every LoRA A and B of an all-linear rank-``rank`` adapter."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip
    shapes = {}
    for layer in range(config["num_hidden_layers"]):
        for module in harness.linear_targets():
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            d_in, d_out = dims[module]
            shapes[f"{prefix}.lora_A.weight"] = (rank, d_in)
            shapes[f"{prefix}.lora_B.weight"] = (d_out, rank)
    return shapes


def write_random_adapter(base: Path, out: Path, seed: int, rank: int = RANK, std: float = 0.02) -> Path:
    """A random PEFT LoRA adapter (all linear layers, rank ``rank``, alpha 2 * rank) on ``base``,
    written from its config.json without loading the base (``_harness.random_adapter`` loads it in
    fp32: 29 GB at 7B). A and B ~ N(0, std^2), fp32, seeded; PEFT's file names and config keys."""
    import numpy as np
    from safetensors.numpy import save_file

    config = json.loads((base / "config.json").read_text())
    gen = np.random.default_rng(seed)
    shapes = adapter_shapes(config, rank)
    tensors = {key: (gen.standard_normal(shape, dtype=np.float32) * std) for key, shape in shapes.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base), "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": harness.linear_targets(), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return out


def fmt_mib(mib: Optional[float]) -> str:
    return "-" if mib is None else (f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB")


def fmt_s(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds:.2f} s"


@dataclass
class Row:
    """One line of the table: a measured subprocess (or a server)."""

    step: str
    what: str
    status: str = "ok"
    peak_mib: Optional[float] = None
    seconds: Optional[float] = None
    notes: str = ""


def table(rows: list[Row]) -> list[str]:
    lines = ["| step | what | peak RSS | wall time | status | notes |", "|---|---|---:|---:|---|---|"]
    for r in rows:
        cells = [r.step, r.what, fmt_mib(r.peak_mib), fmt_s(r.seconds), r.status, r.notes]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return lines


def last_line(*logs: Path) -> str:
    """The last non-empty line of the first log that has one (a failure's message)."""
    for log in logs:
        try:
            lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            continue
        if lines:
            return lines[-1][:300]
    return "(no output)"


# -- running and measuring -----------------------------------------------------------------------


@dataclass
class Measured:
    code: int
    seconds: float
    peak_mib: float
    out: Path
    err: Path
    killed: bool = False
    timed_out: bool = False
    events: dict[str, float] = field(default_factory=dict)
    events_peak_mib: dict[str, float] = field(default_factory=dict)

    def failure(self) -> Optional[str]:
        if self.timed_out:
            return f"failed: timed out after {self.seconds:.0f} s"
        if self.code != 0 and not self.killed:
            return f"failed (exit {self.code}): {last_line(self.err, self.out)}"
        return None


def run_measured(
    command: list[str],
    logs: Path,
    env: dict[str, str],
    timeout: float,
    kill_when: Optional[Callable[[], bool]] = None,
    watch: Optional[dict[str, Path]] = None,
) -> Measured:
    """Run ``command`` (its own process group; stdout to ``LOGS.out``, stderr to ``LOGS.log``) to its
    end; SIGKILL its group once ``kill_when()`` is true or after ``timeout`` s. ``watch``: label ->
    path, the seconds after the start at which each path first exists are in ``events``, and the
    process tree's peak RSS (VmHWM) at that moment in ``events_peak_mib``."""
    out, err = logs.with_suffix(".out"), logs.with_suffix(".log")
    print(f"$ {shlex.join(command)}", file=sys.stderr, flush=True)
    start = time.monotonic()
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, start_new_session=True
        )
    killed = timed_out = False
    events: dict[str, float] = {}
    events_peak: dict[str, float] = {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for label, path in (watch or {}).items():
            if label not in events and path.exists():
                events[label] = time.monotonic() - start
                events_peak[label] = vs.peak_rss_mib(proc.pid)
        over = time.monotonic() - start > timeout
        if over or (kill_when is not None and kill_when()):
            killed, timed_out = not over, over
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    try:  # anything the process left behind in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    peak = usage.ru_maxrss / 1024
    return Measured(proc.returncode, seconds, peak, out, err, killed, timed_out, events, events_peak)


def free_disk(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def available_memory() -> int:
    return meminfo_available(Path("/proc/meminfo").read_text())


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    rows: list[Row] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    model: Optional[Path] = None
    ref: Optional[str] = None
    adapter_dir: Optional[Path] = None
    planned: Optional[int] = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "LORA_KIT_HOME": str(self.work / "home")}

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def model_bytes(self) -> int:
        if self.model is not None and (self.model / "config.json").is_file():
            return checkpoint_bytes(json.loads((self.model / "config.json").read_text()))
        return checkpoint_bytes(mrm.shape_config(self.args.shape))

    def precision(self, step: str) -> str:
        """The base's precision in ``step``: its extra flags', else the product's serving default."""
        try:
            from lora_kit.evaluation.runner import serving_precision

            default = serving_precision(str(self.model)) if self.model is not None else serving_precision()
        except Exception:  # noqa: BLE001 - a guess for the preflight only
            default = "fp32"
        extra = {"eval": self.args.eval_args, "serve": self.args.serve_args}.get(step, "")
        return flag_precision(step, extra, default)

    def preflight(self, step: str) -> None:
        precision = self.precision(step)
        need = step_needs(step, self.model_bytes(), self.planned if step == "train" else None, precision)
        have = (free_disk(self.work), available_memory())
        print(
            f"[{step}] needs {need[0] / GB:.1f} GB disk, {need[1] / GiB:.1f} GiB memory"
            + (f" (the base served at {precision})" if step in ("train", "eval", "serve") else "")
            + f"; has {have[0] / GB:.1f} GB, {have[1] / GiB:.1f} GiB",
            file=sys.stderr,
        )
        short = shortage(step, need, have, self.work)
        if short and step in ("train", "eval", "serve") and precision == "fp32":
            hint = {"serve": "--serve-args '--weight-dtype bfloat16'", "eval": "--eval-args '--precision bf16w'"}
            short += f" with the base at fp32; {hint.get(step, 'a bf16 serving default in the product')} halves it"
            if step == "train":
                short += " (the end-of-run evaluation loads the base again at the serving precision)"
        if short and not self.args.force:
            raise StepFailed(f"refused: {short} (--force runs it anyway)")
        if short:
            print(f"warning: {short}; running anyway (--force)", file=sys.stderr)

    def measure(self, step: str, what: str, command: list[str], name: str, **kw: Any) -> tuple[Row, Measured]:
        m = run_measured(command, self.logs / name, self.env, self.args.timeout_per_step, **kw)
        row = Row(step, what, m.failure() or "ok", m.peak_mib, m.seconds)
        self.rows.append(row)
        self.results.setdefault(step, {})[name] = {
            "command": command, "code": m.code, "seconds": m.seconds, "peak_mib": m.peak_mib,
            "killed": m.killed, "timed_out": m.timed_out, "events": m.events,
            "events_peak_mib": m.events_peak_mib, "status": row.status,
        }  # fmt: skip
        return row, m

    # -- the steps ------------------------------------------------------------------------------

    def step_make(self) -> None:
        out = self.work / f"model-{self.args.shape}"
        if (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file():
            self.model = out
            self.rows.append(Row("make", f"checkpoint {self.args.shape}", "ok", notes=f"reused {out}"))
            return
        self.preflight("make")
        command = [sys.executable, str(SCRIPTS / "make_random_model.py"), "--shape", self.args.shape, str(out)]
        row, m = self.measure("make", f"make_random_model.py --shape {self.args.shape}", command, "make")
        if m.failure():
            raise StepFailed(row.status)
        self.model = out
        row.notes = f"{sum(f.stat().st_size for f in out.glob('*.safetensors')) / GB:.2f} GB of safetensors"

    def overrides(self) -> list[str]:
        assert self.model is not None
        train, evaluation = write_data(self.work / "data")
        return recipe_overrides(self.model, train, evaluation)

    def step_plan(self) -> None:
        self.preflight("plan")
        command = lora_kit("plan", RECIPE, *self.overrides(), "--json", "--device", "cpu")
        row, m = self.measure("plan", "lora-kit plan --json (production recipe)", command, "plan")
        if m.failure():
            raise StepFailed(row.status)
        report = json.loads(m.out.read_text())
        self.planned = int(report["memory"]["total_bytes"])
        data = report.get("data", {})
        row.notes = f"planned peak {self.planned / GiB:.2f} GiB; {data.get('rows', '?')} rows of {SEQ_LEN}"
        self.results["plan"]["report"] = report

    def step_train(self) -> None:
        self.preflight("train")
        overrides, run_dir = self.overrides(), self.work / "run"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        marker = checkpoint_done(run_dir, KILL_AFTER)
        watch = {"step1": checkpoint_done(run_dir, 1), "step2": marker}
        row1, first = self.measure(
            "train", f"train, SIGKILL at the step-{KILL_AFTER} checkpoint", train_command(overrides, run_dir, False),
            "train-1", kill_when=marker.exists, watch=watch,
        )  # fmt: skip
        if first.failure():
            raise StepFailed(row1.status)
        if not first.killed:
            row1.status = "ok, but it finished before the kill"
            self.ref = registered_ref(first.out.read_text())
        else:
            ev = first.events
            if "step1" in ev and "step2" in ev:
                row1.notes = f"step 1->2 checkpoint {ev['step2'] - ev['step1']:.1f} s (one step + checkpoint write)"
            row2, second = self.measure(
                "train", f"train --resume to step {MAX_STEPS} (+ end-of-run eval, register)",
                train_command(overrides, run_dir, True), "train-2",
                watch={"exported": run_dir / "adapter" / "adapter_model.safetensors", "done": run_dir / "done.json"},
            )  # fmt: skip
            if second.failure():
                raise StepFailed(row2.status)
            self.ref = registered_ref(second.out.read_text())
            self.end_of_run_eval_row(second)
        self.adapter_dir = run_dir / "adapter"
        self.train_notes(run_dir, first)
        if self.ref is None:
            raise StepFailed("failed: `lora-kit train` printed no NAME@VERSION")

    def end_of_run_eval_row(self, second: Measured) -> None:
        """The end-of-run evaluation's time (from the adapter's export to done.json: the task eval
        and the registration) and whether it set the resumed process's peak (its VmHWM at the
        export vs the final ru_maxrss)."""
        ev, at = second.events, second.events_peak_mib
        if "exported" not in ev or "done" not in ev:
            return
        before = at["exported"]
        if second.peak_mib > before * 1.02:
            peak, note = second.peak_mib, f"set the resumed process's peak (it was {fmt_mib(before)} at the export)"
        else:
            peak, note = None, f"stayed under the training peak ({fmt_mib(before)} at the export)"
        self.rows.append(
            Row("train", "end-of-run eval + register (inside the resumed process)", "ok", peak,
                ev["done"] - ev["exported"], note)
        )  # fmt: skip

    def train_notes(self, run_dir: Path, first: Measured) -> None:
        """The plan / measured ratios and seconds per step, as one more row."""
        runs = self.results["train"]
        peak = max(r["peak_mib"] for r in runs.values())
        loop_peak = None
        done = run_dir / "done.json"
        if done.is_file():
            loop_peak = json.loads(done.read_text()).get("metrics", {}).get("peak_rss_mb")
        metrics_file = run_dir / "metrics.jsonl"
        steps = []
        if metrics_file.is_file():
            recs = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()]
            steps = [f"step {r['step']} {r['tokens_per_s']:.0f} tok/s" for r in recs if "tokens_per_s" in r]
        notes = [f"training peak {fmt_mib(peak)} (both processes; the resumed one includes the end-of-run eval)"]
        train_only = max([first.peak_mib] + ([loop_peak] if loop_peak else []))
        if self.planned:
            plan_mib = self.planned / MiB
            notes.append(f"plan {fmt_mib(plan_mib)}: plan/measured {plan_mib / peak:.2f}")
            notes.append(
                f"plan/training-only peak ({fmt_mib(train_only)}) {plan_mib / train_only:.2f} (goal 0.85-1.15)"
            )
        if loop_peak:
            notes.append(f"resumed loop's own peak {fmt_mib(loop_peak)}")
        notes += steps
        self.rows.append(Row("train", "plan vs measured", "ok", notes="; ".join(notes)))
        runs["summary"] = {"peak_mib": peak, "train_only_peak_mib": train_only, "planned_bytes": self.planned,
                           "loop_peak_mib": loop_peak, "steps": steps}  # fmt: skip

    def step_eval(self) -> None:
        self.preflight("eval")
        assert self.ref is not None
        evaluation = self.work / "data" / "eval.jsonl"
        command = lora_kit("eval", self.ref, "--data", evaluation, "--max-examples", EVAL_EXAMPLES, "--max-tokens", 8)
        command += shlex.split(self.args.eval_args)
        row, m = self.measure("eval", f"lora-kit eval {self.ref}, {EVAL_EXAMPLES} examples", command, "eval")
        if m.failure():
            raise StepFailed(row.status)

    def adapters(self) -> dict[str, Path]:
        """a0..a7: 7 random adapters and the trained one (a random a7 when training did not run)."""
        assert self.model is not None
        out = self.work / "adapters"
        made = {f"a{i}": out / f"a{i}" for i in range(RANDOM_ADAPTERS)}
        made["a7"] = self.adapter_dir if self.adapter_dir and self.adapter_dir.is_dir() else out / "a7"
        for i, path in enumerate(made.values()):
            if not (path / "adapter_model.safetensors").is_file():
                write_random_adapter(self.model, path, seed=i)
        return made

    def register(self, adapters: dict[str, Path]) -> None:
        assert self.model is not None
        start = time.monotonic()
        harness.share_models_and_kernels(self.work / "home")
        for name, path in adapters.items():
            add = lora_kit("adapters", "add", path, "--name", name, "--base", self.model)
            m = run_measured(add, self.logs / f"add-{name}", self.env, self.args.timeout_per_step)
            if m.failure():
                raise StepFailed(f"adapters add {name} {m.failure()}")
        trained = self.adapter_dir is not None and adapters["a7"] == self.adapter_dir
        what = "the trained one (a7)" if trained else "a random a7 (no trained adapter in this run)"
        self.rows.append(Row("serve", "register 8 adapters", "ok", None, time.monotonic() - start,
                             f"7 random rank-{RANK} all-linear + {what}"))  # fmt: skip

    def step_serve(self) -> None:
        self.preflight("serve")
        assert self.model is not None
        adapters = self.adapters()
        self.register(adapters)
        names = list(adapters)
        flags = ["--model", str(self.model), "--no-ui", "--log-level", "warning", "--threads", str(self.args.threads)]
        flags += ["--slots", "8", "--preload", *names, *shlex.split(self.args.serve_args)]
        serve = harness.Serve(flags, env={"LORA_KIT_HOME": str(self.work / "home")}, log=self.logs / "serve.log",
                              timeout=self.args.timeout_per_step)  # fmt: skip

        def body(question: str, i: int, model: str) -> dict:
            return vs.chat_body(question, self.args.tokens, model) | {"lora": names[i]}

        print(f"$ {shlex.join(serve.command)}", file=sys.stderr)
        vs.wait_for_quiet(60)
        start = time.monotonic()
        try:
            serve.start()
        except harness.ServeError as err:
            raise StepFailed(f"failed: {str(err).splitlines()[-1]}") from None
        try:
            assert serve.proc is not None and serve.url is not None
            ready = time.monotonic() - start
            results = self.measure_server(serve.proc.pid, serve.url, body, single=7)
            peak = vs.peak_rss_mib(serve.proc.pid)
        finally:
            serve.stop()
        self.server_rows("serve", "lora-kit serve", results, peak, ready, time.monotonic() - start)
        self.results.setdefault("serve", {})["lora-kit"] = {**results, "peak_mib": peak, "ready_s": ready,
                                                            "command": serve.command}  # fmt: skip

    def measure_server(self, pid: int, url: str, body: Callable[[str, int, str], dict], single: int) -> dict:
        """A 1-token warm-up, one request on adapter ``single``, then 8 concurrent on the 8 adapters."""
        import httpx

        tokens, questions = self.args.tokens, vs.QUESTIONS
        out: dict[str, Any] = {}
        with httpx.Client(timeout=self.args.timeout_per_step) as client, ThreadPoolExecutor(8) as pool:
            model = vs.served_model(client, url)
            warm = body(questions[0], single, model) | {"max_tokens": 1}
            vs.ask(client, url, warm, 1)
            others = vs.OthersMeter(pid)
            for case, picks in (("one", [single]), ("eight", list(range(8)))):
                bodies = [body(questions[i], a, model) for i, a in enumerate(picks)]
                r = vs.run_round(client, pool, url, bodies, tokens)
                out[case] = {"tokens_per_s": r.tokens_per_s, "seconds": r.seconds, "s_per_token": r.seconds / tokens,
                             "prompt_tokens_mean": r.prompt_tokens / len(bodies), "texts": r.texts}  # fmt: skip
                print(f"{case}: {r.tokens_per_s:.2f} tokens/s", file=sys.stderr)
            out["others_cpu_share"], out["steal_cpu_share"] = others.shares()
        return out

    def server_rows(self, step: str, label: str, res: dict, peak: float, ready: float, total: float) -> None:
        one, eight = res["one"], res["eight"]
        noisy = " (not quiet)" if res["others_cpu_share"] > vs.QUIET_SHARE else ""
        self.rows.append(Row(step, f"{label}: start until ready", "ok", None, ready))
        self.rows.append(Row(step, f"{label}: 1 request, {self.args.tokens} tokens", "ok", None, one["seconds"],
                             f"{one['tokens_per_s']:.2f} tokens/s, {one['s_per_token']:.2f} s/token, "
                             f"prompt {one['prompt_tokens_mean']:.0f} tokens"))  # fmt: skip
        self.rows.append(Row(step, f"{label}: 8 requests on 8 adapters", "ok", peak, eight["seconds"],
                             f"{eight['tokens_per_s']:.2f} tokens/s, {eight['s_per_token']:.2f} s/decode step; "
                             f"peak = the server's, whole run ({fmt_s(total)}); others used "
                             f"{res['others_cpu_share']:.0%} of the CPUs{noisy}"))  # fmt: skip

    def llama_tools(self) -> tuple[Path, Path, Path]:
        """(llama-server, llama-quantize, llama.cpp source): built once as bench_vs_llamacpp does."""
        binary, source = vs.llama_tools(self.args)
        quantize = binary.parent / "llama-quantize"
        if not quantize.is_file():
            build = binary.parent.parent
            command = ["cmake", "--build", str(build), "--target", "llama-quantize", "-j", str(os.cpu_count() or 2)]
            vs.run_logged(command, self.logs / "llama-build.log")
        vs.ensure_converter_deps()
        return binary, quantize, source

    def step_llama(self) -> None:
        self.preflight("llama")
        assert self.model is not None
        binary, quantize, source = self.llama_tools()
        adapters, ggufs = self.adapters(), self.work / "gguf"
        ggufs.mkdir(exist_ok=True)
        vs.ADAPTER_TYPE.setdefault("q4_0", "f16")  # f16 adapters with both bases
        try:
            for command, target in vs.conversion_commands(source, self.model, adapters, ggufs, "q8_0"):
                if target.is_file():
                    continue
                row, m = self.measure("llama", f"convert {target.name}", command, f"convert-{target.stem}")
                if m.failure():
                    raise StepFailed(row.status)
            q4 = [str(quantize), "--allow-requantize", str(ggufs / "base-q8_0.gguf"), str(ggufs / "base-q4_0.gguf"),
                  "Q4_0", str(self.args.threads)]  # fmt: skip
            row, m = self.measure("llama", "llama-quantize Q8_0 -> Q4_0", q4, "quantize-q4_0")
            if m.failure():
                raise StepFailed(row.status)
            for kind in LLAMA_KINDS:
                self.llama_server(binary, ggufs, kind)
        finally:
            shutil.rmtree(ggufs, ignore_errors=True)
        self.ratio_rows()

    def llama_server(self, binary: Path, ggufs: Path, kind: str) -> None:
        server = vs.llama_server(binary, ggufs, kind, self.args)
        server.command += chat_template_flags(self.model, self.work)
        log = self.logs / f"llama-server-{kind}.log"
        vs.wait_for_quiet(60)
        start = time.monotonic()
        body = lambda question, i, model: vs.llama_body(question, i, self.args.tokens, model)  # noqa: E731
        with vs.running(server, log) as (proc, url):
            ready = time.monotonic() - start
            results = self.measure_server(proc.pid, url, body, single=7)
            peak = vs.peak_rss_mib(proc.pid)
        label = f"llama.cpp {kind.upper()}"
        self.server_rows("llama", label, results, peak, ready, time.monotonic() - start)
        self.results.setdefault("llama", {})[label] = {**results, "peak_mib": peak, "ready_s": ready,
                                                       "command": server.command}  # fmt: skip

    def ratio_rows(self) -> None:
        ours = self.results.get("serve", {}).get("lora-kit")
        if not ours:
            return
        for label, theirs in self.results.get("llama", {}).items():
            if not isinstance(theirs, dict) or "one" not in theirs:
                continue
            ratios = [f"1 request {ours['one']['tokens_per_s'] / theirs['one']['tokens_per_s']:.2f}x",
                      f"8 requests {ours['eight']['tokens_per_s'] / theirs['eight']['tokens_per_s']:.2f}x",
                      f"peak RSS {ours['peak_mib'] / theirs['peak_mib']:.2f}x"]  # fmt: skip
            self.rows.append(Row("llama", f"lora-kit / {label}", "ok", notes=", ".join(ratios)))

    def step_merge(self) -> None:
        self.preflight("merge")
        assert self.ref is not None
        merged, gguf = self.work / "merged", self.work / "adapter.gguf"
        shutil.rmtree(merged, ignore_errors=True)
        gguf.unlink(missing_ok=True)
        try:
            merge = lora_kit("adapters", "merge", self.ref, merged)
            row, m = self.measure("merge", f"adapters merge {self.ref}", merge, "merge")
            merge_failed = m.failure()
            if not merge_failed:
                row.notes = f"{sum(f.stat().st_size for f in merged.glob('*.safetensors')) / GB:.2f} GB written"
            export = lora_kit("adapters", "export", self.ref, gguf, "--target", "gguf")
            erow, em = self.measure("merge", "adapters export --target gguf", export, "export-gguf")
            if not em.failure() and gguf.exists():
                size = gguf.stat().st_size if gguf.is_file() else sum(f.stat().st_size for f in gguf.rglob("*"))
                erow.notes = f"{size / MiB:.1f} MiB"
            if merge_failed:
                raise StepFailed(row.status)
            crow, cm = self.measure("merge", "merged model loads (transformers, bf16) + forward",
                                    [sys.executable, "-c", LOAD_CHECK, str(merged)], "merged-load")  # fmt: skip
            crow.notes = last_line(cm.out) if not cm.failure() else ""
            failed = em.failure() or cm.failure()
            if failed:
                raise StepFailed(failed)
        finally:
            shutil.rmtree(merged, ignore_errors=True)


LOAD_CHECK = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], low_cpu_mem_usage=True, dtype=torch.bfloat16)
with torch.no_grad():
    logits = model(torch.tensor([[1, 733, 16289, 28793, 22557]])).logits
assert torch.isfinite(logits).all(), "non-finite logits"
print(f"forward of 5 tokens: logits {tuple(logits.shape)}, finite")
"""

# step -> (what it needs from earlier steps, in words, and how to check it)
DEPENDS: dict[str, tuple[str, Callable[[Bench], bool]]] = {
    "plan": ("the checkpoint (make)", lambda b: b.model is not None),
    "train": ("the checkpoint (make)", lambda b: b.model is not None),
    "eval": ("the trained adapter (train)", lambda b: b.ref is not None),
    "serve": ("the checkpoint (make)", lambda b: b.model is not None),
    "llama": ("the checkpoint (make)", lambda b: b.model is not None),
    "merge": ("the trained adapter (train)", lambda b: b.ref is not None),
}


def dry_run_lines(args: argparse.Namespace, work: Path, steps: list[str]) -> list[str]:
    """Every command the run would execute, in order, as shell lines (``#`` lines: done in Python)."""
    model = args.model_dir or work / f"model-{args.shape}"
    overrides = recipe_overrides(model, work / "data" / "train.jsonl", work / "data" / "eval.jsonl")
    env = f"LORA_KIT_HOME={work / 'home'} "
    run_dir, ref = work / "run", f"{ADAPTER_NAME}@VERSION"
    lines = [f"# work dir {work}; every lora-kit command runs with {env.strip()}"]
    if "make" in steps and not args.model_dir:
        lines.append(shlex.join([sys.executable, str(SCRIPTS / "make_random_model.py"), "--shape", args.shape,
                                 str(model)]))  # fmt: skip
    if "plan" in steps:
        lines.append(env + shlex.join(lora_kit("plan", RECIPE, *overrides, "--json", "--device", "cpu")))
    if "train" in steps:
        lines.append(env + shlex.join(train_command(overrides, run_dir, False)))
        lines.append(f"# SIGKILL its process group once {checkpoint_done(run_dir, KILL_AFTER)} exists")
        lines.append(env + shlex.join(train_command(overrides, run_dir, True)))
    if "eval" in steps:
        command = lora_kit("eval", ref, "--data", work / "data" / "eval.jsonl", "--max-examples", EVAL_EXAMPLES,
                           "--max-tokens", 8) + shlex.split(args.eval_args)  # fmt: skip
        lines.append(env + shlex.join(command))
    trained = run_dir / "adapter" if "train" in steps else work / "adapters" / "a7"  # else a random a7
    adapters = {f"a{i}": work / "adapters" / f"a{i}" for i in range(RANDOM_ADAPTERS)} | {"a7": trained}
    if "serve" in steps or "llama" in steps:
        lines.append(f"# write {RANDOM_ADAPTERS} random rank-{RANK} all-linear adapters a0..a6 in {work / 'adapters'}"
                     f"; a7 = {trained}")  # fmt: skip
    if "serve" in steps:
        lines += [env + shlex.join(lora_kit("adapters", "add", path, "--name", name, "--base", model))
                  for name, path in adapters.items()]  # fmt: skip
        serve = harness.Serve(["--model", str(model), "--no-ui", "--log-level", "warning", "--threads",
                               str(args.threads), "--slots", "8", "--preload", *[f"a{i}" for i in range(8)],
                               *shlex.split(args.serve_args)])  # fmt: skip
        lines.append(env + shlex.join(serve.command))
        lines.append(f"# 1 request on a7, then 8 concurrent on a0..a7: {args.tokens} tokens each, greedy, ignore_eos")
    if "llama" in steps:
        cache = vs.tools_dir()
        source = Path(args.llama_cpp_dir) if args.llama_cpp_dir else vs.cached_source(cache)
        binary = Path(args.llama_server) if args.llama_server else vs.cached_server(cache)
        if not args.llama_server and not binary.is_file():
            lines += [shlex.join(c) for c in vs.build_commands(source, cache, os.cpu_count() or 2)]
        lines.append(shlex.join(["cmake", "--build", str(binary.parent.parent), "--target", "llama-quantize"]))
        ggufs = work / "gguf"
        vs.ADAPTER_TYPE.setdefault("q4_0", "f16")
        lines += [shlex.join(c) for c, _ in vs.conversion_commands(source, model, adapters, ggufs, "q8_0")]
        lines.append(shlex.join([str(binary.parent / "llama-quantize"), "--allow-requantize",
                                 str(ggufs / "base-q8_0.gguf"), str(ggufs / "base-q4_0.gguf"), "Q4_0"]))  # fmt: skip
        lines += [shlex.join(vs.llama_server(binary, ggufs, kind, args).command + chat_template_flags(model, work, False))
                  for kind in LLAMA_KINDS]  # fmt: skip
        lines.append(f"rm -r {ggufs}")
    if "merge" in steps:
        lines.append(env + shlex.join(lora_kit("adapters", "merge", ref, work / "merged")))
        lines.append(env + shlex.join(lora_kit("adapters", "export", ref, work / "adapter.gguf", "--target", "gguf")))
        lines.append(shlex.join([sys.executable, "-c", "<load with transformers, one forward>", str(work / "merged")]))
        lines.append(f"rm -r {work / 'merged'}")
    return lines


def report(bench: Bench, steps: list[str]) -> str:
    args = bench.args
    command = shlex.join([".venv/bin/python", "scripts/bench_true_size.py", *sys.argv[1:]])
    model = bench.model or args.model_dir or args.shape
    lines = ["```", command, "```", "",
             f"{args.shape} random checkpoint ({bench.model_bytes() / GB:.2f} GB bf16) at {model}; steps: "
             f"{', '.join(steps)}; {args.tokens} new tokens per request; {vs.lora_kit_version()}",
             f"CPU: {harness.cpu_summary()}; `lora-kit serve` extra args: {args.serve_args or 'none'}", ""]  # fmt: skip
    return "\n".join(lines + table(bench.rows))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mistral-7b", choices=list(mrm.SHAPES), help="checkpoint shape")
    ap.add_argument("--work-dir", type=Path, help="where everything is written (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (a temporary one is removed otherwise)")
    ap.add_argument("--model-dir", type=Path, help="an existing checkpoint (skips make)")
    ap.add_argument(
        "--steps",
        default=",".join(DEFAULT_STEPS),
        help=f"comma-separated, of {','.join(STEPS)} (default: all but llama)",
    )
    ap.add_argument("--llama", action="store_true", help="add the llama.cpp step (builds llama-server once: ~20 min)")
    ap.add_argument("--llama-server", help="an existing llama-server binary (llama-quantize beside it)")
    ap.add_argument("--llama-cpp-dir", help="an existing llama.cpp source tree, for its converters")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per request (default: 16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of each server")
    ap.add_argument(
        "--serve-args", default="", help="extra `lora-kit serve` flags, one string (e.g. '--weight-dtype bfloat16')"
    )
    ap.add_argument(
        "--eval-args", default="", help="extra `lora-kit eval` flags, one string (e.g. '--precision bf16w')"
    )
    ap.add_argument(
        "--timeout-per-step", type=float, default=3600, help="seconds each subprocess may run (default: 3600)"
    )
    ap.add_argument(
        "--force", action="store_true", help="run a step even when the disk or memory check says it does not fit"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}; of {', '.join(STEPS)}")
    if args.llama and "llama" not in steps:
        steps.append("llama")
    if args.model_dir:
        if not (args.model_dir / "config.json").is_file() and not args.dry_run:
            ap.error(f"--model-dir {args.model_dir} has no config.json")
        steps = [s for s in steps if s != "make"]
    elif "make" not in steps:
        steps.insert(0, "make")  # every other step needs the checkpoint
    args.step_list = [s for s in STEPS if s in steps]
    if args.tokens < 1 or args.threads < 1:
        ap.error("--tokens and --threads must be at least 1")
    args.rounds = 1  # read by bench_vs_llamacpp.llama_server's callers: not used here
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    steps = args.step_list
    if args.dry_run:
        work = args.work_dir or Path(tempfile.gettempdir()) / "bench-true-size-XXXX"
        print("\n".join(dry_run_lines(args, work, steps)))
        return 0
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="bench-true-size-"))).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"CPU: {harness.cpu_summary()}; work dir {work}", file=sys.stderr)
    bench = Bench(args, work, model=args.model_dir.resolve() if args.model_dir else None)
    try:
        for step in steps:
            depends = DEPENDS.get(step)
            if depends and not depends[1](bench):
                bench.rows.append(Row(step, "-", f"skipped: needs {depends[0]}"))
                continue
            print(f"== {step}", file=sys.stderr, flush=True)
            try:
                getattr(bench, f"step_{step}")()
            except StepFailed as err:
                if not any(r.step == step and r.status == str(err) for r in bench.rows):
                    bench.rows.append(Row(step, "-", str(err)))
            except Exception as err:  # noqa: BLE001 - one step's failure must not stop the others
                bench.rows.append(
                    Row(step, "-", f"failed: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1]}")
                )
        text = report(bench, steps)
        print(text)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "rows": [vars(r) for r in bench.rows], "results": bench.results},
                                            indent=2, default=str))  # fmt: skip
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep or args.work_dir:
            print(f"work dir kept: {work} (logs in {work / 'logs'})", file=sys.stderr)
    failed = [r for r in bench.rows if not r.status.startswith("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
