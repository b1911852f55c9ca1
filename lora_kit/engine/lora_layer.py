"""The batched LoRA forward: every row of a batch runs with its own adapter in one pass.

Each target ``nn.Linear`` (or bitsandbytes ``Linear4bit``, a subclass) of the base is
replaced by a :class:`BatchedLoraLinear` that computes ``base(x)`` once for the whole batch
and adds ``x @ A[slot]^T @ B[slot]^T`` per row, with the rows' A/B gathered from stacked
slot tensors by slot index and two batched matrix products (the BGMV idea) instead of a
Python loop over adapters. Rows without an adapter, and slots that do not target a
module, point at zero weights and so add exactly zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class LoraContext:
    """What the next forward pass needs to know: each row's slot, shared by all wrapped layers.

    ``slot_index`` is None for a forward without any adapter row (the base runs untouched).
    ``version`` changes whenever the rows change, so layers may reuse their gathered weights.

    Two ways to run a mixed batch, picked once per change of rows:

    * per row (``slot_index``): every row gets a copy of its adapter's A/B; two ``bmm``.
      Exact work, but an adapter shared by k rows is read k times per step.
    * grouped (``group_rows``): rows are grouped by adapter, each adapter is read once and
      applied to its group with one ``bmm`` (groups zero-padded to the largest), the result
      is scattered back with ``index_add_``. Three more ops per layer, so it only pays when
      adapters are shared: on the CPU a decode step is bound by the bytes of weights read.
    """

    def __init__(self) -> None:
        self.slot_index: torch.Tensor | None = None
        self.active: frozenset[int] = frozenset()
        self.single: int | None = None  # the one slot when every row uses the same adapter
        self.group_slots: torch.Tensor | None = None  # (U,) the distinct slots, when grouped
        self.group_rows: torch.Tensor | None = None  # (U*G,) row of each group entry; padding -> the zero row
        self.group_targets: torch.Tensor | None = None  # (U*G,) row each entry adds into; padding -> row 0
        self.version = 0

    def set_rows(self, slots: list[int | None], zero_slot: int, device: torch.device) -> None:
        """Set the slot of each row (None = base model) for the following forwards."""
        active = frozenset(s for s in slots if s is not None)
        self.version += 1
        self.active = active
        self.group_slots = self.group_rows = self.group_targets = None
        if not active:
            self.slot_index, self.single = None, None
            return
        self.single = next(iter(active)) if len(active) == 1 and None not in slots else None
        self.slot_index = torch.tensor([zero_slot if s is None else s for s in slots], dtype=torch.long, device=device)
        if self.single is None:
            self._group(slots, device)

    def _group(self, slots: list[int | None], device: torch.device) -> None:
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot is not None:
                groups.setdefault(slot, []).append(row)
        members = sum(len(g) for g in groups.values())
        width = max(len(g) for g in groups.values())
        # Grouping pays when an adapter serves two rows or more on average, and padding
        # the groups to one width does not double the rows the LoRA products run on.
        if len(groups) * 2 > members or len(groups) * width > 2 * members:
            return
        pad_row = len(slots)  # the zero row the layer appends to its input
        rows: list[int] = []
        targets: list[int] = []
        for members_of in groups.values():
            extra = width - len(members_of)
            rows += members_of + [pad_row] * extra
            targets += members_of + [0] * extra  # a zero contribution: adds exactly 0.0
        self.group_slots = torch.tensor(list(groups), dtype=torch.long, device=device)
        self.group_rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.group_targets = torch.tensor(targets, dtype=torch.long, device=device)

    def clear(self) -> None:
        self.set_rows([], 0, torch.device("cpu"))


class BatchedLoraLinear(nn.Module):
    """A base linear layer plus the stacked LoRA weights of every resident adapter.

    ``lora_A``: (slots + 1, in, rank) and ``lora_B``: (slots + 1, rank, out), i.e. PEFT's A and B
    transposed, so a row gather is already in the layout ``bmm`` wants (a non-contiguous
    operand made ``bmm`` ~20x slower on the CPU). The LoRA scale is folded into B; the last
    slot is all zeros. Filled by :class:`~lora_kit.engine.slots.SlotManager`.
    """

    def __init__(self, base: nn.Linear, name: str, ctx: LoraContext) -> None:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ctx = self.ctx
        if ctx.slot_index is None or self.lora_A is None or self.slots_with.isdisjoint(ctx.active):
            return out
        lora_a, lora_b = self.lora_A, self.lora_B
        assert lora_b is not None
        lx = x.to(lora_a.dtype)
        # Accumulate in place into the base output (a fresh tensor) when dtypes agree:
        # fused multiply-adds, no extra allocation per layer; on the CPU these small ops
        # are dominated by per-call overhead, so fewer calls is what makes LoRA cheap.
        inplace = out.dtype == lora_a.dtype and out.is_contiguous() and not torch.is_grad_enabled()
        if ctx.single is not None:
            # Every row uses one adapter: plain matmuls, no gather.
            h = lx.reshape(-1, self.in_features) @ lora_a[ctx.single]  # (B*T, r)
            if inplace:
                out.view(-1, self.out_features).addmm_(h, lora_b[ctx.single])
                return out
            return out + (h @ lora_b[ctx.single]).view(out.shape).to(out.dtype)
        rows = x.shape[0]
        if ctx.group_rows is not None:
            return self._grouped(lx, out, rows)
        a_t, b_t = self._rows_weights()
        h = torch.bmm(lx.reshape(rows, -1, self.in_features), a_t)  # (B, T, r)
        if inplace:
            out.view(rows, -1, self.out_features).baddbmm_(h, b_t)
            return out
        return out + torch.bmm(h, b_t).view(out.shape).to(out.dtype)

    def _grouped(self, lx: torch.Tensor, out: torch.Tensor, rows: int) -> torch.Tensor:
        """Each distinct adapter once, over the rows that use it (see :class:`LoraContext`)."""
        ctx = self.ctx
        assert ctx.group_rows is not None and ctx.group_targets is not None
        a_g, b_g = self._rows_weights()  # (U, in, r), (U, r, out)
        groups = a_g.shape[0]
        x3 = lx.reshape(rows, -1, self.in_features)
        tokens = x3.shape[1]
        padded = torch.cat([x3, x3.new_zeros(1, tokens, self.in_features)])
        xg = padded.index_select(0, ctx.group_rows).view(groups, -1, self.in_features)
        y = torch.bmm(torch.bmm(xg, a_g), b_g).view(-1, tokens, self.out_features)
        delta = y.to(out.dtype)
        if out.is_contiguous() and not torch.is_grad_enabled():
            out.view(rows, tokens, self.out_features).index_add_(0, ctx.group_targets, delta)
            return out
        return out.view(rows, tokens, self.out_features).index_add(0, ctx.group_targets, delta).view(out.shape)

    def _rows_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A^T and B^T of each row's slot (or, grouped, of each distinct slot), gathered once
        per change of the batch's rows."""
        ctx = self.ctx
        cached = self._gathered
        if cached is not None and cached[0] == ctx.version:
            return cached[1], cached[2]
        assert self.lora_A is not None and self.lora_B is not None and ctx.slot_index is not None
        index = ctx.group_slots if ctx.group_slots is not None else ctx.slot_index
        a_t = self.lora_A.index_select(0, index)  # (B or U, in, r), contiguous
        b_t = self.lora_B.index_select(0, index)  # (B or U, r, out), contiguous
        self._gathered = (ctx.version, a_t, b_t)
        return a_t, b_t

    def drop_gathered(self) -> None:
        """Forget the gathered weights (slot contents changed)."""
        self._gathered = None

    def extra_repr(self) -> str:
        rank = 0 if self.lora_A is None else self.lora_A.shape[2]
        return f"{self.name}: {self.in_features} -> {self.out_features}, padded rank {rank}"


def wrap_linear_layers(model: "PreTrainedModel", ctx: LoraContext) -> dict[str, BatchedLoraLinear]:
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
