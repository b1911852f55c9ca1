"""The CPU BGMV kernel (``csrc/bgmv.cpp``): built once per machine, loaded as ``torch.ops.lora_kit.bgmv_``.

The kernel is compiled with the machine's C++ compiler against the installed torch's
headers (a few seconds; no ninja, no pybind) into ``$LORA_KIT_HOME/kernels/<key>/``, where
the key hashes the source, the torch version, the compiler and this CPU's instruction-set
flags (it is built with ``-march=native``, so a shared home never hands one CPU a library
built for another; ``$LORA_KIT_KERNEL_MARCH`` names another target, e.g. ``x86-64`` to build the
plain C++ paths that CPUs without AVX2 run, for their tests). A failed build is logged once (a warning on the ``lora_kit.engine``
logger) and the CPU backend adds the LoRA rows with torch's products instead;
``LORA_KIT_ENGINE_BACKEND=torch`` (see :mod:`lora_kit.engine.backends`) never loads it.

It links against torch's own ``libc10``/``libtorch_cpu`` and uses their OpenMP runtime:
``-fopenmp`` is given when compiling only, so the library never pulls in a second libgomp
(two OpenMP pools in one process make every parallel region pay a wake-up; see ``threads``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "bgmv.cpp"
# Every source of the library: the BGMV ops, the weight-only linears (wo_linear.cpp) and the bf16
# products on lora-kit's tiled layout (bf16_tiles.cpp).
SOURCES = (SOURCE, SOURCE.with_name("wo_linear.cpp"), SOURCE.with_name("bf16_tiles.cpp"))
MAX_RANK = 256  # kMaxRank in bgmv.cpp: higher (padded) ranks take the torch path
# The -march the library is built for: this CPU's own by default. A portable target (x86-64: no
# AVX2, no FMA) builds the kernels' plain C++ paths, so a test can run them on any machine.
MARCH_ENV = "LORA_KIT_KERNEL_MARCH"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool, "error": str, "path": Path
logger = logging.getLogger(__name__)


def compiler() -> str | None:
    """The C++ compiler the kernel is built with: ``$CXX``, else ``c++`` or ``g++`` on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def cpu_flags() -> str:
    """This CPU's ``flags`` line of /proc/cpuinfo (empty where there is none): what the kernel is
    built for, and what the CPU backend reads to choose its packing dtype."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def march() -> str:
    """The ``-march`` the library is built for: ``$LORA_KIT_KERNEL_MARCH``, else ``native``."""
    value = (os.environ.get(MARCH_ENV) or "native").strip()
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError(f"{MARCH_ENV} must be a -march value such as native or x86-64, not {value!r}")
    return value


def _command(compiler: str, objs: dict[Path, Path], lib: Path) -> list[list[str]]:
    """The commands that compile each source of ``objs`` (source -> object) and link ``lib``."""
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib_dirs = cpp_extension.library_paths()
    compiles = [[compiler, "-c", str(source), "-o", str(obj), "-O3", f"-march={march()}", "-fopenmp", "-fPIC",
                 "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w", *includes]
                for source, obj in objs.items()]  # fmt: skip
    link = [compiler, "-shared", *map(str, objs.values()), "-o", str(lib), *[f"-L{d}" for d in lib_dirs], "-lc10",
            "-ltorch_cpu", *[f"-Wl,-rpath,{d}" for d in lib_dirs]]  # fmt: skip
    return [*compiles, link]


def library_path(compiler: str) -> Path:
    """Where the library for this source, torch, compiler and CPU lives."""
    from lora_kit import paths

    key = hashlib.sha256()
    for part in (
        *(source.read_bytes() for source in SOURCES),
        torch.__version__.encode(),
        torch.__file__.encode(),
        compiler.encode(),
        cpu_flags().encode(),
        march().encode(),
    ):
        key.update(part)
        key.update(b"\0")
    return paths.kernels_dir() / f"bgmv-{key.hexdigest()[:16]}" / "lora_kit_bgmv.so"


def build(compiler: str, target: Path) -> None:
    """Compile the kernel into ``target`` (installed atomically: concurrent builders are safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        objs = {source: Path(tmp) / f"{source.stem}.o" for source in SOURCES}
        for cmd in _command(compiler, objs, Path(tmp) / target.name):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd[:3])} ...` failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(Path(tmp) / target.name, target)


def load() -> bool:
    """Build (once) and load the kernel; False, with the reason in :func:`error`, when it cannot be used."""
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = False
            _load()
            if not _state["loaded"]:
                logger.warning("the CPU LoRA kernel is not used (%s); using torch's bmm instead", _state["error"])
        return bool(_state["loaded"])


def _load() -> None:
    """Build the library if this machine has none yet, then load it; records the outcome in ``_state``."""
    if not sys.platform.startswith("linux"):
        _state["error"] = "only built on Linux"
        return
    cxx = compiler()
    if cxx is None:
        _state["error"] = "no C++ compiler found (set CXX)"
        return
    target = library_path(cxx)
    try:
        if not target.exists():
            logger.warning("building the CPU LoRA kernel into %s (once, a few seconds)", target.parent)
            build(cxx, target)
        torch.ops.load_library(str(target))
        _state.update(loaded=True, path=target)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _state["error"] = str(err)


def loaded_path() -> Path | None:
    """The loaded library's path (None when not loaded)."""
    return _state.get("path")  # type: ignore[return-value]


def error() -> str | None:
    """Why the kernel is not loaded (None when it is, or when :func:`load` was not called)."""
    return _state.get("error")  # type: ignore[return-value]


def op() -> Callable[..., None]:
    """The loaded op, ``op(out, x, lora_a, lora_b, slots)`` (:func:`load` must have returned True).

    ``out[n] += (x[n] @ lora_a[s].T) @ lora_b[s]`` in place, for every row ``n`` of ``x``
    (..., I) and ``out`` (..., O), fp32 and contiguous, where ``s = slots[n // (rows / len(slots))]``
    (one slot per sequence; a negative slot adds nothing). ``lora_a`` (S, R, I), ``lora_b``
    (S, R, O): fp32 or bf16, contiguous. Callers keep the handle: looking it up costs per call.
    """
    return torch.ops.lora_kit.bgmv_


def mix_op() -> Callable[..., None]:
    """The weighted-mix op, ``mix_op(out, x, lora_a, lora_b, slots, scales)``: as :func:`op`, but
    ``slots`` and ``scales`` (fp32) are (M, K) and each row adds ``sum_k scales[m, k] * (x[n] @
    lora_a[s_k].T) @ lora_b[s_k]`` over its K slots (a negative slot adds nothing)."""
    return torch.ops.lora_kit.bgmv_mix_
