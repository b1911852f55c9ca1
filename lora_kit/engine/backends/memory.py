"""Giving memory back while the CPU backend repacks a model: the peak RSS of loading a server.

Packing reads every dense weight once and keeps a repacked copy. Two things then hold memory
the server never uses again, and both count in its resident set (and in its peak, which is
what a machine must have):

- the checkpoint's pages: transformers maps the safetensors file and its tensors are views
  of that mapping, so every page packing reads stays resident until the mapping goes (at
  the end, :func:`~.packed_linear.copy_unpacked_weights`). Measured on the embedded model
  (fp32 file, bf16 packing): the peak while packing was 1384 MiB against 872 MiB after it.
  :func:`drop_file_pages` releases a packed weight's pages as soon as its copy exists: the
  mapping is private and read-only, so the kernel just forgets them (a later read, if any,
  would fault them back in from the file; nothing is lost).
- freed heap: glibc keeps freed blocks in its arenas; :func:`trim_heap` returns them.

Both are Linux/glibc calls through ctypes; elsewhere they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import sys

import torch

logger = logging.getLogger(__name__)
_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """The (start, end) address ranges of this process's mappings of files named ``*suffix``."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].endswith(suffix):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def drop_file_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> int:
    """Release the whole pages of ``tensor``'s bytes that lie in one of the file ``mappings``
    (see :func:`file_mappings`); returns the bytes released. Anonymous memory is never touched
    (MADV_DONTNEED would zero it), only pages inside a listed file mapping."""
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or tensor.is_mkldnn or not tensor.numel():
        return 0
    if not in_mappings(tensor, mappings):
        return 0
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, end // page * page
    if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0:
        return last - first
    return 0


def in_mappings(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> bool:
    """Whether all of ``tensor``'s bytes lie inside one of the address ``mappings``."""
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    return any(start <= begin and end <= stop for start, stop in mappings)


def trim_heap() -> None:
    """Return the heap's free blocks to the system (glibc ``malloc_trim``)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
