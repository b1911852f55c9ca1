"""Compute backends: how a forward adds each row's LoRA, and whether the base weights are repacked.

The backend is chosen by platform, not by a user flag (as vLLM picks its kernels by platform):

- ``cpu``, for a model on the CPU: dense fp32/bf16 base weights and the output head are
  repacked for oneDNN (:mod:`.packed_linear`: ~1.8x faster decoding, results equal to
  transformers' up to float rounding) -- in bf16 under an fp32 model when the engine's
  ``weight_dtype`` says so (``auto``: where the CPU multiplies bf16 natively; on AMX CPUs held
  in lora-kit's tiled layout for its own kernel, ``csrc/bf16_tiles.cpp``), and the rows' LoRA products are added by the BGMV
  kernel (:mod:`.bgmv`, ``csrc/bgmv.cpp``, built once per machine) when the model computes in
  fp32, adapters are fp32 or bf16 and ranks are at most ``bgmv.MAX_RANK``. Otherwise, or where
  the kernel cannot be built (no C++ compiler), torch's products add them.
- ``torch``, for CUDA and every other device: transformers' own linear kernels, and torch's
  matmul/``bmm`` for the LoRA rows (:class:`~lora_kit.engine.lora_layer.BatchedLoraLinear`).

One environment override, for debugging and benchmarks: ``LORA_KIT_ENGINE_BACKEND=torch``
forces the torch backend on the CPU as well (bit-exact with transformers: the reference the
CPU backend is tested and benchmarked against); ``cpu`` forces the CPU backend (CPU models
only); unset or ``auto`` chooses by platform. Tests and benchmarks that need both backends in
one process pass ``backend=`` to :class:`~lora_kit.engine.Engine` instead (it wins over the
environment); neither is a CLI flag.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lora_kit.engine.backends import bgmv, memory
from lora_kit.engine.backends.packed_linear import (
    can_pack,
    copy_unpacked_weights,
    narrow_input_embeddings,
    native_bf16,
    pack_output_head,
)

ENV = "LORA_KIT_ENGINE_BACKEND"
logger = logging.getLogger(__name__)
CHOICES = ("auto", "cpu", "torch")


class Backend(ABC):
    """What the engine asks of a backend: a LoRA op for the rows, and the base weights prepared."""

    name: str
    lora_kernel: Callable[..., None] | None = None
    """``op(out, x, lora_a, lora_b, slots)``, adding each row's LoRA in place (see :func:`.bgmv.op`);
    None: :class:`~lora_kit.engine.lora_layer.BatchedLoraLinear` uses torch's products."""
    lora_mix_kernel: Callable[..., None] | None = None
    """``op(out, x, lora_a, lora_b, slots, scales)`` for rows that mix several adapters (see
    :func:`.bgmv.mix_op`); set together with ``lora_kernel``."""

    @abstractmethod
    def prepare(self, model: Any, layers: Iterable[Any], batch_hint: int) -> int:
        """Ready the base weights of ``model`` (its wrapped ``layers``) before serving, for
        batches of about ``batch_hint`` rows; returns how many layers were repacked."""

    weight_dtype: torch.dtype | None = None
    """The dtype the base's dense weights are packed in; None: left as loaded."""

    @property
    def lora_path(self) -> str:
        """How the LoRA rows are added, in words (benchmarks print it)."""
        return "BGMV kernel" if self.lora_kernel is not None else "torch bmm"


class TorchBackend(Backend):
    """transformers' own linear kernels; torch's matmul/bmm for the LoRA rows."""

    name = "torch"

    def prepare(self, model: Any, layers: Iterable[Any], batch_hint: int) -> int:
        return 0


class CpuBackend(Backend):
    """oneDNN-packed base weights; the BGMV kernel for the LoRA rows where it fits and was built."""

    name = "cpu"

    def __init__(
        self,
        lora_kernel: Callable[..., None] | None,
        weight_dtype: torch.dtype | None = None,
        io_dtype: torch.dtype | None = None,
    ) -> None:
        self.lora_kernel = lora_kernel
        self.lora_mix_kernel = bgmv.mix_op() if lora_kernel is not None else None
        self.weight_dtype = weight_dtype
        self.io_dtype = io_dtype  # what the layers take and return (None: their weights' dtype)

    def prepare(self, model: Any, layers: Iterable[Any], batch_hint: int) -> int:
        """Pack the output head and every dense layer, releasing each dense weight's checkpoint
        pages as its packed copy is made, then the checkpoint itself (see :mod:`.memory`).

        The head and the embedding table go first: an fp32 table's pages are read to pack the
        head and to narrow the lookups, and released right after, before the layers' packed
        copies exist. Measured in-process on the embedded model (fp32 checkpoint, VmHWM after
        loading): bf16 oneDNN 918 -> 824 MiB, bf16 dense (the AVX2 path, whose head also shares the
        lookups' table) 891 -> 733 MiB, int8 808 -> 707 MiB.
        """
        dtype = self.weight_dtype
        mappings = memory.file_mappings()
        layers = list(layers)
        table = model.get_input_embeddings().weight
        packed = int(pack_output_head(model, batch_hint, dtype, self.io_dtype))
        released = 0
        if (packed or any(can_pack(layer.base) for layer in layers)) and dtype in (torch.bfloat16, torch.int8):
            # The embedding table is read a row per token: bf16 halves it (int8 weights are the
            # products', where blocks of 32 share a scale; a lookup table gains little from that).
            narrow_input_embeddings(model, torch.bfloat16)
        if model.get_input_embeddings().weight.data_ptr() != table.data_ptr():  # narrowed, or shared with the head
            released += memory.drop_file_pages(table, mappings)  # neither the head nor the lookups read it now
        del table
        for layer in layers:
            dense = layer.base.weight
            if layer.pack(batch_hint, dtype, self.io_dtype):
                packed += 1
                released += memory.drop_file_pages(dense, mappings)
            del dense
        if packed:
            copy_unpacked_weights(model, mappings)
        memory.trim_heap()
        logger.debug("packed %d layers in %s, released %d MiB of checkpoint pages", packed, dtype, released >> 20)
        return packed


def select_backend(
    device: torch.device,
    compute_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    max_rank: int,
    choice: str | None = None,
    weight_dtype: str = "auto",
) -> Backend:
    """The backend for a model on ``device``: ``choice``, else ``$LORA_KIT_ENGINE_BACKEND``, else by platform.

    ``weight_dtype`` (``auto``, ``float32``, ``bfloat16``, ``int8``) is the CPU backend's packing dtype
    for an fp32 model's dense weights (see :class:`~lora_kit.engine.config.EngineConfig`); the
    torch backend leaves the weights as loaded. Building the BGMV kernel (the first time on a
    machine) happens here, for the CPU backend.
    """
    if backend_choice(device, choice) == "torch":
        return TorchBackend()
    if device.type != "cpu":
        raise ValueError(f"the cpu backend serves models on the CPU, not on {device.type}")
    return CpuBackend(
        _cpu_kernel(compute_dtype, adapter_dtype, max_rank), _packing_dtype(compute_dtype, weight_dtype), compute_dtype
    )


def backend_choice(device: torch.device, choice: str | None = None) -> str:
    """``cpu`` or ``torch``: ``choice``, else ``$LORA_KIT_ENGINE_BACKEND``, else by ``device``."""
    choice = (choice or os.environ.get(ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "auto":
        return "cpu" if device.type == "cpu" else "torch"
    return choice


def _packing_dtype(compute_dtype: torch.dtype, weight_dtype: str) -> torch.dtype:
    """The dtype the CPU backend packs dense weights in (only an fp32 model's can be narrowed)."""
    if compute_dtype != torch.float32 or weight_dtype == "float32":
        return compute_dtype
    if weight_dtype == "bfloat16":
        return torch.bfloat16
    if weight_dtype == "int8":
        return torch.int8
    return torch.bfloat16 if native_bf16() else torch.float32


def _cpu_kernel(compute_dtype: torch.dtype, adapter_dtype: torch.dtype, max_rank: int) -> Callable[..., None] | None:
    """The BGMV op, when it can add this engine's rows (it reads fp32 activations, fp32 or bf16
    adapters and ranks up to ``MAX_RANK``) and loads here; else None."""
    fits = (
        compute_dtype == torch.float32
        and adapter_dtype in (torch.float32, torch.bfloat16)
        and max_rank <= bgmv.MAX_RANK
    )
    return bgmv.op() if fits and bgmv.load() else None


__all__ = ["CHOICES", "ENV", "Backend", "CpuBackend", "TorchBackend", "backend_choice", "select_backend"]
