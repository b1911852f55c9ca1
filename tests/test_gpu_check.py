"""`make gpu-check` (scripts/gpu_check.py): the no-CUDA exit, and the whole sequence on the CPU.

The GPU run itself needs a GPU; here the same checks run end to end with the CPU settings
(``--device cpu --quick``: fp32, AdamW, 10 steps, a few tokens), so the script cannot rot unnoticed.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script():
    """The script as a module, without putting scripts/ on sys.path for the whole session."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()

NO_CUDA_LINE = "gpu-check: no CUDA device here; run it on a machine with an NVIDIA GPU"
needs_no_gpu = pytest.mark.skipif(gpu_check.nvidia_gpu_visible(), reason="an NVIDIA GPU is visible here")


@needs_no_gpu
@pytest.mark.parametrize("flags", [[], ["--probe-only"]])
def test_without_cuda_it_exits_2_with_one_line(flags, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *flags, "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 == gpu_check.EXIT_NO_CUDA
    assert proc.stderr == NO_CUDA_LINE + "\n"
    assert proc.stdout == ""
    assert not (tmp_path / "work").exists()  # nothing was set up


@needs_no_gpu
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_gpu_check_without_cuda_stops_before_any_set_up(tmp_path):
    venv = tmp_path / "venv"  # the Makefile's venv for this run: it must not be created
    proc = subprocess.run(
        ["make", "--no-print-directory", "gpu-check", f"VENV={venv}"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2  # make's own status for a failed recipe (the script's 2)
    assert proc.stderr.splitlines()[0] == NO_CUDA_LINE
    commands = proc.stdout.splitlines()  # make echoes each command it runs: only the probe ran
    assert len(commands) == 1 and commands[0].endswith(" scripts/gpu_check.py --probe-only"), commands
    assert not venv.exists()


@needs_no_gpu
def test_without_cuda_nothing_heavy_is_imported():
    code = (
        f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import gpu_check; rc = gpu_check.main([]); "
        "print(rc, sorted(m for m in ('torch', 'transformers', 'lora_kit', 'cloudflare') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "2 []\n", proc.stderr


def test_a_work_directory_it_did_not_make_is_refused_untouched(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "precious.txt").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr
        == f"gpu-check: --work {tmp_path} is not empty and was not made by gpu-check; give a new directory\n"
    )
    assert (tmp_path / "runs" / "precious.txt").read_text() == "keep me"


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not yet reaped, counts as ended)."""
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_check_past_its_timeout_is_killed_with_its_children(tmp_path):
    # A child that starts a grandchild, both sleeping: the timeout kills the whole process group.
    pid_file = tmp_path / "grandchild.pid"
    sleeper = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    done = gpu_check.run_process([sys.executable, "-c", sleeper], 5, tmp_path / "log")
    assert done.rc is None
    assert gpu_check.why_failed(done, 5) == "timed out after 5 s"
    assert "-- exit None --" in (tmp_path / "log").read_text()
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed at once; reaped by init a moment later
        if not alive(grandchild):
            break
        time.sleep(0.1)
    assert not alive(grandchild)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """{check: [what, result, key number, seconds]} from the summary table."""
    rows = [line.strip("|").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}  # rows[0]: the header


def test_cpu_quick_run_passes_every_check(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    rows = table_rows(proc.stdout)
    assert {name: row[1] for name, row in rows.items()} == {
        name: "PASS" for name in ("prepare", "train", "fp16", "resume", "parity", "serve", "bench")
    }, proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0
    assert "7/7 checks passed" in proc.stdout
    assert rows["fp16"][2].startswith("fp16 + GradScaler: loss ")
    assert rows["prepare"][2] == "tiny Mistral + 3 adapters; gpu-check@1 registered"
    assert rows["resume"][2].startswith("resumed at step 4; max loss diff vs the uninterrupted run 0.0e+00")
    assert rows["parity"][2].startswith("fp32 batch of 4: tokens equal, 4 distinct, max logit diff")
    assert "nf4: tokens equal" in rows["parity"][2]
    assert rows["serve"][2].startswith("6 tokens with lora in ")
    assert rows["serve"][2].endswith("base answered; unknown lora -> 404")
    assert rows["bench"][2].startswith("8 req / 8 adapters: ")
    # every check left its log; the training runs their metrics
    assert sorted(p.name for p in (work / "logs").iterdir()) == [
        "bench.log", "parity.log", "prepare.log", "serve.log", "train-cut-resumed.log", "train-cut.log",
        "train-fp16.log", "train-full.log",
    ]  # fmt: skip
    assert len(gpu_check.step_losses(work / "runs" / "full")) == 10
    assert "\n-- exit -9 --\n" in (work / "logs" / "train-cut.log").read_text()  # a real SIGKILL


def bench_report(peft_ratio: float | None, mixed_tps: float = 40.0) -> dict:
    """A ``bench_engine.py --json`` report: the mix row, and the PEFT row where ``peft_ratio`` is given."""
    rows = [
        {"measurement": "8 req, each a 2-adapter mix vs 8 single adapters", "lora_kit_tps": 35.0,
         "baseline": "8 adapters", "baseline_tps": mixed_tps, "ratio": 0.875, "goal": ">= 0.85"},
    ]  # fmt: skip
    if peft_ratio is not None:
        rows.append(
            {
                "measurement": gpu_check.PEFT_ROW,
                "lora_kit_tps": mixed_tps,
                "baseline": "PEFT mixed batch",
                "baseline_tps": mixed_tps / peft_ratio,
                "ratio": peft_ratio,
                "goal": ">= 2.5",
            }  # fmt: skip
        )
    return {"rows": rows, "tokens": 16, "backend": "cuda"}


def test_bench_verdict_needs_the_engine_to_match_peft_on_a_gpu_run():
    ok, key = gpu_check.bench_verdict(bench_report(peft_ratio=3.1))
    assert (
        ok and key == "8 req / 8 adapters: 40.0 tok/s (16 tokens, cuda backend); 3.10x PEFT (needs >= 1.0, goal >= 2.5)"
    )
    slower, key = gpu_check.bench_verdict(bench_report(peft_ratio=0.8))
    assert not slower and "0.80x PEFT" in key
    # the CPU stand-in's --mix-only report has no PEFT row: its figures must still be real numbers
    assert gpu_check.bench_verdict(bench_report(peft_ratio=None)) == (
        True,
        "8 req / 8 adapters: 40.0 tok/s (16 tokens, cuda backend)",
    )
    assert not gpu_check.bench_verdict(bench_report(peft_ratio=None, mixed_tps=float("nan")))[0]
    assert not gpu_check.bench_verdict(bench_report(peft_ratio=None, mixed_tps=0.0))[0]


def make_dry_run(tmp_path: Path, target: str, installed: str | None, *assignments: str) -> list[str]:
    """The commands ``make -n TARGET`` would run on a set-up .venv whose torch came from ``installed``
    (no torch stamp: None), with ``assignments`` on the command line (nothing is installed)."""
    import os

    venv, model = tmp_path / "venv", tmp_path / "home" / "models" / "smollm2-135m-instruct"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    model.mkdir(parents=True, exist_ok=True)
    (venv / ".lora-kit-torch").unlink(missing_ok=True)
    if installed is not None:
        (venv / ".lora-kit-torch").write_text(installed + "\n")
    now = time.time()
    stamps = [venv / ".lora-kit-torch", venv / ".lora-kit-installed", venv / ".lora-kit-kernel", model / ".prepared"]
    for i, stamp in enumerate(stamps):  # each newer than what it depends on, as a finished setup leaves them
        if stamp.exists() or i:
            stamp.touch()
            os.utime(stamp, (now + i, now + i))
    cmd = ["make", "-n", "--no-print-directory", target, f"VENV={venv}", f"LORA_KIT_HOME={tmp_path / 'home'}"]
    proc = subprocess.run([*cmd, *assignments], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if "Nothing to be done" not in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_setup_reinstalls_torch_when_the_spec_changes(tmp_path):
    """#27 item 3: the install stamp depended on pyproject.toml only, so `make TORCH=... setup` on an
    existing .venv kept the CPU torch. The torch stamp records the spec: the same one does nothing,
    another reinstalls torch in place, and the CUDA setup asks for a CUDA build and checks it got one."""
    assert make_dry_run(tmp_path, "setup", "torch==2.13.0") == []  # up to date: nothing to run

    other = make_dry_run(tmp_path, "setup", "torch==2.13.0", "TORCH=torch==2.12.0")
    assert any("--force-reinstall --no-deps" in line and '"torch==2.12.0"' in line for line in other), other
    assert any(line.startswith("echo 'torch==2.12.0' > ") for line in other), other  # the new spec recorded
    assert not any("torch.version.cuda" in line for line in other)  # a CPU spec is not checked for CUDA

    # A CUDA build stays through a plain `make setup` / `make test`; TORCH= goes back to the CPU wheel
    # (from the default indexes, not the CUDA one, whose +cu128 build would satisfy torch==2.13.0).
    cuda_spec = "torch==2.13.0+cu128 https://download.pytorch.org/whl/cu128"
    assert make_dry_run(tmp_path, "setup", cuda_spec) == []
    back = make_dry_run(tmp_path, "setup", cuda_spec, "TORCH=torch==2.13.0")
    assert any("--force-reinstall" in line and '"torch==2.13.0"' in line for line in back), back
    assert not any("--extra-index-url" in line for line in back), back

    missing = make_dry_run(tmp_path, "setup", None)  # a .venv from before the torch stamp: torch is reinstalled
    assert any("--force-reinstall" in line and '"torch==2.13.0"' in line for line in missing), missing

    cuda = make_dry_run(tmp_path, "gpu-check", "torch==2.13.0")
    installs = [line for line in cuda if "--force-reinstall" in line]
    assert (
        len(installs) == 1
        and "+cu" in installs[0]
        and "--extra-index-url https://download.pytorch.org/whl/cu" in installs[0]
    )
    assert any("torch.version.cuda or sys.exit" in line and "make setup-cuda" in line for line in cuda), cuda
    assert make_dry_run(tmp_path, "setup-cuda", "torch==2.13.0+cu128 https://download.pytorch.org/whl/cu128")[-1:] == [
        'make --no-print-directory setup TORCH="torch==2.13.0+cu128" TORCH_INDEX="https://download.pytorch.org/whl/cu128"'
    ]  # the CUDA build already there: only the sub-make's line


def test_exit_3_says_what_to_run():
    """#27 item 3: exit 3's message names the command for the build it found."""
    cpu = gpu_check.torch_build_advice("2.13.0+cpu", None)
    assert "CPU build" in cpu and "make setup-cuda" in cpu
    driver = gpu_check.torch_build_advice("2.13.0+cu128", "12.8")
    assert "CUDA_VISIBLE_DEVICES" in driver and "driver is older than CUDA 12.8" in driver
    assert "make gpu-check CUDA_TORCH=" in driver


def test_bench_compares_with_peft_on_the_engines_device():
    """#27 item 6: on CUDA bench_engine.py ran the engine on the GPU and PEFT and transformers on the
    CPU. They run on the engine's device now (in its dtype off the CPU); the whole script runs in
    the CPU quick run above, and gpu-check's bench row needs >= 1.0x PEFT on the GPU."""
    import types

    import torch

    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "scripts" / "bench_engine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # its `import _harness` resolves: gpu_check put scripts/ on sys.path
    cuda = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    assert bench.baseline_placement(cuda) == (torch.device("cuda", 0), torch.bfloat16)
    cpu = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    assert bench.baseline_placement(cpu) == (torch.device("cpu"), torch.float32)
