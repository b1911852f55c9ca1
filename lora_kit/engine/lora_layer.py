"""The batched LoRA forward: every row of a batch runs with its own adapter in one pass.

Each target ``nn.Linear`` (or bitsandbytes ``Linear4bit``, a subclass) of the base is
replaced by a :class:`BatchedLoraLinear` that computes ``base(x)`` once for the whole batch
and adds ``x @ A[slot]^T @ B[slot]^T`` per row, each row's A/B taken from stacked slot
tensors by slot index (the BGMV idea) instead of a Python loop over adapters: on the CPU
by one kernel call per module, elsewhere by batched matrix products. Rows without an
adapter, and slots that do not target a module, add exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_kit.engine.backends.packed_linear import can_pack, make_packed

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# What one row of a batch runs with: None (the base), a slot (one adapter at its own scale), or
# a weighted mix: ((slot, weight), ...), each adapter's delta multiplied by its weight.
RowAdapters = int | tuple[tuple[int, float], ...] | None


class LoraContext:
    """What the next forward pass needs to know: each row's slot(s), shared by all wrapped layers.

    ``active`` is the set of slots any row uses (empty: the base runs untouched). Rows of single
    adapters: ``slot_index`` (B,) holds each row's slot, rows without an adapter pointing at the
    all-zero slot (torch path), and ``row_slots`` (B,) the same with -1 for those rows (the kernel
    skips them). When any row carries a weighted mix, ``mix_slots`` (B, K) holds every row's slots
    (-1 padded) and ``mix_scales`` (B, K) fp32 their weights (0 padded), K the most adapters of
    a row, and ``slot_index``/``row_slots`` are None. ``version`` changes whenever the rows or the
    slots' contents change, so layers may reuse what they derived from them. ``kernel`` and
    ``mix_kernel``: the backend's LoRA ops (the CPU BGMV kernel, :mod:`lora_kit.engine.backends.bgmv`);
    None runs torch's products.
    """

    def __init__(self) -> None:
        self.slot_index: torch.Tensor | None = None
        self.row_slots: torch.Tensor | None = None
        self.mix_slots: torch.Tensor | None = None
        self.mix_scales: torch.Tensor | None = None
        self.zero_slot = 0
        self.active: frozenset[int] = frozenset()
        self.single: int | None = None  # the one slot when every row uses the same adapter
        self.version = 0
        self.kernel: Callable[..., None] | None = None
        self.mix_kernel: Callable[..., None] | None = None

    def set_rows(self, rows: list[RowAdapters], zero_slot: int, device: torch.device) -> None:
        """Set what each row runs with (see :data:`RowAdapters`) for the following forwards."""
        self.version += 1
        self.zero_slot = zero_slot
        self.slot_index, self.row_slots, self.mix_slots, self.mix_scales, self.single = None, None, None, None, None
        if any(isinstance(r, tuple) for r in rows):
            self._set_mixes(rows, device)
            return
        slots: list[int | None] = rows  # type: ignore[assignment]
        active = frozenset(s for s in slots if s is not None)
        self.active = active
        if not active:
            return
        self.single = next(iter(active)) if len(active) == 1 and None not in slots else None
        self.slot_index = torch.tensor([zero_slot if s is None else s for s in slots], dtype=torch.long, device=device)
        self.row_slots = torch.tensor([-1 if s is None else s for s in slots], dtype=torch.long, device=device)

    def _set_mixes(self, rows: list[RowAdapters], device: torch.device) -> None:
        pairs = [() if r is None else ((r, 1.0),) if isinstance(r, int) else r for r in rows]
        width = max(len(p) for p in pairs)
        slots = [[s for s, _ in p] + [-1] * (width - len(p)) for p in pairs]
        scales = [[float(w) for _, w in p] + [0.0] * (width - len(p)) for p in pairs]
        self.active = frozenset(s for p in pairs for s, _ in p)
        self.mix_slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.mix_scales = torch.tensor(scales, dtype=torch.float32, device=device)

    def invalidate(self) -> None:
        """The slots' contents changed: what layers derived from them (gathered weights) is stale."""
        self.version += 1


class BatchedLoraLinear(nn.Module):
    """A base linear layer plus the stacked LoRA weights of every resident adapter.

    ``lora_A``: (slots + 1, rank, in) and ``lora_B``: (slots + 1, rank, out), i.e. PEFT's A as
    it is and its B transposed, the LoRA scale folded into B; the last slot is all zeros. Filled by
    :class:`~lora_kit.engine.slots.SlotManager`.

    On the CPU (fp32 activations, inference) one call of the BGMV kernel adds every row's
    LoRA in place, reading each row's A and B straight from the stacks. Elsewhere (CUDA,
    bf16 activations, no compiler) torch does it: plain matmuls when every row shares one
    adapter, else each row's A/B gathered once per change of rows and two ``bmm``.
    Timed alone on the CPU (``scripts/bench_bgmv.py``), the kernel reads the adapters as fast
    as a ``sum()`` over the same bytes. On the torch path, grouping rows per adapter, or
    concatenating the batch's adapters into one masked LoRA, were slower than gathering per row.
    """

    def __init__(self, base: nn.Module, name: str, ctx: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.ctx = ctx
        # Plain attributes, not buffers: the slots are serving state, not model weights.
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None
        self.slots_with: set[int] = set()
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._own_slots: tuple[int, torch.Tensor] | None = None
        self._mix_gathered: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ctx = self.ctx
        if not ctx.active or self.lora_A is None or self.slots_with.isdisjoint(ctx.active):
            return out
        if ctx.mix_slots is not None:
            return self._forward_mix(x, out)
        lora_a, lora_b = self.lora_A, self.lora_B
        assert lora_b is not None
        grad = torch.is_grad_enabled()
        kernel = ctx.kernel
        if kernel is not None and not grad:
            # The kernel takes contiguous tensors only; a strided base output is copied once rather
            # than sent to the torch path, whose gathered adapter copies would stay held.
            out, x = out.contiguous(), x.contiguous()
            kernel(out, x, lora_a, lora_b, self._kernel_slots())  # every token of a row: the row's slot
            return out
        lx = x.to(lora_a.dtype)
        # Accumulate in place into the base output (a fresh tensor) when dtypes agree:
        # fused multiply-adds, no extra allocation per layer.
        inplace = out.dtype == lora_a.dtype and out.is_contiguous() and not grad
        if ctx.single is not None:
            # Every row uses one adapter: plain matmuls, no gather.
            h = lx.reshape(-1, self.in_features) @ lora_a[ctx.single].t()  # (B*T, r)
            if inplace:
                out.view(-1, self.out_features).addmm_(h, lora_b[ctx.single])
                return out
            return out + (h @ lora_b[ctx.single]).view(out.shape).to(out.dtype)
        rows = x.shape[0]
        a_rows, b_rows = self._rows_weights()
        h = torch.bmm(lx.reshape(rows, -1, self.in_features), a_rows.transpose(1, 2))  # (B, T, r)
        if inplace:
            out.view(rows, -1, self.out_features).baddbmm_(h, b_rows)
            return out
        return out + torch.bmm(h, b_rows).view(out.shape).to(out.dtype)

    def _forward_mix(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add each row's weighted sum of adapter deltas: ``sum_k w_k * (x @ A[s_k]^T) @ B[s_k]``."""
        ctx = self.ctx
        assert self.lora_A is not None and self.lora_B is not None and ctx.mix_scales is not None
        kernel = ctx.mix_kernel
        if kernel is not None and not torch.is_grad_enabled():
            out, x = out.contiguous(), x.contiguous()
            kernel(out, x, self.lora_A, self.lora_B, self._kernel_mix_slots(), ctx.mix_scales)
            return out
        rows = x.shape[0]
        a_rows, b_rows, weights = self._mix_weights()  # (B, K*r, in), (B, K*r, out), (B, 1, K*r)
        lx = x.to(a_rows.dtype).reshape(rows, -1, self.in_features)
        h = torch.bmm(lx, a_rows.transpose(1, 2)) * weights  # (B, T, K*r)
        return out + torch.bmm(h, b_rows).view(out.shape).to(out.dtype)

    def _kernel_mix_slots(self) -> torch.Tensor:
        """The rows' (B, K) slots for the kernel, -1 where that adapter does not target this module."""
        assert self.ctx.mix_slots is not None
        return self._own_slots_of(self.ctx.mix_slots)

    def _mix_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's K adapters side by side along the rank (torch path): A (B, K*r, in), B (B, K*r,
        out), and the weight of each rank column (B, 1, K*r); gathered once per change of rows.
        Padding entries point at the all-zero slot with weight 0."""
        ctx = self.ctx
        cached = self._mix_gathered
        if cached is not None and cached[0] == ctx.version:
            return cached[1], cached[2], cached[3]
        assert self.lora_A is not None and self.lora_B is not None
        assert ctx.mix_slots is not None and ctx.mix_scales is not None
        rows, width = ctx.mix_slots.shape
        rank = self.lora_A.shape[1]
        flat = torch.where(ctx.mix_slots < 0, ctx.zero_slot, ctx.mix_slots).reshape(-1)
        a_rows = self.lora_A.index_select(0, flat).reshape(rows, width * rank, self.in_features)
        b_rows = self.lora_B.index_select(0, flat).reshape(rows, width * rank, self.out_features)
        weights = ctx.mix_scales.repeat_interleave(rank, dim=1).to(self.lora_A.dtype).unsqueeze(1)
        self._mix_gathered = (ctx.version, a_rows, b_rows, weights)
        return a_rows, b_rows, weights

    def _kernel_slots(self) -> torch.Tensor:
        """Each row's slot for the kernel: -1 for rows whose adapter does not target this module."""
        assert self.ctx.row_slots is not None
        return self._own_slots_of(self.ctx.row_slots)

    def _own_slots_of(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots`` with -1 for the adapters that do not target this module (they read nothing);
        derived once per change of the rows."""
        ctx = self.ctx
        if ctx.active <= self.slots_with:
            return slots
        cached = self._own_slots
        if cached is None or cached[0] != ctx.version:
            targets = torch.tensor(sorted(self.slots_with), dtype=torch.long, device=slots.device)
            cached = self._own_slots = (ctx.version, torch.where(torch.isin(slots, targets), slots, -1))
        return cached[1]

    def _rows_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (B, r, in) and B (B, r, out) of each row's slot, gathered once per change of the
        batch's rows (torch path). ``bmm`` takes A transposed as a view: measured on the CPU,
        that is faster than a contiguous (B, in, r) copy (3.8 vs 8.7 us at 8 x 576 x 8) and
        spares the gather a transposing copy."""
        ctx = self.ctx
        cached = self._gathered
        if cached is not None and cached[0] == ctx.version:
            return cached[1], cached[2]
        assert self.lora_A is not None and self.lora_B is not None and ctx.slot_index is not None
        a_rows = self.lora_A.index_select(0, ctx.slot_index)
        b_rows = self.lora_B.index_select(0, ctx.slot_index)
        self._gathered = (ctx.version, a_rows, b_rows)
        return a_rows, b_rows

    # -- slot contents (written by SlotManager under the runner's model lock) --------------

    def write_slot(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None, slots: int, rank: int) -> None:
        """Hold an adapter's PEFT ``A`` (r, in) and scaled ``B`` (out, r) in ``slot``; ``pair`` None:
        the adapter does not target this layer (zeros). The stacks are allocated on the first
        write, as (``slots``, ``rank``, in) and (``slots``, ``rank``, out), in the adapter's dtype."""
        if pair is None:
            if self.lora_A is not None:
                self.lora_A[slot].zero_()
                self.lora_B[slot].zero_()  # type: ignore[index]
            self.slots_with.discard(slot)
            return
        a, b = pair
        if self.lora_A is None:
            self.lora_A = torch.zeros(slots, rank, self.in_features, dtype=a.dtype, device=a.device)
            self.lora_B = torch.zeros(slots, rank, self.out_features, dtype=b.dtype, device=b.device)
        assert self.lora_B is not None
        r = a.shape[0]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r] = a
        self.lora_B[slot, :r] = b.t()  # stored as B^T: (r, out)
        self.slots_with.add(slot)

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot`` (its adapter was evicted)."""
        if slot in self.slots_with:
            self.lora_A[slot].zero_()  # type: ignore[index]
            self.lora_B[slot].zero_()  # type: ignore[index]
            self.slots_with.discard(slot)

    def pad_rank(self, rank: int) -> None:
        """Re-pad the stacks to ``rank`` (zero rows/columns keep every adapter's result exact)."""
        if self.lora_A is None:
            return
        a, b = self.lora_A, self.lora_B
        assert b is not None
        new_a = a.new_zeros(a.shape[0], rank, a.shape[2])  # (slots, rank, in)
        new_b = b.new_zeros(b.shape[0], rank, b.shape[2])  # (slots, rank, out)
        new_a[:, : a.shape[1]] = a
        new_b[:, : b.shape[1]] = b
        self.lora_A, self.lora_B = new_a, new_b

    def pack(self, batch_hint: int, dtype: torch.dtype | None = None, io_dtype: torch.dtype | None = None) -> bool:
        """Run the base product with a oneDNN-packed weight, in ``dtype`` (default: the base's),
        taking and returning ``io_dtype`` (default: the base's) (the CPU backend; see
        ``backends.packed_linear``), when it can."""
        if not can_pack(self.base):
            return False
        self.base = make_packed(self.base, batch_hint, dtype, io_dtype)
        return True

    def extra_repr(self) -> str:
        rank = 0 if self.lora_A is None else self.lora_A.shape[1]
        return f"{self.name}: {self.in_features} -> {self.out_features}, padded rank {rank}"


def wrap_linear_layers(model: PreTrainedModel, ctx: LoraContext) -> dict[str, BatchedLoraLinear]:
    """Replace every linear layer of the base (except the output head) by a BatchedLoraLinear.

    Returns the wrapped layers by their module path (the path PEFT adapters name them by).
    Wrapping an already wrapped model returns its existing wrappers.
    """
    existing = {m.name: m for m in model.modules() if isinstance(m, BatchedLoraLinear)}
    if existing:
        return existing
    head = model.get_output_embeddings()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and name
    ]
    wrapped: dict[str, BatchedLoraLinear] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = BatchedLoraLinear(module, name, ctx)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
