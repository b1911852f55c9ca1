"""lora-kit's server vs llama.cpp's ``llama-server`` on a CPU, over HTTP, with LoRA adapters.

**What it measures**: tokens/s of ``/v1/chat/completions`` on the embedded SmolLM2-135M-Instruct
(or ``--model DIR``, e.g. a random Mistral-7B) with 8 random rank-8 all-linear adapters, in four
cases; the latency of a 1-token request; and each server's peak RSS:

- ``base8``: 8 concurrent requests on the base model;
- ``mixed8``: 8 concurrent requests, each on a different adapter;
- ``one8``: 8 concurrent requests on the same adapter;
- ``base1``: 1 request on the base (the tokens/s of that one interactive request);
- ``first1``/``first1a``: the p50 latency over HTTP of a request for 1 token (prefill and the first
  token: what an interactive user waits for before anything shows), on the base and on adapter a0,
  ``LATENCY_REQUESTS`` requests one after the other per round;
- ``rss``: the server's peak resident memory (VmHWM of its process and any children, MiB).

**How**: 8 client threads (``httpx``), greedy (temperature 0), exactly ``--tokens`` new tokens per
request (``ignore_eos``; every response's ``usage.completion_tokens`` is checked), ``--threads``
threads in each server. A case's tokens/s is the tokens generated (from the responses' usage)
over the wall time of the round, best of ``--rounds`` rounds after one warm-up round. lora-kit
runs ``lora-kit serve`` on a temporary registry (the adapters added with ``lora-kit adapters
add``); llama.cpp runs on the base converted with its ``convert_hf_to_gguf.py --outtype TYPE``
for each of ``--types`` (``f16``, ``bf16``, ``q8_0``, ``f32``; default ``f16 bf16 q8_0``) and the
adapters converted with ``convert_lora_to_gguf.py`` (same outtype, but f16 adapters for a q8_0
base: a LoRA matrix's short rank rows do not fit q8_0's 32-value blocks, and its bytes are few),
all loaded with ``--lora ... --lora-init-without-apply``. lora-kit's base weights are bf16 on a
CPU with AVX512-BF16 or AMX (``--weight-dtype auto``), else fp32 (the report says which): its
like-for-like llama.cpp type is then bf16, or f32. The ratio columns are lora-kit / llama.cpp:
above 1 lora-kit is faster; for latency and RSS, below 1 lora-kit is faster or smaller.

**Pitfalls** (each handled here):

- Two servers at once on a 2-core machine ruin both measurements: the servers run one after
  the other, each killed (with its process group) before the next starts.
- ``--lora-init-without-apply`` does not make a request without a ``lora`` field run on the base:
  such a request gets the server's global scales, which ``GET /lora-adapters`` still lists as 1.0.
  Every llama.cpp request lists every adapter with an explicit scale: 1.0 for the chosen one, 0.0
  for the others, all 0.0 for the base.
- llama.cpp never batches requests whose ``lora`` lists differ (its server README says so):
  that is what ``mixed8`` measures, and why it is the case lora-kit is built for.
- Both servers can reuse a cached prompt prefix (llama-server a slot's last prompt, lora-kit its
  prefix cache), which would make every round after the first prefill almost nothing: llama.cpp's
  requests send ``cache_prompt: false`` and lora-kit runs with ``--prefix-cache-mib 0``, so both
  prefill every prompt (``scripts/bench_prefix_cache.py`` measures the cache).
- The machine is shared and its speed drifts by 10-25% from one minute to the next: compare the
  ratios of one run, and run nothing else meanwhile (no test suite, no second server). Before each
  server the script waits (``--wait-quiet``, up to 60 s) for other processes to leave the CPUs
  idle, and under the table it prints the share of the CPUs other processes used during each
  server's measurement, flagging the run "not quiet" above 5%.
- Both servers render the prompt with the model's own chat template (llama-server runs with
  ``--jinja``: the template in the GGUF, as Jinja, not its built-in approximations; a checkpoint
  without one, as the random Mistral-7B, gets Mistral v0.1's format, which lora-kit uses for it); the mean prompt tokens
  each server reports are printed under the table so a template difference shows, with how many
  greedy answers of the two servers start alike (the adapters' GGUF conversion is right when the
  adapter rows agree as well as the base rows do). A server whose 8 adapter answers all equal its
  base answers stops the run: its adapters were not applied.
- A llama-server built with ``GGML_NATIVE=OFF`` has AVX2 kernels only, even on an AVX-512 or AMX
  CPU: the build here passes ``-DGGML_NATIVE=ON`` (ggml's default turns off when
  ``SOURCE_DATE_EPOCH`` is set), and the report prints the build options of the binary it ran
  (from its ``CMakeCache.txt``) and a warning when they leave AVX-512 unused.

**llama-server**: ``--llama-server PATH`` and ``--llama-cpp-dir DIR`` (the llama.cpp source tree,
for its converters) use an existing build. Otherwise it is built once into
``$LORA_KIT_HOME/tools/llama.cpp/`` from the PyPI source package of ``llama-cpp-python``
(``vendor/llama.cpp``) with cmake: about 20 minutes on 2 cores, never part of ``make test``.
``--dry-run`` prints every command (build, conversions, both servers) and runs none.
``--work-dir DIR`` keeps the adapters, the registry, the GGUFs and the servers' logs there and
reuses them on the next run (otherwise a temporary directory, removed after a successful run). The
converters need ``sentencepiece`` (imported even for a ``tokenizer.json`` model): it is
installed into this venv with pip when missing.

    .venv/bin/python scripts/bench_vs_llamacpp.py [--types f16 bf16 q8_0 f32] [--rounds 3] [--tokens 64] \\
        [--model DIR --work-dir DIR] [--llama-server PATH --llama-cpp-dir DIR] [--lora-kit-arg=--adapter-dtype=bfloat16] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
from _harness import QUESTIONS as ALL_QUESTIONS
from _harness import ROOT, Serve, ServeError, cpu_summary, free_port, random_adapters, share_models_and_kernels

from lora_kit import paths
from lora_kit.errors import LoraKitError

MODEL = "smollm2-135m-instruct"
ADAPTERS = 8
LLAMA_CPP_PYTHON = "0.3.36"  # the PyPI source package that vendors llama.cpp
# GGML_NATIVE=ON explicitly: ggml turns it off by default when SOURCE_DATE_EPOCH is set, and without
# it the CPU kernels are AVX2 only, which understates llama.cpp on an AVX-512 or AMX machine.
CMAKE_FLAGS = ["-DLLAMA_CURL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]  # fmt: skip
# With LORA_KIT_CPU_ISA=avx2 (lora-kit's AVX2 paths forced) llama.cpp is built for the same ISA: AVX2,
# FMA and F16C, nothing newer, whatever this CPU has (ggml's CPU options; an AMD EPYC without AVX-512).
AVX2_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
              "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF",
              "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DGGML_AVX_VNNI=OFF"]  # fmt: skip
QUESTIONS = ALL_QUESTIONS[:8]
GGUF_TYPES = ["f16", "bf16", "q8_0", "f32"]  # convert_hf_to_gguf.py --outtype values compared
# The adapters' GGUF type for each base type: the same, but f16 for a q8_0 base (LoRA B's rows are
# rank-long, shorter than q8_0's 32-value blocks; llama.cpp's own advice is f16 adapters).
ADAPTER_TYPE = {"q8_0": "f16"}
# case -> (row label, the adapter index of each concurrent request; None = the base)
CASES: dict[str, tuple[str, list[Optional[int]]]] = {
    "base8": ("8 requests, base only", [None] * 8),
    "mixed8": ("8 requests, 8 different adapters", list(range(ADAPTERS))),
    "one8": ("8 requests, one adapter", [0] * 8),
    "base1": ("1 request, base (tokens/s of that request)", [None]),
}
# case -> (row label, the adapter index; None = the base): one request for 1 token at a time, p50 ms
LATENCY: dict[str, tuple[str, Optional[int]]] = {
    "first1": ("1-token request, base: p50 latency, ms", None),
    "first1a": ("1-token request, adapter a0: p50 latency, ms", 0),
}
LATENCY_REQUESTS = 10
RSS = "rss"
QUIET_SHARE = 0.05  # above this share of the CPUs used by other processes, a run is flagged as not quiet


class BenchError(LoraKitError):
    """The benchmark cannot run; the message says what to fix."""


@dataclass
class Server:
    """One server to measure: its command line, health route and request body builder."""

    label: str
    command: list[str]
    health: str
    body: Callable[[str, Optional[int], int, str], dict]  # (question, adapter, tokens, model) -> JSON body
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    lora_files: list[str] = field(default_factory=list)  # llama-server's --lora files, in id order
    serve: Optional[Serve] = None  # lora-kit: started (free port, readiness, stop) by the scripts' harness


@dataclass
class Round:
    """One round: every request of a case sent at once; ``seconds`` from the first send to the last answer."""

    seconds: float
    completion_tokens: int
    prompt_tokens: int
    texts: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds


# -- llama.cpp: source, build, conversions ---------------------------------------------------------


def tools_dir() -> Path:
    """Where the llama.cpp source and build are cached: ``$LORA_KIT_HOME/tools/llama.cpp``."""
    return paths.home() / "tools" / "llama.cpp"


def cached_source(cache: Path) -> Path:
    return cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


def build_isa() -> str:
    """The ISA llama.cpp is built for: ``avx2`` where ``$LORA_KIT_CPU_ISA`` forces lora-kit's AVX2
    paths, so both servers run the same instructions; else ``native`` (this CPU's own)."""
    from lora_kit.engine.backends.packed_linear import forced_avx2

    return "avx2" if forced_avx2() else "native"


def build_dir(cache: Path) -> Path:
    return cache / ("build" if build_isa() == "native" else f"build-{build_isa()}")


def cached_server(cache: Path) -> Path:
    return build_dir(cache) / "bin" / "llama-server"


def download_command(cache: Path) -> list[str]:
    pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    return [*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache / "src")]


def build_commands(source: Path, cache: Path, jobs: int) -> list[list[str]]:
    """cmake configure + build of ``llama-server`` only, for this machine's CPU (-march=native), or
    for AVX2 only under ``LORA_KIT_CPU_ISA=avx2`` (its own build directory)."""
    build = build_dir(cache)
    flags = CMAKE_FLAGS if build_isa() == "native" else [f for f in CMAKE_FLAGS if "GGML_NATIVE" not in f] + AVX2_FLAGS
    return [
        ["cmake", "-S", str(source), "-B", str(build), *flags],
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)],
    ]


def run_logged(command: list[str], log: Path, env: Optional[dict[str, str]] = None) -> None:
    """Run ``command``; its output goes to ``log``; a failure raises with the log's tail."""
    print(f"$ {shlex.join(command)}", file=sys.stderr)
    with open(log, "a") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise BenchError(f"{command[0]} failed (exit {code}); see {log}:\n{log.read_text()[-2000:]}")


def fetch_source(cache: Path) -> Path:
    """The vendored llama.cpp tree of the ``llama-cpp-python`` source package, downloaded once."""
    source = cached_source(cache)
    if source.is_dir():
        return source
    (cache / "src").mkdir(parents=True, exist_ok=True)
    archive = cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not archive.is_file():
        run_logged(download_command(cache), cache / "download.log")
    with tarfile.open(archive) as tar:
        tar.extractall(cache / "src", filter="data")
    if not source.is_dir():
        raise BenchError(f"{archive} has no vendor/llama.cpp; delete {cache} and run again")
    return source


def build_server(source: Path, cache: Path) -> Path:
    """``llama-server`` built once into ``cache/build`` (about 20 minutes on 2 cores)."""
    print(f"building llama-server once into {build_dir(cache)} (about 20 minutes on 2 cores)", file=sys.stderr)
    for command in build_commands(source, cache, os.cpu_count() or 2):
        run_logged(command, cache / "build.log")
    return cached_server(cache)


def llama_tools(args: argparse.Namespace) -> tuple[Path, Path]:
    """(llama-server binary, llama.cpp source dir): the flags' paths, else the cache, else built there."""
    cache = tools_dir()
    source = Path(args.llama_cpp_dir) if args.llama_cpp_dir else fetch_source(cache)
    if not (source / "convert_hf_to_gguf.py").is_file():
        raise BenchError(f"{source} has no convert_hf_to_gguf.py: pass --llama-cpp-dir <llama.cpp source tree>")
    binary = Path(args.llama_server) if args.llama_server else cached_server(cache)
    if not binary.is_file():
        if args.llama_server:
            raise BenchError(f"no llama-server at {binary}: fix --llama-server, or drop it to build one")
        binary = build_server(source, cache)
    return binary, source


def ensure_converter_deps() -> None:
    """The converters import sentencepiece even for a tokenizer.json model: install it if missing."""
    if importlib.util.find_spec("sentencepiece") is None:
        print("installing sentencepiece (llama.cpp's converters import it)", file=sys.stderr)
        if subprocess.call([sys.executable, "-m", "pip", "install", "-q", "sentencepiece"]) != 0:
            raise BenchError("pip could not install sentencepiece, which llama.cpp's converters import: install it")


def conversion_commands(
    source: Path, base_dir: Path, adapters: dict[str, Path], out: Path, kind: str
) -> list[tuple[list[str], Path]]:
    """(command, output file) pairs: the base to GGUF of type ``kind`` (one of ``GGUF_TYPES``) and
    every adapter to GGUF of type ``ADAPTER_TYPE.get(kind, kind)``."""
    base = out / f"base-{kind}.gguf"
    adapter_kind = ADAPTER_TYPE.get(kind, kind)
    to_gguf = [sys.executable, str(source / "convert_hf_to_gguf.py"), "--outtype", kind]
    lora_to_gguf = [sys.executable, str(source / "convert_lora_to_gguf.py"), "--outtype", adapter_kind]
    lora_to_gguf += ["--base", str(base_dir)]
    pairs = [([*to_gguf, "--outfile", str(base), str(base_dir)], base)]
    for name, adapter_dir in adapters.items():
        target = adapter_gguf(out, name, kind)
        pairs.append(([*lora_to_gguf, "--outfile", str(target), str(adapter_dir)], target))
    return pairs


def adapter_gguf(ggufs: Path, name: str, kind: str) -> Path:
    """The GGUF file of adapter ``name`` served with the ``kind`` base."""
    return ggufs / f"{name}-{ADAPTER_TYPE.get(kind, kind)}.gguf"


def convert_all(pairs: list, log: Path) -> None:
    """Run each conversion whose output does not exist yet (a reused ``--work-dir`` skips them; so
    does a q8_0 base's f16 adapter already made for the f16 base)."""
    for command, target in pairs:
        if not target.is_file():
            run_logged(command, log)


# -- adapters and the lora-kit registry ------------------------------------------------------------


def make_adapter_dirs(base_dir: Path, out: Path) -> dict[str, Path]:
    """``ADAPTERS`` random rank-8 all-linear PEFT adapters (a0..a7), made once per work dir."""
    names = [f"a{i}" for i in range(ADAPTERS)]
    if all((out / n / "adapter_model.safetensors").is_file() for n in names):
        return {n: out / n for n in names}
    return random_adapters(base_dir, out, names)


def make_home(home: Path, adapters: dict[str, Path], model: str) -> None:
    """A LORA_KIT_HOME sharing the real models and kernels, its registry holding ``adapters``."""
    done = home / "registered"
    if done.is_file():
        return
    share_models_and_kernels(home)
    env = {**os.environ, "LORA_KIT_HOME": str(home)}
    for name, adapter_dir in adapters.items():
        add = [sys.executable, "-m", "lora_kit", "adapters", "add", str(adapter_dir), "--name", name, "--base", model]
        run_logged(add, home / "adapters-add.log", env=env)
    done.write_text("\n".join(adapters))


# -- the two servers -------------------------------------------------------------------------------


def chat_body(question: str, tokens: int, model: str) -> dict:
    """The OpenAI chat body both servers get: greedy, exactly ``tokens`` new tokens."""
    messages = [{"role": "user", "content": question}]
    return {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}


def lora_kit_body(question: str, adapter: Optional[int], tokens: int, model: str) -> dict:
    """lora-kit's body: the adapter by name in ``lora``; no ``lora`` for the base."""
    return chat_body(question, tokens, model) | ({"lora": f"a{adapter}"} if adapter is not None else {})


def llama_body(question: str, adapter: Optional[int], tokens: int, model: str) -> dict:
    """llama-server's body: every adapter's scale, 1.0 for the chosen one, all 0.0 for the base
    (a request without ``lora`` would run with the server's global scales, not on the base)."""
    scales = [{"id": i, "scale": 1.0 if i == adapter else 0.0} for i in range(ADAPTERS)]
    return chat_body(question, tokens, model) | {"cache_prompt": False, "lora": scales}


def lora_kit_server(home: Path, args: argparse.Namespace) -> Server:
    """``lora-kit serve`` on ``home``'s registry, the 8 adapters preloaded, plus ``--lora-kit-arg``s."""
    flags = ["--model", args.model, "--no-ui", "--log-level", "warning", "--threads", str(args.threads)]
    flags += ["--slots", str(ADAPTERS), "--preload", *[f"a{i}" for i in range(ADAPTERS)]]
    flags += ["--prefix-cache-mib", "0", *args.lora_kit_arg]  # as llama.cpp's cache_prompt: false
    env = {"LORA_KIT_HOME": str(home)}
    serve = Serve(flags, env=env, log=home.parent / "lora-kit.log")
    return Server("lora-kit", serve.command, "/healthz", lora_kit_body, env, serve=serve)


# Mistral-7B-Instruct-v0.1's chat template, for llama-server when the checkpoint has none (the random
# checkpoints carry no template: lora-kit renders v0.1's format itself; without this llama-server
# fell back to ChatML, 35 prompt tokens against lora-kit's 15, measured)
V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def chat_template_flags(model: Optional[Path], work: Path, write: bool = True) -> list[str]:
    """``--chat-template-file`` with v0.1's template (written into ``work`` unless ``write`` is
    False) when ``model`` has no chat template of its own (llama-server would use ChatML); nothing
    when it has one (the GGUF carries it: in ``tokenizer_config.json`` or ``chat_template.jinja``)."""
    model = Path(model or "")
    config = model / "tokenizer_config.json"
    if (model / "chat_template.jinja").is_file():
        return []
    if config.is_file() and json.loads(config.read_text()).get("chat_template"):
        return []
    template = work / "mistral-v0.1.jinja"
    if write:
        template.write_text(V01_TEMPLATE)
    return ["--chat-template-file", str(template)]


def llama_server(
    binary: Path, ggufs: Path, kind: str, args: argparse.Namespace, model_dir: Optional[Path] = None, write: bool = True
) -> Server:
    """``llama-server`` on the ``kind`` GGUFs; 8 parallel slots of ``tokens + 256`` context each. With
    ``model_dir`` (the checkpoint), v0.1's chat template when it has none (see :func:`chat_template_flags`)."""
    port, ctx = free_port(), max(512, args.tokens + 256)
    files = [str(adapter_gguf(ggufs, f"a{i}", kind)) for i in range(ADAPTERS)]
    # one comma-separated --lora: a repeated --lora is deprecated ("only last value will be used")
    command = [str(binary), "-m", str(ggufs / f"base-{kind}.gguf"), "--lora", ",".join(files)]
    # --jinja: the GGUF's chat template rendered as Jinja, as lora-kit renders the model's template
    command += ["--lora-init-without-apply", "--jinja", "-np", "8", "-c", str(8 * ctx)]
    command += ["-t", str(args.threads), "-tb", str(args.threads), "--host", "127.0.0.1", "--port", str(port)]
    if model_dir is not None:
        command += chat_template_flags(model_dir, ggufs, write)
    return Server(f"llama.cpp {kind} GGUF", command, "/health", llama_body, {}, port, files)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/TID/children)."""
    found = [pid]
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            for child in children.read_text().split():
                found += process_tree(int(child))
        except OSError:
            pass  # the thread or process ended meanwhile
    return found


def busy_cpu_s(columns: tuple[int, ...] = (0, 1, 2, 5, 6)) -> float:
    """CPU-seconds all CPUs spent busy since boot (/proc/stat: user, nice, system, irq, softirq);
    ``columns=(7,)``: the time the hypervisor gave this VM's CPUs to other guests (steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return sum(int(fields[i]) for i in columns) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU-seconds (user + system) used so far by ``pid`` and its descendants."""
    total = 0
    for each in process_tree(pid):
        try:
            stat = Path(f"/proc/{each}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


class OthersMeter:
    """The share of the machine's CPUs that processes other than the server and this script used
    meanwhile: on a shared machine, the sign that a measurement is not quiet."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float, float, float]:
        own = os.times()
        return time.monotonic(), busy_cpu_s(), tree_cpu_s(self.pid), own.user + own.system, busy_cpu_s((7,))

    def share(self) -> float:
        """Others' CPU-seconds / (wall seconds x CPUs) since this meter started."""
        return self.shares()[0]

    def shares(self) -> tuple[float, float]:
        """(others' share, the hypervisor's steal share) of the CPUs since this meter started."""
        end = self._sample()
        wall, busy, server, own, steal = (b - a for a, b in zip(self.start, end))
        capacity = wall * (os.cpu_count() or 1)
        return max(0.0, busy - server - own) / capacity, steal / capacity


def wait_for_quiet(limit_s: float, window_s: float = 5.0) -> float:
    """Wait (up to ``limit_s``) for a ``window_s`` window in which other processes use at most
    ``QUIET_SHARE`` of the CPUs; the share of the last window."""
    deadline = time.monotonic() + limit_s
    while True:
        meter = OthersMeter(os.getpid())
        time.sleep(window_s)
        share = meter.share()
        if share <= QUIET_SHARE or time.monotonic() >= deadline:
            return share
        print(f"other processes use {share:.0%} of the CPUs; waiting for a quiet machine", file=sys.stderr)


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of ``pid`` and its descendants, summed, in MiB."""
    total_kib = 0
    for each in process_tree(pid):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        total_kib += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return total_kib / 1024


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            how = (
                f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
            )
            raise BenchError(f"the server died ({how}) before it was ready; its log {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise BenchError(f"the server was not ready after {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running(server: Server, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """The server started in a process group of its own, ready; stopped (the group) on exit."""
    print(f"$ {shlex.join(server.command)}", file=sys.stderr)
    if server.serve is not None:
        try:
            with server.serve as started:
                assert started.proc is not None and started.url is not None
                yield started.proc, started.url
        except ServeError as err:
            raise BenchError(str(err)) from None
        return
    url = f"http://127.0.0.1:{server.port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            server.command,
            env={**os.environ, **server.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(proc, url + server.health, log)
        yield proc, url
    finally:
        stop(proc)


# -- measuring -------------------------------------------------------------------------------------


def served_model(client: httpx.Client, url: str) -> str:
    """The id the server lists first on ``/v1/models`` (its base model)."""
    return client.get(url + "/v1/models").raise_for_status().json()["data"][0]["id"]


def check_llama_adapters(client: httpx.Client, url: str, ggufs: list[str]) -> None:
    """llama-server's adapter ids are the order of its ``--lora`` flags. (It lists them at scale
    1.0 even with ``--lora-init-without-apply``: the global scales a request without ``lora`` gets.)"""
    listed = client.get(url + "/lora-adapters").raise_for_status().json()
    got = [(a["id"], Path(a["path"]).name) for a in listed]
    if got != list(enumerate(ggufs)):
        raise BenchError(f"llama-server lists its adapters as {got}, expected {list(enumerate(ggufs))}")


def ask(client: httpx.Client, url: str, body: dict, tokens: int) -> tuple[int, str]:
    """One chat completion: (prompt tokens, text); it must have generated exactly ``tokens``."""
    try:
        resp = client.post(url + "/v1/chat/completions", json=body)
    except httpx.HTTPError as err:
        raise BenchError(f"{url} did not answer ({err}); see the server's log in the work directory") from err
    if resp.status_code != 200:
        raise BenchError(f"{url} answered {resp.status_code}: {resp.text[:500]}")
    data = resp.json()
    usage = data["usage"]
    if usage["completion_tokens"] != tokens:
        raise BenchError(f"{url} generated {usage['completion_tokens']} tokens, not {tokens}: ignore_eos not honoured")
    return usage["prompt_tokens"], data["choices"][0]["message"]["content"]


def run_round(client: httpx.Client, pool: ThreadPoolExecutor, url: str, bodies: list[dict], tokens: int) -> Round:
    """All ``bodies`` sent at once, one client thread each; timed from the first send to the last answer."""
    start = time.perf_counter()
    answers = list(pool.map(lambda body: ask(client, url, body, tokens), bodies))
    seconds = time.perf_counter() - start
    return Round(seconds, tokens * len(bodies), sum(p for p, _ in answers), [t for _, t in answers])


def measure_case(
    client: httpx.Client, pool: ThreadPoolExecutor, url: str, bodies: list[dict], args: argparse.Namespace
) -> dict:
    """One warm-up round, then ``args.rounds`` rounds; the best round's tokens/s."""
    run_round(client, pool, url, bodies, args.tokens)
    rounds = [run_round(client, pool, url, bodies, args.tokens) for _ in range(args.rounds)]
    best = max(rounds, key=lambda r: r.tokens_per_s)
    return {
        "tokens_per_s": best.tokens_per_s,
        "rounds_tokens_per_s": [r.tokens_per_s for r in rounds],
        "prompt_tokens_mean": best.prompt_tokens / len(bodies),
        "texts": best.texts,
    }


def measure_latency(client: httpx.Client, url: str, body: dict, args: argparse.Namespace) -> dict:
    """Two warm-up requests, then ``args.rounds`` rounds of ``LATENCY_REQUESTS`` requests for 1 token,
    one after the other: the p50 of each round in ms, the best round's kept."""
    for _ in range(2):
        ask(client, url, body, 1)
    medians = []
    for _ in range(args.rounds):
        took = []
        for _ in range(LATENCY_REQUESTS):
            start = time.perf_counter()
            prompt_tokens, text = ask(client, url, body, 1)
            took.append(1000 * (time.perf_counter() - start))
        medians.append(statistics.median(took))
    return {"p50_ms": min(medians), "rounds_p50_ms": medians, "prompt_tokens_mean": prompt_tokens, "texts": [text]}


def measure_server(server: Server, cases: list[str], args: argparse.Namespace, log: Path) -> dict:
    """Every case on ``server`` (started here, stopped before returning), then its peak RSS."""
    results: dict = {"command": server.command}
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    with running(server, log) as (proc, url), httpx.Client(timeout=600) as client, ThreadPoolExecutor(8) as pool:
        model = served_model(client, url)
        if server.lora_files:
            check_llama_adapters(client, url, [Path(f).name for f in server.lora_files])
        others = OthersMeter(proc.pid)
        for case in cases:
            if case in LATENCY:
                results[case] = measure_latency(
                    client, url, server.body(QUESTIONS[0], LATENCY[case][1], 1, model), args
                )
                print(f"{server.label} {case}: {results[case]['p50_ms']:.0f} ms", file=sys.stderr)
                continue
            bodies = [server.body(QUESTIONS[i], a, args.tokens, model) for i, a in enumerate(CASES[case][1])]
            results[case] = measure_case(client, pool, url, bodies, args)
            print(f"{server.label} {case}: {results[case]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        results["others_cpu_share"], results["steal_cpu_share"] = others.shares()
        results[RSS] = peak_rss_mib(proc.pid)
    check_adapters_applied(server.label, results)
    return results


def check_adapters_applied(label: str, results: dict) -> None:
    """Greedy answers on 8 random adapters must not all equal the base's to the same questions."""
    if "base8" in results and "mixed8" in results and results["base8"]["texts"] == results["mixed8"]["texts"]:
        raise BenchError(f"{label}: every adapter request answered exactly as the base: the adapters were not applied")


def same_start(ours: list[str], theirs: list[str], chars: int = 20) -> int:
    """How many answers of two servers to the same questions share their first ``chars`` characters."""
    return sum(a[:chars] == b[:chars] for a, b in zip(ours, theirs))


# -- the report ------------------------------------------------------------------------------------


def ratio_cell(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


def table(results: dict[str, dict], cases: list[str], kinds: list[str]) -> list[str]:
    """The Markdown table: a row per case, lora-kit and each llama.cpp GGUF with the ratio lora-kit / it."""
    ours = results["lora-kit"]
    head = "| case (tokens/s unless said) | lora-kit |" + "".join(f" llama.cpp {k} GGUF | ratio |" for k in kinds)
    lines = [head, "|---|---:|" + "---:|---:|" * len(kinds)]
    for case in cases:
        if case == RSS:
            cells = [f"{ours[RSS]:.0f} MiB"]
            for k in kinds:
                theirs = results[f"llama.cpp {k} GGUF"][RSS]
                cells += [f"{theirs:.0f} MiB", ratio_cell(ours[RSS], theirs)]
            lines.append("| peak RSS of the server | " + " | ".join(cells) + " |")
            continue
        if case in LATENCY:
            cells = [f"{ours[case]['p50_ms']:.0f}"]
            for k in kinds:
                theirs = results[f"llama.cpp {k} GGUF"][case]["p50_ms"]
                cells += [f"{theirs:.0f}", ratio_cell(ours[case]["p50_ms"], theirs)]
            lines.append(f"| {LATENCY[case][0]} | " + " | ".join(cells) + " |")
            continue
        cells = [f"{ours[case]['tokens_per_s']:.1f}"]
        for k in kinds:
            theirs = results[f"llama.cpp {k} GGUF"][case]["tokens_per_s"]
            cells += [f"{theirs:.1f}", ratio_cell(ours[case]["tokens_per_s"], theirs)]
        lines.append(f"| {CASES[case][0]} | " + " | ".join(cells) + " |")
    return lines


def notes(results: dict[str, dict], kinds: list[str]) -> list[str]:
    """Lines under the table: prompt tokens and CPU noise per server, how many answers agree."""
    out = []
    for label, res in results.items():
        prompts = [f"{c} {res[c]['prompt_tokens_mean']:.0f}" for c in CASES if c in res]
        out.append(
            f"- {label}: mean prompt tokens per request: {', '.join(prompts)}; other processes used "
            f"{res['others_cpu_share']:.0%} of the CPUs meanwhile, hypervisor steal {res['steal_cpu_share']:.0%}"
        )
    if max(res["others_cpu_share"] for res in results.values()) > QUIET_SHARE:
        out.append(
            f"- **not quiet**: other processes used more than {QUIET_SHARE:.0%} of the CPUs during a "
            "measurement; rerun on an idle machine before recording these figures"
        )
    ours = results["lora-kit"]
    for k in kinds:
        theirs = results[f"llama.cpp {k} GGUF"]
        agree = [
            f"{c} {same_start(ours[c]['texts'], theirs[c]['texts'])}/{len(CASES[c][1])}" for c in CASES if c in ours
        ]
        out.append(
            f"- greedy answers starting with the same 20 characters, lora-kit vs llama.cpp {k}: {', '.join(agree)}"
        )
    return out


def report(results: dict[str, dict], cases: list[str], args: argparse.Namespace, binary: Path) -> str:
    version, warning = server_version(binary), build_warning(binary)
    command = shlex.join([".venv/bin/python", "scripts/bench_vs_llamacpp.py", *sys.argv[1:]])
    lines = [
        "```",
        command,
        "```",
        "",
        f"{model_label(args.model)}, {ADAPTERS} random rank-8 all-linear adapters; /v1/chat/completions, greedy, "
        f"{args.tokens} new tokens per request (ignore_eos), {args.threads} threads per server, "
        f"best of {args.rounds} round(s) after a warm-up; ratio = lora-kit / llama.cpp",
        f"CPU: {cpu_summary()}; ISA both servers run: {build_isa()} (LORA_KIT_CPU_ISA); "
        f"llama-server {version}; {lora_kit_version()}, base weights "
        f"{lora_kit_weights(args)}, `lora-kit serve` extra args: {' '.join(args.lora_kit_arg) or 'none'}",
        "",
    ]
    return "\n".join(lines + table(results, cases, args.types) + [""] + notes(results, args.types) + warning)


def model_label(model: str) -> str:
    """The model as the report names it: the embedded default by name, a directory by its last part."""
    return model if model == MODEL else f"{Path(model).name} ({model})"


def lora_kit_weights(args: argparse.Namespace) -> str:
    """The dtype lora-kit's server packs its base weights in: its ``--weight-dtype`` (from
    ``--lora-kit-arg``), else ``auto``'s choice on this CPU (what ``select_backend`` decides)."""
    from lora_kit.engine.backends.packed_linear import native_bf16

    given = [a.split("=", 1)[1] for a in args.lora_kit_arg if a.startswith("--weight-dtype=")]
    if given and given[-1] != "auto":
        return given[-1]
    return f"{'bfloat16' if native_bf16() else 'float32'} (--weight-dtype auto on this CPU)"


def lora_kit_version() -> str:
    """The lora-kit source measured: its git commit, and whether ``lora_kit/`` had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "lora_kit"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "lora-kit (no git)"
    changes = ", with uncommitted changes in lora_kit/" if dirty.stdout.strip() else ""
    return f"lora-kit at {commit.stdout.strip() or '?'}{changes}"


def server_version(binary: Path) -> str:
    """llama-server's version line and, from its build's CMakeCache.txt, the CPU options it was built with."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    version = next((ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")), "?")
    options = build_options(binary)
    return f"{version}, built with {' '.join(f'{k}={v}' for k, v in options.items())}" if options else version


def build_options(binary: Path) -> dict[str, str]:
    """The CPU-related ggml options of the build ``binary`` came from (empty if its CMakeCache is gone)."""
    cache = binary.resolve().parent.parent / "CMakeCache.txt"
    if not cache.is_file():
        return {}
    wanted = (
        "GGML_NATIVE",
        "GGML_AVX2",
        "GGML_AVX512",
        "GGML_AVX512_BF16",
        "GGML_AMX_BF16",
        "GGML_OPENMP",
        "GGML_BLAS",
    )
    entries = (ln.split("=", 1) for ln in cache.read_text().splitlines() if "=" in ln and not ln.startswith("//"))
    return {key.split(":")[0]: value for key, value in entries if key.split(":")[0] in wanted}


def build_warning(binary: Path) -> list[str]:
    """A note when llama-server lacks the AVX-512 kernels this CPU could run (its figures are then low)."""
    options = build_options(binary)
    has_avx512 = "avx512f" in cpu_summary().replace(",", " ").split()
    if build_isa() == "avx2":  # AVX2 only on purpose: both servers on the AVX2 paths
        return []
    if has_avx512 and options.get("GGML_NATIVE") == "OFF" and options.get("GGML_AVX512") != "ON":
        return [
            "- **llama-server lacks AVX-512**: it was built with GGML_NATIVE=OFF and GGML_AVX512=OFF on a CPU "
            "with AVX-512, so llama.cpp may run slower here than in a native build; drop --llama-server "
            "to build one with -DGGML_NATIVE=ON"
        ]
    return []


# -- main ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds per case, after one warm-up (best is kept)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument(
        "--model",
        default=MODEL,
        help="the base: the embedded default, or a local Llama/Mistral checkpoint directory (e.g. a random "
        "Mistral-7B from scripts/make_random_model.py: the mission's size); its adapters and GGUFs are made "
        "from it, so give each model its own --work-dir",
    )
    ap.add_argument("--threads", type=int, default=2, help="threads of each server")
    every = [*CASES, *LATENCY, RSS]
    ap.add_argument("--cases", nargs="+", choices=every, default=every, help="rows to measure")
    ap.add_argument(
        "--types",
        nargs="+",
        choices=GGUF_TYPES,
        default=["f16", "bf16", "q8_0"],
        help="llama.cpp GGUF types of the base, each a server of its own (bf16: like for like with lora-kit's bf16 weights)",
    )
    ap.add_argument("--llama-server", help="an existing llama-server binary (default: build one into the cache)")
    ap.add_argument("--llama-cpp-dir", help="an existing llama.cpp source tree, for its converters")
    ap.add_argument(
        "--lora-kit-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for `lora-kit serve` (repeatable; write --lora-kit-arg=--flag=value)",
    )
    ap.add_argument("--work-dir", type=Path, help="keep adapters, GGUFs and logs here and reuse them next time")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60,
        metavar="S",
        help="before each server, wait up to S seconds for other processes to leave the CPUs idle (0: do not wait)",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="print every command (build, conversions, servers), run none"
    )
    args = ap.parse_args()
    if args.rounds < 1 or args.tokens < 1 or args.threads < 1:
        ap.error("--rounds, --tokens and --threads must be at least 1")
    return args


def plan(args: argparse.Namespace, work: Path) -> list[str]:
    """Every command the run would execute, in order, as shell lines."""
    cache = tools_dir()
    source = Path(args.llama_cpp_dir) if args.llama_cpp_dir else cached_source(cache)
    binary = Path(args.llama_server) if args.llama_server else cached_server(cache)
    lines = []
    if not args.llama_cpp_dir and not source.is_dir():
        lines += [shlex.join(download_command(cache)), f"# unpack llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"]
    if not args.llama_server and not binary.is_file():
        lines += [shlex.join(c) for c in build_commands(source, cache, os.cpu_count() or 2)]
    if importlib.util.find_spec("sentencepiece") is None:
        lines.append(f"{sys.executable} -m pip install -q sentencepiece")
    base_dir = paths.models_dir() / args.model if args.model == MODEL else Path(args.model)
    adapters = {f"a{i}": work / "adapters" / f"a{i}" for i in range(ADAPTERS)}
    lines.append(
        f"# make {ADAPTERS} random rank-8 all-linear adapters in {work / 'adapters'} (_harness.random_adapters)"
    )
    lines += [
        f"LORA_KIT_HOME={work / 'home'} {sys.executable} -m lora_kit adapters add {d} --name {n} --base {args.model}"
        for n, d in adapters.items()
    ]
    for kind in args.types:
        lines += [shlex.join(c) for c, _ in conversion_commands(source, base_dir, adapters, work / "gguf", kind)]
    servers = [lora_kit_server(work / "home", args)]
    servers += [llama_server(binary, work / "gguf", kind, args, base_dir, write=False) for kind in args.types]
    return lines + [shlex.join(s.command) for s in servers]


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The llama-server binary and the base's checkpoint directory, with the adapters registered and
    every GGUF converted under ``work``."""
    from lora_kit import models

    binary, source = llama_tools(args)
    ensure_converter_deps()
    base_dir = Path(models.resolve(args.model))
    adapters = make_adapter_dirs(base_dir, work / "adapters")
    make_home(work / "home", adapters, args.model)
    (work / "gguf").mkdir(exist_ok=True)
    for kind in args.types:
        convert_all(conversion_commands(source, base_dir, adapters, work / "gguf", kind), work / "convert.log")
    return binary, base_dir


def run(args: argparse.Namespace, work: Path) -> str:
    """Prepare, measure every server one after the other, and return the Markdown report."""
    binary, base_dir = prepare(args, work)
    servers = [lora_kit_server(work / "home", args)]
    servers += [llama_server(binary, work / "gguf", kind, args, base_dir) for kind in args.types]
    cases = [c for c in [*CASES, *LATENCY] if c in args.cases]  # the measured ones, in table order
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}  # llama.cpp GGUF type -> why its server gave no figures
    for server in servers:
        try:
            results[server.label] = measure_server(server, cases, args, work / f"{server.label.replace(' ', '-')}.log")
        except BenchError as err:
            if server.serve is not None:  # lora-kit itself: nothing to compare with
                raise
            kind = server.label.removeprefix("llama.cpp ").removesuffix(" GGUF")
            failed[kind] = str(err).splitlines()[0]
            print(f"warning: llama.cpp {kind} gave no figures: {failed[kind]}", file=sys.stderr)
    if args.json:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "failed": failed}
        args.json.write_text(json.dumps(payload, indent=2))
    args.types = [k for k in args.types if k not in failed]
    text = report(results, [c for c in [*CASES, *LATENCY, RSS] if c in args.cases], args, binary)
    return text + "".join(f"\n- **llama.cpp {k} gave no figures**: {why}" for k, why in failed.items())


def main() -> int:
    args = parse_args()
    if args.dry_run:
        print("\n".join(plan(args, args.work_dir or Path(tempfile.gettempdir()) / "bench-vs-llamacpp-XXXX")))
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-vs-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(run(args, work))
    except BenchError as err:
        kept = (
            "" if args.work_dir else f" (its files and logs are kept in {work}: delete it, or reuse it with --work-dir)"
        )
        print(f"error: {err}{kept}", file=sys.stderr)
        return 2
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
