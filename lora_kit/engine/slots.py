"""Adapter slots: the A/B matrices of all resident adapters stacked per target module.

A slot holds one adapter. Stacks are padded to the largest rank loaded so far (smaller
ranks leave zero rows/columns, which add nothing). When every slot is taken, the least
recently used adapter with no running request and no pin is evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from lora_kit.engine.adapters import AdapterWeights
from lora_kit.engine.lora_layer import BatchedLoraLinear, LoraContext
from lora_kit.engine.types import EngineError

Loader = Callable[[str, Path], AdapterWeights]


class NoFreeSlot(EngineError):
    """Every slot holds an adapter that is running or pinned; the request waits."""


class SlotManager:
    """Loads adapters into slots of the wrapped layers; LRU eviction of idle adapters; pinning.

    Not thread-safe: the model runner (:class:`~lora_kit.engine.runner.ModelRunner`) calls it
    under its model lock, so no forward pass reads a stack while it is written.
    """

    def __init__(
        self,
        layers: dict[str, BatchedLoraLinear],
        ctx: LoraContext,
        max_slots: int,
        loader: Loader,
        on_evict: Callable[[str], object] | None = None,
    ) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.layers = layers
        self.ctx = ctx
        self.max_slots = max_slots
        self.zero_slot = max_slots  # the extra all-zero slot rows without an adapter point at
        self.loader = loader
        self.on_evict = on_evict  # told the key of every adapter leaving its slot (the prefix cache drops its blocks)
        self.rank = 0
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self._refs: dict[int, int] = {}
        self._pinned: set[int] = set()
        self._doomed: set[str] = set()  # dropped while running: evicted when their last request ends
        self._free = list(range(max_slots - 1, -1, -1))

    # -- queries -------------------------------------------------------------------------

    def resident(self) -> list[str]:
        """Keys of the adapters in slots, least recently used first."""
        return list(self._slot_of)

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
        self._doomed.discard(key)  # asked for again (a runtime load after an unload): it stays
        if slot is None:
            weights = self.loader(key, path)  # raises AdapterError before anything is evicted
            slot = self._take_slot()
            self._write(slot, weights)
            self._slot_of[key] = slot
        self._slot_of.move_to_end(key)
        if hold:
            self._refs[slot] = self._refs.get(slot, 0) + 1
        return slot

    def check(self, key: str, path: Path) -> None:
        """Load adapter ``key`` into a slot if one is free or idle, else load it only to validate it.

        Raises AdapterError when it does not fit; never waits and never holds the slot.
        """
        try:
            self.acquire(key, path, hold=False)
        except NoFreeSlot:
            self.loader(key, path)

    def release(self, slot: int) -> None:
        """One running request of ``slot`` is done."""
        count = self._refs.get(slot, 0) - 1
        if count > 0:
            self._refs[slot] = count
            return
        self._refs.pop(slot, None)
        if self._doomed:
            doomed = [key for key in self._doomed if self._slot_of.get(key) == slot]
            for key in doomed:
                self._doomed.discard(key)
                self.evict(key)

    def drop(self, key: str) -> bool:
        """Free adapter ``key``'s slot (a runtime unload): now if no request runs on it, else when
        the last one finishes (running requests keep their adapter). Unpins it. False if not resident."""
        slot = self._slot_of.get(key)
        if slot is None:
            return False
        self._pinned.discard(slot)
        if self._refs.get(slot):
            self._doomed.add(key)
        else:
            self.evict(key)
        return True

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
        if self.on_evict is not None:
            self.on_evict(key)
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

    def _write(self, slot: int, weights: AdapterWeights) -> None:
        if weights.rank > self.rank:
            self.rank = weights.rank
            for layer in self.layers.values():
                layer.pad_rank(self.rank)
        for name, layer in self.layers.items():
            layer.write_slot(slot, weights.modules.get(name), self.max_slots + 1, self.rank)
        self.ctx.invalidate()

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self._pinned.discard(slot)
        self.ctx.invalidate()
