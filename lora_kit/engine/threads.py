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
sets the intra-op thread count for itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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
        torch.set_num_threads(threads or engine_threads())
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
