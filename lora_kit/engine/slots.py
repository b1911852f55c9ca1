"""Adapter slots: the A/B matrices of all resident adapters stacked per target module.

A slot holds one adapter. Stacks are padded to the largest rank loaded so far (smaller
ranks leave zero rows/columns, which add nothing). When every slot is taken, the least
recently used adapter with no running request and no pin is evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from lora_kit.engine.adapters import AdapterWeights
from lora_kit.engine.lora_layer import BatchedLoraLinear, LoraContext
from lora_kit.engine.types import EngineError

Loader = Callable[[str, Path], AdapterWeights]


class NoFreeSlot(EngineError):
    """Every slot holds an adapter that is running or pinned; the request waits."""


class SlotManager:
    """Loads adapters into slots of the wrapped layers; LRU eviction of idle adapters; pinning.

    Not thread-safe by itself: the engine calls it under its model lock, so no forward
    pass reads a stack while it is written.
    """

    def __init__(self, layers: dict[str, BatchedLoraLinear], ctx: LoraContext, max_slots: int, loader: Loader) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.layers = layers
        self.ctx = ctx
        self.max_slots = max_slots
        self.zero_slot = max_slots  # the extra all-zero slot rows without an adapter point at
        self.loader = loader
        self.rank = 0
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self._refs: dict[int, int] = {}
        self._pinned: set[int] = set()
        self._free = list(range(max_slots - 1, -1, -1))
        self.lock = threading.RLock()

    # -- queries -------------------------------------------------------------------------

    def resident(self) -> list[str]:
        """Keys of the adapters in slots, least recently used first."""
        return list(self._slot_of)

    def slot_of(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def can_acquire(self, key: str) -> bool:
        """Whether :meth:`acquire` would succeed without waiting for a running request."""
        return key in self._slot_of or bool(self._free) or self._victim() is not None

    # -- acquire / release ---------------------------------------------------------------

    def acquire(self, key: str, path: Path, hold: bool = True) -> int:
        """The slot of adapter ``key``, loading it from ``path`` first if needed.

        With ``hold`` the slot is counted as used by a running request until :meth:`release`.
        Raises NoFreeSlot when every slot is busy, AdapterError when the adapter does not fit.
        """
        slot = self._slot_of.get(key)
        if slot is None:
            weights = self.loader(key, path)  # raises AdapterError before anything is evicted
            slot = self._take_slot()
            self._write(slot, weights)
            self._slot_of[key] = slot
        self._slot_of.move_to_end(key)
        if hold:
            self._refs[slot] = self._refs.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        """One running request of ``slot`` is done."""
        count = self._refs.get(slot, 0) - 1
        if count > 0:
            self._refs[slot] = count
        else:
            self._refs.pop(slot, None)

    def pin(self, key: str) -> None:
        """Never evict adapter ``key`` (it must be resident)."""
        self._pinned.add(self._slot_of[key])

    def evict(self, key: str) -> bool:
        """Drop an idle, unpinned adapter from its slot; False if it is busy or pinned."""
        slot = self._slot_of.get(key)
        if slot is None or self._refs.get(slot) or slot in self._pinned:
            return False
        self._clear(slot)
        del self._slot_of[key]
        self._free.append(slot)
        return True

    # -- internals -----------------------------------------------------------------------

    def _victim(self) -> str | None:
        for key, slot in self._slot_of.items():  # least recently used first
            if not self._refs.get(slot) and slot not in self._pinned:
                return key
        return None

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        victim = self._victim()
        if victim is None:
            raise NoFreeSlot(f"all {self.max_slots} adapter slots are in use by running or pinned adapters")
        self.evict(victim)
        return self._free.pop()

    def _grow(self, rank: int) -> None:
        """Re-pad every allocated stack to ``rank`` (zeros keep the old adapters' results exact)."""
        for layer in self.layers.values():
            if layer.lora_A is None:
                continue
            a, b = layer.lora_A, layer.lora_B
            assert b is not None
            new_a = a.new_zeros(a.shape[0], rank, a.shape[2])  # (slots, rank, in)
            new_b = b.new_zeros(b.shape[0], rank, b.shape[2])  # (slots, rank, out)
            new_a[:, : a.shape[1]] = a
            new_b[:, : b.shape[1]] = b
            layer.lora_A, layer.lora_B = new_a, new_b
        self.rank = rank

    def _write(self, slot: int, weights: AdapterWeights) -> None:
        if weights.rank > self.rank:
            self._grow(weights.rank)
        for name, layer in self.layers.items():
            pair = weights.modules.get(name)
            if pair is None:
                if layer.lora_A is not None:
                    layer.lora_A[slot].zero_()
                    layer.lora_B[slot].zero_()  # type: ignore[index]
                layer.slots_with.discard(slot)
                continue
            a, b = pair
            if layer.lora_A is None:
                slots = self.max_slots + 1
                layer.lora_A = torch.zeros(slots, self.rank, layer.in_features, dtype=a.dtype, device=a.device)
                layer.lora_B = torch.zeros(slots, self.rank, layer.out_features, dtype=b.dtype, device=b.device)
            assert layer.lora_B is not None
            r = a.shape[0]
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            layer.lora_A[slot, :r] = a  # PEFT's A is (r, in), B is (out, r)
            layer.lora_B[slot, :r] = b.t()
            layer.slots_with.add(slot)
        self.ctx.version += 1  # gathered per-row weights are stale now

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            if slot in layer.slots_with:
                layer.lora_A[slot].zero_()  # type: ignore[index]
                layer.lora_B[slot].zero_()  # type: ignore[index]
                layer.slots_with.discard(slot)
        self._pinned.discard(slot)
        self.ctx.version += 1
