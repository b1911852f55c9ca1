"""CPU threads: the decode loop owns the process's only OpenMP pool.

The CPU torch wheel uses GNU OpenMP, which keeps a pool of worker threads for every thread
that ever ran a parallel region. Once the workers of all pools outnumber the cores, idle
workers stop spinning and sleep, and every parallel region pays a futex wake-up. A decode
step of a small model is hundreds of small ops, so a loop thread started after the main
thread had loaded the model ran 1.5-2x slower per step with adapters (a rank-8 LoRA
product: 15 us in the main thread, 110 us in the loop thread; see BENCHMARKS.md).

So a process whose heavy work is the engine (``lora-kit serve``, ``lora-kit generate``)
calls :func:`dedicate_cpu_threads` first: its main thread stays single-threaded (no pool),
model loading runs in a short-lived thread (whose pool ends with it), and the decode loop
sets the intra-op thread count for itself (:func:`set_thread_count`). Heavy work asked for by
another long-lived thread (an adapter loaded on demand by a server's ``asyncio.to_thread``
worker) runs on a short-lived thread too: that worker's pool halved a server's throughput for
the rest of its life (16 clients: 174 against 301 tok/s with the adapters preloaded; one request
15 against 32 tok/s; BENCHMARKS.md). Once the loop runs, no thread sets torch a count other
than the engine's (``torch.set_num_threads`` also sets MKL's process-wide count: a server
thread setting 1 held the loop's products to one core); a thread that must stay at one thread
uses :func:`single_threaded`, which goes through OpenMP only.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

_engine_threads: int | None = None


def dedicate_cpu_threads() -> int:
    """Keep the calling (main) thread single-threaded; return the thread count for the engine.

    Call before any torch work in that thread. Only the calling thread is pinned to one
    thread: torch initializes each thread's OpenMP setting once, on its first use.
    """
    global _engine_threads
    if _engine_threads is None:
        _engine_threads = torch.get_num_threads()  # also initializes this thread's setting
        torch.set_num_threads(1)
    return _engine_threads


def set_thread_count(threads: int) -> None:
    """Set the calling thread's intra-op threads to ``threads``, for good.

    torch keeps one process-wide count (the last any thread set) and applies it to a thread
    lazily, at the thread's first parallel op or count query, over whatever that thread had set
    itself. So a decode loop that set 2 and ran its first op after a server thread set 1 ran
    single-threaded (measured: a Ray replica's engine used one core of two). Querying first makes
    that lazy step happen now; the count set after it stays.
    """
    torch.get_num_threads()
    torch.set_num_threads(threads)


_pinned = threading.local()


def single_threaded() -> None:
    """Keep the calling thread at one intra-op thread (once per thread), so it never starts an
    OpenMP pool of its own next to the decode loop's.

    Through OpenMP itself, not ``torch.set_num_threads(1)``: torch's setter also sets MKL's
    process-wide count, and server threads setting 1 that way held the decode loop's products to
    one core (16 clients: 209 tok/s against 296 without them, the loop's own count locked at 2;
    BENCHMARKS.md). Light work only: MKL's own calls in this thread still use MKL's count."""
    if getattr(_pinned, "done", False):
        return
    torch.get_num_threads()  # torch's lazy per-thread setup happens now, not over the count below
    set_team = _openmp_set_num_threads()
    if set_team is not None:
        set_team(1)
    else:  # no OpenMP runtime found in the process: torch's own setter
        torch.set_num_threads(1)
    _pinned.done = True


@functools.cache
def _openmp_set_num_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded (its own libgomp, or libiomp),
    which sets the calling thread's team size only; None when none is loaded."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for path in sorted(set(re.findall(r"/\S*lib[gi]omp[^/\s]*\.so[^/\s]*", maps))):
        try:
            return ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


def engine_threads() -> int:
    """Intra-op threads for the engine's own threads (the count before dedicating, if any)."""
    return _engine_threads if _engine_threads is not None else torch.get_num_threads()


def run_in_thread(fn: Callable[[], T], threads: int | None = None) -> T:
    """Run ``fn`` in a new thread with ``threads`` intra-op threads, wait, return its result.

    The thread's OpenMP pool ends with it, so heavy one-off work (loading a model) leaves no
    sleeping workers behind to slow the decode loop.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        set_thread_count(threads or engine_threads())
        try:
            result.append(fn())
        except BaseException as err:  # re-raised in the caller's thread
            error.append(err)

    worker = threading.Thread(target=target, name="lora-kit-worker")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]
