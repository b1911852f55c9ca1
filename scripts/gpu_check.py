"""`make gpu-check`: the whole GPU path of lora-kit, unattended, in under 8 minutes on one NVIDIA GPU.

Checks, in order; each runs even when an earlier one failed, each in its own process with its
own timeout, so one hang or crash costs only its own row:

1. prepare   a tiny random Mistral (tests/helpers.py) and three random PEFT adapters;
2. train     the tiny-Mistral QLoRA recipe (NF4, bf16 compute, paged 8-bit AdamW), 20 steps,
             through ``lora-kit train``; the loss must fall;
3. fp16      the same recipe in fp16 compute (T4/V100): accelerate's fp16 mixed precision with a
             GradScaler; every loss finite and the loss must fall;
4. resume    the same run killed by SIGKILL after step 12, then ``--resume``d from its step-10
             checkpoint: every step's loss must equal the uninterrupted run's (within 2e-2 on
             CUDA, whose attention backward is not bit-reproducible; 1e-5 on the CPU);
5. parity    the engine against PEFT on the GPU: fp32 tokens and logits of a mixed batch (base and
             three adapters in one batch), and an NF4 base with one adapter;
6. serve     ``lora-kit serve`` on 127.0.0.1 with one adapter, called through the official
             ``cloudflare`` SDK (with ``lora``, without it, and an unknown adapter);
7. bench     ``scripts/bench_engine.py --quick``.

Then one table (check, PASS/FAIL, the key number, seconds) and the exit status:

    0  every check passed
    1  a check failed (the table says which; logs of every process stay in the work directory)
    2  no CUDA device here: nothing ran ("gpu-check: no CUDA device here; ...")
    3  an NVIDIA GPU is here but this environment's torch cannot use it (a CPU build of torch)

    python scripts/gpu_check.py                      # on the GPU machine (`make gpu-check` sets it up)
    python scripts/gpu_check.py --probe-only         # stdlib only: 0 if an NVIDIA GPU is visible, else 2
    python scripts/gpu_check.py --device cpu --quick # the same sequence on the CPU, small (tests only)

This module imports only the standard library at the top, so the probe runs under any python
(the Makefile runs it with the system python before it sets anything up); torch, PEFT and the
SDK are imported by the worker processes and the serve check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# scripts/_harness.py (standard library only at the top, as this module), also when a test loads this file by path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny-mistral-smoke.yaml"
RESULT_PREFIX = "GPU_CHECK_RESULT "
NO_CUDA = "gpu-check: no CUDA device here; run it on a machine with an NVIDIA GPU"
EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA, EXIT_TORCH_WITHOUT_CUDA = 0, 1, 2, 3
# random all-linear adapters on the tiny Mistral (alpha 8, A and B of std 0.3: each changes the output)
ADAPTERS = {"a": {"rank": 4, "seed": 1}, "b": {"rank": 8, "seed": 2, "use_rslora": True}, "c": {"rank": 2, "seed": 3}}
SERVED_ADAPTER = "gpu-check"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and precisions of one mode; ``timeouts`` are seconds per check (they sum to < 8 min)."""

    device: str
    steps: int
    checkpoint_every: int
    kill_after: int  # the resume check dies after this step; it resumes from the checkpoint before
    optimizer: str
    compute_dtype: str
    new_tokens: int
    eval_examples: int
    bench_args: tuple[str, ...]
    timeouts: dict[str, float]


# 445 s in all, plus at most 30 s for the torch probe: the whole stays under 8 minutes.
TIMEOUTS = {"prepare": 40, "train": 60, "fp16": 40, "resume": 100, "parity": 55, "serve": 70, "bench": 80}


def settings_for(device: str, quick: bool) -> Settings:
    """On CUDA the production path (NF4, bf16 compute, paged 8-bit AdamW). On the CPU, fp32 and
    AdamW (tests/test_train.py covers the 8-bit optimizer on the CPU); ``quick`` shrinks the run for the tests,
    whose shared 2-core machines also get twice the time per check."""
    cuda = device == "cuda"
    return Settings(
        device=device,
        steps=10 if quick else 20,
        checkpoint_every=4 if quick else 5,
        kill_after=6 if quick else 12,
        optimizer="paged_adamw_8bit" if cuda else "adamw",
        compute_dtype="bfloat16" if cuda else "float32",
        new_tokens=6 if quick else 16,
        eval_examples=2 if quick else 4,
        bench_args=("--mix-only", "--tokens", "2", "--rounds", "1") if quick else ("--quick",),
        timeouts={k: v * (1 if cuda else 2) for k, v in TIMEOUTS.items()},
    )


@dataclasses.dataclass
class Check:
    """One row of the summary table."""

    name: str
    ok: bool
    key: str
    seconds: float = 0.0


# -- the CUDA probe (standard library only) -----------------------------------------------------


def nvidia_gpu_visible() -> bool:
    """True when the NVIDIA driver shows a GPU: ``nvidia-smi -L`` lists one, or a /dev/nvidiaN node exists."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            listing = ""
        if re.search(r"^GPU \d+", listing, re.M):
            return True
    return any(re.fullmatch(r"nvidia\d+", p.name) for p in Path("/dev").glob("nvidia*"))


def torch_cuda_status() -> tuple[bool, str]:
    """(whether this interpreter's torch sees a CUDA device, a description), in a child process
    so this one stays free of torch."""
    code = (
        "import torch; ok = torch.cuda.is_available(); "
        "print(ok, torch.__version__, torch.cuda.get_device_name(0) if ok else '-', torch.version.cuda, sep='|')"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False, "torch (its import or CUDA start took over 30 s)"
    if proc.returncode != 0:
        return False, f"torch does not import: {proc.stderr.strip().splitlines()[-1:]}"
    ok, version, name, cuda = proc.stdout.strip().split("|")
    if ok == "True":
        return True, f"{name} (torch {version})"
    return False, torch_build_advice(version, None if cuda == "None" else cuda)


def torch_build_advice(version: str, cuda: str | None) -> str:
    """Why torch ``version`` (built for CUDA ``cuda``, None for a CPU build) cannot use the GPU
    here, and what to run (exit 3's message)."""
    if cuda is None:
        return (
            f"torch {version} is a CPU build; install the CUDA build in place with `make setup-cuda` "
            "(make gpu-check does it), or pick one: make setup-cuda CUDA_TORCH=torch==VERSION+cuXXX "
            "CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cuXXX"
        )
    return (
        f"torch {version} (CUDA {cuda}) sees no device: CUDA_VISIBLE_DEVICES hides it, or the driver is older "
        f"than CUDA {cuda} (nvidia-smi shows its CUDA version); for an older CUDA: make gpu-check "
        "CUDA_TORCH=torch==VERSION+cuXXX CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cuXXX"
    )


# -- running one check in a process of its own --------------------------------------------------


@dataclasses.dataclass
class Finished:
    """A finished (or killed) child process: exit code (None after its timeout), output, seconds."""

    rc: int | None
    stdout: str
    stderr: str
    seconds: float


def run_process(cmd: list[str], timeout: float, log: Path, env: dict[str, str] | None = None) -> Finished:
    """Run ``cmd`` in ROOT in a new session; after ``timeout`` s kill its whole process group.
    stdout and stderr are also written to ``log``."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    log.write_text(f"$ {' '.join(cmd)}\n-- exit {rc} --\n-- stdout --\n{out}\n-- stderr --\n{err}")
    return Finished(rc, out, err, time.monotonic() - start)


def why_failed(done: Finished, timeout: float) -> str:
    """A short reason for the table: the timeout, or the exit code and the last error line."""
    if done.rc is None:
        return f"timed out after {timeout:.0f} s"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return f"exit {done.rc}: {lines[-1][:100] if lines else 'no output'}"


def child_env(settings: Settings, home: Path | None = None) -> dict[str, str]:
    """The environment of a child: CPU mode hides every GPU, so the CPU path really runs."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if home is not None:
        env["LORA_KIT_HOME"] = str(home)
    return env


def run_worker(name: str, settings: Settings, work: Path) -> Check:
    """This script's ``--worker NAME`` in a child; its last stdout line is its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", settings.device]
    cmd += ["--work", str(work), "--new-tokens", str(settings.new_tokens)]
    timeout = settings.timeouts[name]
    done = run_process(cmd, timeout, work / "logs" / f"{name}.log", child_env(settings, work / "home"))
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.rc != 0 or not results:
        return Check(name, False, why_failed(done, timeout), done.seconds)
    result = json.loads(results[-1][len(RESULT_PREFIX) :])
    return Check(name, bool(result["ok"]), result["key"], done.seconds)


# -- 2 and 3: training and resuming (the CLI in a child, as a user runs it) -----------------------


def recipe_overrides(settings: Settings, base: Path) -> list[str]:
    """``--set`` flags of the tiny-Mistral smoke recipe for this mode."""
    values = {
        "model.base": base,
        "model.quantization": "nf4",
        "model.compute_dtype": settings.compute_dtype,
        "train.optimizer": settings.optimizer,
        "train.max_steps": settings.steps,
        "train.checkpoint_every": settings.checkpoint_every,
        "eval.max_examples": settings.eval_examples,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def run_training(settings: Settings, work: Path, run: str, timeout: float, *extra: str, env_extra=None) -> Finished:
    """``lora-kit train`` of the smoke recipe into ``work/runs/run`` (registry: the work home)."""
    cmd = [sys.executable, "-m", "lora_kit", "train", str(RECIPE), *recipe_overrides(settings, work / "tiny-mistral")]
    cmd += ["--run-dir", str(work / "runs" / run), *extra]
    env = {**child_env(settings, work / "home"), **(env_extra or {})}
    log = work / "logs" / f"train-{run}{'-resumed' if '--resume' in extra else ''}.log"
    return run_process(cmd, timeout, log, env)


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} from a run's metrics.jsonl (each step once, also after a resume)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def check_train(settings: Settings, work: Path) -> Check:
    """The recipe trains for ``settings.steps`` steps and the mean of the last 3 losses is below
    0.9x the mean of the first 3 (as tests/test_train.py asks of the same recipe)."""
    timeout = settings.timeouts["train"]
    done = run_training(settings, work, "full", timeout)
    losses = step_losses(work / "runs" / "full")
    if done.rc != 0:
        return Check("train", False, why_failed(done, timeout), done.seconds)
    curve = [losses[s] for s in sorted(losses)]
    if len(curve) != settings.steps or not all(math.isfinite(x) for x in curve):
        return Check("train", False, f"{len(curve)} finite losses logged, expected {settings.steps}", done.seconds)
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    ok = last < 0.9 * first
    key = f"loss {curve[0]:.3f} -> {curve[-1]:.3f} (mean of last 3 / first 3 = {last / first:.2f}, needs < 0.9)"
    return Check("train", ok, key, done.seconds)


def check_fp16(settings: Settings, work: Path) -> Check:
    """#27 item 2: the same recipe with fp16 compute (T4/V100) trains under accelerate's fp16 mixed
    precision with a GradScaler (the trainer says so): every loss finite, the last 3 below 0.9x the
    first 3. On the CPU tests/test_train.py tests the branch; this is its run on CUDA's fp16 kernels."""
    timeout = settings.timeouts["fp16"]
    fp16 = dataclasses.replace(settings, compute_dtype="float16", checkpoint_every=0, eval_examples=0)
    done = run_training(fp16, work, "fp16", timeout)
    if done.rc != 0:
        return Check("fp16", False, why_failed(done, timeout), done.seconds)
    if "mixed precision fp16 with loss scaling" not in done.stderr:
        return Check("fp16", False, "the run did not train with fp16 loss scaling", done.seconds)
    losses = step_losses(work / "runs" / "fp16")
    curve = [losses[s] for s in sorted(losses)]
    if len(curve) != settings.steps or not all(math.isfinite(x) for x in curve):
        return Check("fp16", False, f"{len(curve)} finite losses logged, expected {settings.steps}", done.seconds)
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    key = f"fp16 + GradScaler: loss {curve[0]:.3f} -> {curve[-1]:.3f} (last 3 / first 3 = {last / first:.2f}, needs < 0.9)"
    return Check("fp16", last < 0.9 * first, key, done.seconds)


def check_resume(settings: Settings, work: Path) -> Check:
    """Kill a run by SIGKILL after step ``kill_after``, resume it, and compare every step's loss
    with the uninterrupted run of :func:`check_train` (RNG, optimizer and data position restored)."""
    timeout = settings.timeouts["resume"]
    # The trainer's own crash hook: a real SIGKILL at a known step, so the resume point is exact.
    killed = run_training(
        settings, work, "cut", timeout / 2, env_extra={"LORA_KIT_TEST_SIGKILL_AFTER_STEP": str(settings.kill_after)}
    )
    if killed.rc != -signal.SIGKILL:
        return Check("resume", False, f"the run was not killed at step {settings.kill_after}: "
                     + why_failed(killed, timeout / 2), killed.seconds)  # fmt: skip
    resumed = run_training(settings, work, "cut", timeout - killed.seconds, "--resume")
    seconds = killed.seconds + resumed.seconds
    if resumed.rc != 0:
        return Check("resume", False, why_failed(resumed, timeout - killed.seconds), seconds)
    point = re.search(r"resumed from step-\d+ \(step (\d+)\)", resumed.stderr)
    at = int(point.group(1)) if point else -1
    want = settings.kill_after - settings.kill_after % settings.checkpoint_every
    cut, full = step_losses(work / "runs" / "cut"), step_losses(work / "runs" / "full")
    if at != want or sorted(cut) != list(range(1, settings.steps + 1)):
        return Check("resume", False, f"resumed at step {at} (expected {want}) with steps {sorted(cut)}", seconds)
    if sorted(full) != sorted(cut):
        return Check("resume", False, f"resumed at step {at}; no uninterrupted run to compare with", seconds)
    diff = max(abs(cut[s] - full[s]) for s in cut)
    # CPU runs repeat bit for bit; on CUDA, atomics in attention's backward may differ in the last bits.
    tolerance = 1e-5 if settings.device == "cpu" else 2e-2
    key = f"resumed at step {at}; max loss diff vs the uninterrupted run {diff:.1e} (<= {tolerance:g})"
    return Check("resume", diff <= tolerance, key, seconds)


# -- 1 and 4: workers (child processes that import torch) ----------------------------------------


def worker_prepare(work: Path, device: str, new_tokens: int) -> dict:
    """The tiny random Mistral of the tests (scripts/_harness.py builds it for both), three random
    PEFT adapters (non-zero B, so each changes the output), and one of them registered in the
    work home for the serve check."""
    from lora_kit.registry import Registry

    base = _harness.make_sentiment_mistral(work / "tiny-mistral")
    for name, spec in ADAPTERS.items():
        _harness.random_adapter(base, work / "adapters" / name, alpha=8, std=0.3, **spec)
    version = Registry().register(work / "adapters" / "a", SERVED_ADAPTER, base_model=str(base))
    return {"ok": True, "key": f"tiny Mistral + {len(ADAPTERS)} adapters; {version.ref} registered"}


def parity_engine(base: Path, device: str, quantization: str, adapters: dict[str, Path]):
    """An engine over the tiny Mistral on ``device`` (its logits read through the engine's
    supported ``recording_logits``)."""
    import torch

    from lora_kit import models
    from lora_kit.engine import Engine, EngineConfig, mapping_resolver

    dtype = torch.float32 if quantization == "none" else None  # NF4: the device's compute dtype
    model = models.load_model(str(base), quantization, compute_dtype=dtype, device=torch.device(device))
    return Engine(
        EngineConfig(model="tiny-mistral", quantization=quantization, max_slots=len(adapters)),
        model=model,
        tokenizer=models.load_tokenizer(str(base)),
        adapter_resolver=mapping_resolver(adapters),
        # The torch backend is what CUDA runs anyway; on the CPU it keeps the exact fp32 weights
        # (the CPU backend may pack them in bf16 where the CPU multiplies bf16 natively).
        backend="torch",
    )


def peft_reference(
    base: Path, device: str, quantization: str, adapter: Path | None, prompt: list[int], n: int, stops: list[int]
):
    """PEFT's greedy tokens (at most ``n``, ending at a stop id) and their logits (steps, V) for one prompt."""
    import torch
    from peft import PeftModel

    from lora_kit import models

    dtype = torch.float32 if quantization == "none" else None
    model = models.load_model(str(base), quantization, compute_dtype=dtype, device=torch.device(device))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.eval().generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
            eos_token_id=stops, pad_token_id=stops[0], return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits).float().cpu()


def parity_case(work: Path, device: str, quantization: str, names: list[str | None], n: int) -> dict:
    """Greedy requests for one prompt (one per name in ``names``, None = the base), submitted
    together so the engine runs them as one mixed batch, against PEFT one at a time. Logits are
    compared over the steps both took after the same tokens (after a differing token they differ anyway)."""
    import torch

    from lora_kit import chat
    from lora_kit.engine import GenerationRequest, SamplingParams

    base = work / "tiny-mistral"
    adapters = {name: work / "adapters" / name for name in names if name is not None}
    engine = parity_engine(base, device, quantization, adapters)
    prompt = chat.render_prompt(engine.tokenizer, _harness.sentiment_texts()[0], raw=True)
    try:
        engine.stop()  # submit every request before the loop starts: the first step batches them all
        with engine.recording_logits() as seen:
            seqs = [engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=n), adapter=a)) for a in names]
            engine.start()
            outs = [engine.result(s) for s in seqs]
        stops = sorted(engine.stop_ids)
    finally:
        engine.stop()
    same_tokens, max_diff, answers = True, 0.0, set()
    for name, seq, out in zip(names, seqs, outs):
        ref_tokens, ref_logits = peft_reference(base, device, quantization, adapters.get(name), prompt, n, stops)
        got = out.token_ids
        agree = next((i for i, (x, y) in enumerate(zip(got, ref_tokens)) if x != y), min(len(got), len(ref_tokens)))
        steps = min(agree + 1, len(got), len(ref_tokens))
        mine = torch.stack(seen[seq.request_id][:steps])
        max_diff = max(max_diff, float((mine - ref_logits[:steps]).abs().max()))
        same_tokens &= got == ref_tokens
        answers.add(tuple(ref_tokens))
    return {"same_tokens": same_tokens, "max_diff": max_diff, "distinct": len(answers), "rows": len(names)}


def worker_parity(work: Path, device: str, new_tokens: int) -> dict:
    """fp32: the base and every adapter in one batch must give PEFT's tokens, logits within 1e-3.
    NF4 base (the device's compute dtype) with one adapter: tokens and logits within 1e-3 in fp32;
    in bf16 logits within 0.02, tokens reported only. The tiny model's logits span about +-0.5 with
    top-2 gaps down to 0.004, and bf16 alone moves them by ~0.005 (measured on the CPU), so a
    near tie may flip there; a misapplied adapter moves them by far more."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 products, as PEFT's reference on the CPU
    fp32 = parity_case(work, device, "none", [None, *ADAPTERS], new_tokens)
    nf4 = parity_case(work, device, "nf4", ["b"], new_tokens)
    bf16 = device == "cuda"
    ok = fp32["same_tokens"] and fp32["max_diff"] <= 1e-3 and fp32["distinct"] == fp32["rows"]
    ok &= nf4["max_diff"] <= (0.02 if bf16 else 1e-3) and (bf16 or nf4["same_tokens"])
    key = (
        f"fp32 batch of {fp32['rows']}: tokens {'equal' if fp32['same_tokens'] else 'DIFFER'}, "
        f"{fp32['distinct']} distinct, max logit diff {fp32['max_diff']:.1e}; nf4{'/bf16' if bf16 else ''}: tokens "
        f"{'equal' if nf4['same_tokens'] else 'differ'}, max logit diff {nf4['max_diff']:.1e}"
    )
    return {"ok": bool(ok), "key": key}


WORKERS: dict[str, Callable[[Path, str, int], dict]] = {"prepare": worker_prepare, "parity": worker_parity}


def run_as_worker(name: str, work: Path, device: str, new_tokens: int) -> int:
    """The ``--worker`` entry: run one worker, print its result as the last stdout line."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result = WORKERS[name](work, device, new_tokens)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# -- 5: serving through the official cloudflare SDK ----------------------------------------------


def call_with_sdk(url: str, n: int, timeout: float) -> str:
    """The adapter, the base and an unknown adapter through ``cloudflare.Cloudflare`` (each call
    within ``timeout`` s); returns the key number, or raises ValueError saying what was wrong."""
    import cloudflare

    client = cloudflare.Cloudflare(api_token="gpu-check", base_url=url + "/client/v4", max_retries=0, timeout=timeout)
    model = "@cf/huggingface/tiny-mistral"  # the served model is named by its directory
    messages = [{"role": "user", "content": _harness.sentiment_texts()[0]}]
    asked = {"account_id": "gpu-check", "messages": messages, "max_tokens": n, "temperature": 0}
    start = time.monotonic()
    tuned = client.ai.run(model, lora=SERVED_ADAPTER, extra_body={"ignore_eos": True}, **asked)
    took = time.monotonic() - start
    base = client.ai.run(model, extra_body={"ignore_eos": True}, **asked)
    for answer in (tuned, base):
        if not isinstance(answer["response"], str) or answer["usage"]["completion_tokens"] != n:
            raise ValueError(f"expected a text of {n} tokens, got {answer}")
    try:
        client.ai.run(model, lora="no-such-adapter", **asked)
    except cloudflare.NotFoundError as err:
        if "no-such-adapter" not in str(err):
            raise ValueError(f"the 404 does not name the unknown adapter: {err}") from err
    else:
        raise ValueError("an unknown lora was answered")
    return f"{n} tokens with lora in {took:.2f} s ({n / took:.1f} tok/s); base answered; unknown lora -> 404"


def check_serve(settings: Settings, work: Path) -> Check:
    """One adapter served by ``lora-kit serve`` in a child, called through the cloudflare SDK.
    Of the check's time, half may go to the start, a tenth to each of the 3 calls, a fifth to the stop."""
    start, timeout = time.monotonic(), settings.timeouts["serve"]
    args = ["--model", str(work / "tiny-mistral"), "--quantization", "nf4", "--preload", SERVED_ADAPTER]
    server = _harness.Serve(
        [*args, "--slots", "2", "--no-ui"], env=child_env(settings, work / "home"), log=work / "logs" / "serve.log",
        timeout=timeout * 0.5, grace=timeout * 0.2,
    )  # fmt: skip
    try:
        server.start()
    except _harness.ServeError:
        tail = server.tail(1).splitlines()[-1:] or ["no output"]
        return Check("serve", False, f"the server did not start: {tail[0][:100]}", time.monotonic() - start)
    try:
        key = call_with_sdk(server.url, settings.new_tokens, timeout * 0.1)
        return Check("serve", True, key, time.monotonic() - start)
    except Exception as err:  # any failure of the SDK call is this check's result, not the script's end
        return Check("serve", False, f"{type(err).__name__}: {str(err)[:120]}", time.monotonic() - start)
    finally:
        server.stop()


# -- 6: the engine benchmark ------------------------------------------------------------------


def check_bench(settings: Settings, work: Path) -> Check:
    """``scripts/bench_engine.py`` (short settings); the key number is the engine's tokens/s on
    8 requests on 8 adapters. Runs on the user's own home (the embedded model is prepared there)."""
    timeout, out = settings.timeouts["bench"], work / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_engine.py"), *settings.bench_args, "--json", str(out)]
    done = run_process(cmd, timeout, work / "logs" / "bench.log", child_env(settings))
    if done.rc != 0 or not out.exists():
        return Check("bench", False, why_failed(done, timeout), done.seconds)
    ok, key = bench_verdict(json.loads(out.read_text()))
    return Check("bench", ok, key, done.seconds)


# The engine against PEFT's own mixed batch (the same 8 requests on 8 adapters): on a GPU the
# batched engine must at least match it; the benchmark's goal is 2.5x, printed beside the ratio.
PEFT_ROW = "8 req / 8 adapters: lora-kit vs PEFT adapter_names"
MIN_RATIO_VS_PEFT = 1.0


def bench_verdict(report: dict) -> tuple[bool, str]:
    """PASS/FAIL and the key line of a ``bench_engine.py --json`` report. Every row's figures must
    be finite and positive; where the PEFT comparison ran (``--quick``: the GPU run; the CPU
    stand-in runs ``--mix-only``, without it), lora-kit must be at least ``MIN_RATIO_VS_PEFT``x PEFT."""
    rows = report["rows"]
    mixed = next(r["baseline_tps"] for r in rows if r["baseline"] == "8 adapters")
    key = f"8 req / 8 adapters: {mixed:.1f} tok/s ({report['tokens']} tokens, {report['backend']} backend)"
    figures = [r[f] for r in rows for f in ("lora_kit_tps", "baseline_tps", "ratio")]
    ok = all(math.isfinite(x) and x > 0 for x in figures)
    vs_base = [r for r in rows if r["measurement"].startswith("8 req / 8 adapters vs base")]
    if vs_base:
        key += f"; {vs_base[0]['ratio']:.2f}x base only"
    vs_peft = [r for r in rows if r["measurement"] == PEFT_ROW]
    if vs_peft:
        ratio = vs_peft[0]["ratio"]
        key += f"; {ratio:.2f}x PEFT (needs >= {MIN_RATIO_VS_PEFT}, goal {vs_peft[0]['goal']})"
        ok = ok and ratio >= MIN_RATIO_VS_PEFT
    return ok, key


# -- the sequence and the table ---------------------------------------------------------------


def make_work_dir(work: Path) -> None:
    """The work directory: logs, the tiny model, runs, and a lora-kit home of its own (its own
    registry) that borrows the user's converted models and compiled kernel by symlink. What an
    earlier check left in a reused ``--work`` directory is removed first; any other non-empty
    directory is refused (SystemExit) rather than cleaned."""
    from lora_kit import paths  # stdlib only

    marker = work / ".gpu-check"
    if work.exists() and any(work.iterdir()) and not marker.exists():
        raise SystemExit(f"gpu-check: --work {work} is not empty and was not made by gpu-check; give a new directory")
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    for old in ("logs", "runs", "adapters", "tiny-mistral", "home/registry", "home/runs"):
        shutil.rmtree(work / old, ignore_errors=True)
    (work / "bench.json").unlink(missing_ok=True)
    (work / "logs").mkdir(parents=True)
    (work / "home").mkdir(exist_ok=True)
    for name in ("models", "kernels"):
        shared, link = paths.home() / name, work / "home" / name
        shared.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(shared, target_is_directory=True)


def run_checks(settings: Settings, work: Path, say: Callable[[str], None]) -> list[Check]:
    """Every check in order; a failure (or an exception of the check itself) is recorded and the next runs."""
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("prepare", lambda: run_worker("prepare", settings, work)),
        ("train", lambda: check_train(settings, work)),
        ("fp16", lambda: check_fp16(settings, work)),
        ("resume", lambda: check_resume(settings, work)),
        ("parity", lambda: run_worker("parity", settings, work)),
        ("serve", lambda: check_serve(settings, work)),
        ("bench", lambda: check_bench(settings, work)),
    ]
    results = []
    for name, step in steps:
        say(f"gpu-check: {name} ...")
        start = time.monotonic()
        try:
            result = step()
        except Exception as err:  # a bug in one check must not hide the others' results
            result = Check(name, False, f"{type(err).__name__}: {str(err)[:120]}", time.monotonic() - start)
        say(f"gpu-check: {name} {'PASS' if result.ok else 'FAIL'} ({result.seconds:.1f} s): {result.key}")
        results.append(result)
    return results


WHAT = {
    "prepare": "tiny Mistral and 3 random PEFT adapters",
    "train": "QLoRA recipe: loss falls",
    "fp16": "the recipe in fp16 compute",
    "resume": "SIGKILL mid-run, --resume",
    "parity": "engine vs PEFT (tokens, logits)",
    "serve": "lora-kit serve + cloudflare SDK",
    "bench": "scripts/bench_engine.py",
}


def summary(results: list[Check], header: str) -> str:
    """The one summary table (Markdown)."""
    lines = [header, "", "| check | what | result | key number | seconds |", "|---|---|---|---|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {WHAT[r.name]} | {'PASS' if r.ok else 'FAIL'} | {r.key} | {r.seconds:.1f} |")
    total = sum(r.seconds for r in results)
    passed = sum(r.ok for r in results)
    lines.append(f"\n{passed}/{len(results)} checks passed in {total:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the CPU path (for the tests)")
    ap.add_argument("--quick", action="store_true", help="a short run: 10 steps, few tokens, a 2-token benchmark")
    ap.add_argument("--probe-only", action="store_true", help="only say whether an NVIDIA GPU is visible (exit 0 or 2)")
    ap.add_argument("--work", type=Path, help="directory for the logs, model and runs (default: a new temporary one)")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--new-tokens", type=int, default=16, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_as_worker(args.worker, args.work, args.device, args.new_tokens)
    if args.device == "cuda" and not nvidia_gpu_visible():
        print(NO_CUDA, file=sys.stderr)
        return EXIT_NO_CUDA
    if args.probe_only:
        return EXIT_OK
    device_name = "CPU"
    if args.device == "cuda":
        usable, device_name = torch_cuda_status()
        if not usable:
            print(f"gpu-check: an NVIDIA GPU is here but torch cannot use it: {device_name}", file=sys.stderr)
            return EXIT_TORCH_WITHOUT_CUDA
    settings = settings_for(args.device, args.quick)
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()  # children run in ROOT
    make_work_dir(work)
    results = run_checks(settings, work, lambda line: print(line, file=sys.stderr, flush=True))
    mode = f"{args.device}{', quick' if args.quick else ''}: {settings.steps} steps, {settings.optimizer}"
    mode += f", {settings.compute_dtype}"
    print(summary(results, f"gpu-check on {device_name} ({mode}); logs in {work}/logs"))
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
