"""Linear layers with weights pre-packed (oneDNN's layout, or lora-kit's tiles): the CPU decode step's matmuls, faster.

A decode step multiplies a few rows by every weight matrix. On the CPU, ``nn.Linear``
runs these skinny products at a fraction of memory bandwidth (measured on a 2-core AVX-512
VM: a 576 x 1536 fp32 weight times 8 rows, 9 GB/s of a 30 GB/s machine). oneDNN's linear
with the weight reordered once into its blocked layout (what PyTorch's Inductor does
when it freezes a CPU graph) runs the same product 2.5x faster, and the whole base-model
decode step of the embedded model ~1.8x faster, output head included.

The packed weight replaces the dense one (no second copy), except for an output head tied
to the input embeddings, which keeps the dense table for the embedding lookup. The results
differ from ``nn.Linear`` by float rounding only (another summation order, ~1e-6 relative);
the torch backend (:mod:`lora_kit.engine.backends`) keeps transformers' own kernels.

A weight may also be packed in bf16 (``dtype=torch.bfloat16``) under an fp32 model: half the
bytes per step, and on CPUs with AVX512-BF16 or AMX oneDNN multiplies bf16 natively
(measured on a 2-core Xeon VM with AMX, the embedded model's linears at 8 rows: 24-26 ms per
step against 46 ms in fp32). oneDNN sums the bf16 products in fp32 but takes and returns bf16:
the activations are rounded to bf16 on their way in and each product's result is rounded
to bf16 on its way out (as in a bf16 model's matmuls), then widened; the rest of the model --
norms, attention, the residual stream, the LoRA rows -- still computes in fp32.

On CPUs with AMX a bf16 weight is held instead in lora-kit's tiled layout (``csrc/bf16_tiles.cpp``:
(N / 16, K / 2, 16, 2), the VNNI pairs of 16 outputs): one or two rows take AVX512-BF16 dot
products, more rows AMX tiles; the activations are rounded to bf16 on their way in, as above, but
the results stay fp32 (one rounding fewer than oneDNN's). oneDNN pays a fixed ~15 us per call that
dominates the embedded model's small products; measured on a 2-core AMX Xeon VM, the tiled
products run 1.2-2.7x faster than oneDNN-packed ones at one row, 1.1-2.6x at 4 to 32 rows and
1.1-1.4x at a prefill's 256 (BENCHMARKS.md, issue 25).

Where oneDNN cannot handle bf16 (CPUs without AVX512: AVX2 machines), a bf16 weight is held
dense and multiplied, up to :data:`KERNEL_MAX_ROWS` rows, by lora-kit's kernel
(``csrc/wo_linear.cpp``: widened in registers, fp32 sums, each weight read once per call),
above that (prefill) by fp32 GEMM on widened blocks, and where the kernel could not be built
by torch's own bf16 product; all with the same roundings (bf16 in, fp32 sums, bf16 out). ``LORA_KIT_CPU_ISA=avx2`` makes any CPU
take the paths an AVX2 machine takes (no oneDNN bf16, no native bf16), and ``LORA_KIT_CPU_ISA=avx512``
those of an AVX-512 machine without AMX (oneDNN-packed bf16, no tiles), so they are tested and
measured on every machine.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_kit.engine.backends import bgmv
from lora_kit.engine.backends.memory import in_mappings
from lora_kit.widening import WideningEmbedding

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# A dense bf16 weight (no oneDNN bf16 here) times at least BLOCKED_MIN_ROWS rows is multiplied by
# blocks of WIDEN_BLOCK rows widened to fp32 (PackedLinear._widened_by_blocks); one row keeps
# torch's bf16 product, which reads the weight once already.
BLOCKED_MIN_ROWS = 2
WIDEN_BLOCK = 128
# Up to this many rows a dense bf16 weight takes lora-kit's kernel where built; above, the widened
# blocks (measured on an AVX2 EPYC at 14336 x 4096: 33 rows 30 ms against 45, a tie at 64, the
# blocks 3% ahead at 128).
KERNEL_MAX_ROWS = 64
# A tiled bf16 weight: up to this many rows take the AVX512-BF16 dot products, more AMX tiles
# (measured on a 2-core AMX Xeon VM: tiles from 3 rows on, e.g. 4 rows of 4096 x 4096 1.21 ms
# against 1.44 ms; at 1 row the dot products, 576 x 576 18 us against 29 us).
TILES_MAX_DOT_ROWS = 2
TILE_N, TILE_K = 16, 32  # a tiled weight's out and in features must be multiples of these
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ISA_ENV = "LORA_KIT_CPU_ISA"
ISA_CHOICES = ("auto", "avx512", "avx2")


def forced_isa() -> str:
    """``$LORA_KIT_CPU_ISA``: ``auto`` (unset: the CPU's own paths), ``avx512`` (an AVX-512 CPU's
    without AMX: no tiled weights) or ``avx2`` (an AVX2 CPU's: no oneDNN bf16, no native bf16).
    Read at each call: tests switch it."""
    isa = (os.environ.get(ISA_ENV) or "auto").strip().lower()
    if isa not in ISA_CHOICES:
        raise ValueError(f"{ISA_ENV} must be one of {', '.join(ISA_CHOICES)}, not {isa!r}")
    return isa


def forced_avx2() -> bool:
    """Whether ``$LORA_KIT_CPU_ISA`` asks for the AVX2 paths on this CPU."""
    return forced_isa() == "avx2"


@functools.cache
def _onednn_bf16_here() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_bf16() -> bool:
    """Whether oneDNN packs and multiplies bf16 weights here (natively or emulated: CPUs with
    AVX512), unless the AVX2 paths are forced."""
    return _onednn_bf16_here() and not forced_avx2()


@functools.cache
def _native_bf16_here() -> bool:
    flags = bgmv.cpu_flags().split()
    return any(flag in flags for flag in _NATIVE_BF16_FLAGS) and _onednn_bf16_here()


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where oneDNN's bf16
    products beat fp32 ones; without it they are emulated and slower than fp32."""
    return _native_bf16_here() and not forced_avx2()


@functools.cache
def _tiles_here() -> bool:
    return bgmv.load() and int(torch.ops.lora_kit.bf16_tiles_caps()) == 3


def tiles_bf16() -> bool:
    """Whether bf16 weights are held tiled here: lora-kit's kernel built with AVX512-BF16 and AMX,
    and the OS grants AMX, unless another CPU's paths are forced."""
    return forced_isa() == "auto" and _tiles_here()


def to_tiles(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (N, K) bf16 in the tiled layout (N / 16, K / 2, 16, 2), a copy."""
    n, k = weight.shape
    return weight.reshape(n // TILE_N, TILE_N, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def from_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """The (N, K) weight of a tiled one, a copy."""
    blocks, pairs = tiles.shape[:2]
    return tiles.permute(0, 2, 1, 3).reshape(blocks * TILE_N, pairs * 2)


def can_pack(layer: nn.Module) -> bool:
    """Whether ``layer`` is a dense CPU ``nn.Linear`` oneDNN can pack (4-bit layers are not)."""
    if type(layer) is not nn.Linear:  # bitsandbytes' Linear4bit subclasses nn.Linear
        return False
    weight = layer.weight
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES or weight.is_mkldnn:
        return False
    # A bf16 weight oneDNN cannot take here is held dense by PackedLinear (torch's bf16 product).
    return weight.dtype == torch.bfloat16 or torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout, in ``dtype`` (default: the
    layer's). Inference only. ``x`` and ``y`` keep the layer's dtype: with a bf16 weight under
    an fp32 layer, ``x`` is rounded to bf16 for the product and ``y`` widened back. A bf16
    weight is held tiled for lora-kit's kernel where the CPU has AMX (:func:`tiles_bf16`); one
    oneDNN cannot take here (:func:`onednn_bf16`) stays dense, multiplied by lora-kit's AVX2
    kernel or torch."""

    def __init__(
        self, layer: nn.Linear, batch_hint: int, dtype: torch.dtype | None = None, io_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        # A base loaded with bf16 linear weights under fp32 activations (models.load_model's
        # linear_dtype) passes its activations' dtype: the layer still takes and returns fp32.
        self.io_dtype = io_dtype or layer.weight.dtype
        weight = layer.weight.detach().to(dtype or self.io_dtype)
        self.tiled = (
            weight.dtype == torch.bfloat16
            and self.out_features % TILE_N == 0
            and self.in_features % TILE_K == 0
            and tiles_bf16()
        )
        self.onednn = not self.tiled and (weight.dtype != torch.bfloat16 or onednn_bf16())
        if self.tiled:
            weight = to_tiles(weight)
        elif self.onednn:
            # The layout is tuned for ``batch_hint`` rows; any row count works (measured: hints
            # of 8 and 32 run 1 to 32 rows equally well, a hint of 1 is 1.8x slower at 8 rows).
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        elif weight.data_ptr() == layer.weight.data_ptr():
            weight = weight.clone()  # a bf16 layer kept dense: its own copy, as a packed one would be
        self.weight = nn.Parameter(weight, requires_grad=False)
        bias = None if layer.bias is None else layer.bias.detach().to(weight.dtype)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._cast = weight.dtype != self.io_dtype
        # A tiled weight: lora-kit's kernel for every row count (csrc/bf16_tiles.cpp). A dense bf16
        # weight: lora-kit's AVX2 kernel for up to KERNEL_MAX_ROWS rows where it was built
        # (csrc/wo_linear.cpp: the weight widened in registers, same roundings as torch's product).
        # Both are one op that takes x as it comes and returns y (a decode step calls it ~200 times).
        self._tiles_op = torch.ops.lora_kit.bf16_tiles_linear.default if self.tiled else None
        self._kernel = None
        if self.held_dense and bgmv.load():
            self._kernel = torch.ops.lora_kit.wo_bf16_linear.default
        self._bias32 = None if self.bias is None else self.bias.detach().float()

    @property
    def held_dense(self) -> bool:
        """Whether the weight is held in the usual (out, in) layout."""
        return not (self.onednn or self.tiled)

    @property
    def layout(self) -> str:
        """How the weight is held and multiplied, in words (benchmarks print it)."""
        if self.onednn:
            return "oneDNN-packed"
        if self.tiled:
            return "tiled (AMX)"
        return "dense (kernel)" if self._kernel is not None else "dense (torch)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tiles_op is not None:
            y = self._tiles_op(x, self.weight, self._bias32, TILES_MAX_DOT_ROWS)
            return y if self.io_dtype == torch.float32 else y.to(self.io_dtype)
        if self._kernel is not None and x.numel() <= KERNEL_MAX_ROWS * self.in_features:
            y = self._kernel(x, self.weight, self._bias32, True)
            return y if self.io_dtype == torch.float32 else y.to(self.io_dtype)
        if self._cast:
            x = x.to(self.weight.dtype)
        if self.onednn:
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        elif x.numel() >= BLOCKED_MIN_ROWS * self.in_features and self.out_features >= 2 * WIDEN_BLOCK:
            y = self._widened_by_blocks(x)
        else:  # torch's bf16 product: fp32 sums, rounded to bf16 like oneDNN's
            y = nn.functional.linear(x, self.weight, self.bias)
        return y.to(self.io_dtype) if self._cast else y

    def _widened_by_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` for several rows of a dense bf16 weight without native bf16: each block of
        :data:`WIDEN_BLOCK` weight rows is widened to fp32 into a buffer that stays in cache and
        multiplied by fp32 GEMM. torch's own bf16 product is compute-bound there (measured at 7B
        on an AVX2 VM: 8 rows cost 8x one row, 20 s per decode step); this reads each weight once
        per step. Same roundings as the dense path: bf16 in, fp32 sums, bf16 out."""
        rows = x.reshape(-1, self.in_features).float()
        out_t = torch.empty(self.out_features, rows.shape[0], dtype=torch.float32)
        block = torch.empty(WIDEN_BLOCK, self.in_features, dtype=torch.float32)
        rows_t = rows.t()
        for start in range(0, self.out_features, WIDEN_BLOCK):
            stop = min(start + WIDEN_BLOCK, self.out_features)
            widened = block[: stop - start]
            widened.copy_(self.weight[start:stop])
            torch.mm(widened, rows_t, out=out_t[start:stop])
        y = out_t.t()
        if self.bias is not None:
            y = y + self.bias.float()
        # Contiguous, as every other path returns: the LoRA kernel adds into the output in place and
        # takes only contiguous ones (a transposed view sent the prefill's LoRA rows to torch's
        # gathered products, whose copies of every row's adapter then stayed held: 32 MiB for 8 rows).
        y = y.to(self.weight.dtype, memory_format=torch.contiguous_format)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight in the usual (out, in) layout (a copy)."""
        if self.tiled:
            return from_tiles(self.weight.detach())
        return self.weight.to_dense() if self.onednn else self.weight.detach().clone()

    def extra_repr(self) -> str:
        dtype = str(self.weight.dtype).removeprefix("torch.")
        held = self.layout
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {held} {dtype}"


def make_packed(
    layer: nn.Linear, batch_hint: int, dtype: torch.dtype | None = None, io_dtype: torch.dtype | None = None
) -> nn.Module:
    """``layer`` repacked for the CPU: in ``dtype`` int8, an :class:`~.int8_linear.Int8Linear`
    (weight-only int8 blocks), else a :class:`PackedLinear`."""
    if dtype == torch.int8:
        from lora_kit.engine.backends.int8_linear import Int8Linear

        return Int8Linear(layer, io_dtype)
    return PackedLinear(layer, batch_hint, dtype, io_dtype)


def pack_output_head(
    model: PreTrainedModel, batch_hint: int, dtype: torch.dtype | None = None, io_dtype: torch.dtype | None = None
) -> bool:
    """Replace the model's output head by a packed copy; False when it cannot be packed.

    A head tied to the input embeddings shares its table with the embedding lookup, which
    needs the dense layout: a oneDNN-packed head is a copy of its own (one more vocab x hidden
    matrix in memory); a head held dense in 16 bits (no oneDNN bf16 on this CPU) stays one table
    with the lookup, which widens the rows it reads. An untied head is packed in place.
    """
    head = model.get_output_embeddings()
    if head is None or not can_pack(head):
        return False
    embedding = model.get_input_embeddings()
    table = getattr(embedding, "weight", None)
    tied = table is not None and table.data_ptr() == head.weight.data_ptr()
    packed = make_packed(head, batch_hint, dtype, io_dtype)
    model.set_output_embeddings(packed)
    if tied and isinstance(packed, PackedLinear) and packed.held_dense and packed.weight.dtype != packed.io_dtype:
        # A dense 16-bit head (no oneDNN bf16 here) holds the table's rows in the layout a lookup
        # reads: the embedding takes its rows from it, one table for both (the same values a
        # narrowed copy would hold: both are the table rounded to bf16).
        model.set_input_embeddings(WideningEmbedding(embedding, packed.weight.dtype, packed.io_dtype, packed.weight))
    return True


def copy_unpacked_weights(model: nn.Module, mappings: list[tuple[int, int]]) -> None:
    """Give the parameters and buffers that stayed dense (embeddings, norms) and still live in
    the checkpoint's file ``mappings`` (see ``memory.file_mappings``) memory of their own.

    transformers maps the safetensors checkpoint into memory and the loaded tensors are views
    of that mapping; one surviving view keeps every page of the file that packing read
    resident (measured on the embedded model: 0.68 GiB of file pages next to the 0.5 GiB of
    packed weights). Copying the few dense tensors left lets the mapping go. Tensors already
    in memory of their own are left alone (a copy would only raise the peak).
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_mkldnn and in_mappings(tensor, mappings):
                tensor.data = tensor.data.clone()


def narrow_input_embeddings(model: PreTrainedModel, dtype: torch.dtype) -> bool:
    """Hold the input embeddings in ``dtype`` (lookups still return the model's dtype); False
    when they already are, or are no plain ``nn.Embedding``. Call after packing the output
    head: a tied head is packed from the full-precision table."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding or embedding.weight.dtype == dtype:
        return False
    model.set_input_embeddings(WideningEmbedding(embedding, dtype))
    return True
