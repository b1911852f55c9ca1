"""Automatic prefix caching: the KV of prompt prefixes, kept per adapter identity and reused at admission.

Requests repeat themselves: an application's system prompt, the earlier turns of a chat. The
keys and values a prompt's first tokens produce depend only on those tokens and on what the
forward ran with, so a later prompt that starts with the same tokens under the same adapter
can start its prefill where the cached part ends (vLLM's automatic prefix caching, SGLang's
RadixAttention, LoRAX's per-adapter variant do the same).

The cache holds full blocks of :data:`BLOCK_TOKENS` prompt tokens. A block is found by its
key ``(identity, parent block id, its tokens)``: the parent's id chains it to every token
before it, and the dict compares keys exactly, so a hit is never a hash collision. The
identity is what the forward ran with: ``()`` for the base, else each adapter's canonical
``name@version`` key with its weight in a mix (None alone), in the request's order. An adapter
changes q/k/v, so a block computed under one identity is never used for another: the base's
blocks serve every base request, a mix's only the same mix. When an adapter leaves its slot
(a runtime unload, or an LRU eviction whose reload might read other weights), every block of
an identity naming it is dropped.

Bounded by a byte budget with LRU eviction. A lookup touches the blocks it hits last-to-first,
so a chain's parents are always more recent than its children and eviction takes leaves
first; evicting a block evicts its descendants too (they could never be reached again).

Thread-safe: the engine loop looks up and inserts, any thread may drop an adapter's blocks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BLOCK_TOKENS = 16  # tokens per block: vLLM's default; a hit reuses whole blocks only

Identity = tuple[tuple[str, float | None], ...]  # () = the base
BlockKey = tuple[Identity, int, tuple[int, ...]]  # (identity, parent block id or -1, the block's tokens)


@dataclass(eq=False)
class Block:
    """``BLOCK_TOKENS`` positions of keys and values: ``kv`` is (layers, 2, kv_heads, BLOCK_TOKENS, head_dim)."""

    id: int
    key: BlockKey
    kv: torch.Tensor
    parent: Block | None
    children: list[Block] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class PrefixMatch:
    """The cached start of one prompt under ``identity``: its first ``blocks``, in order."""

    identity: Identity
    blocks: list[Block]

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK_TOKENS


@dataclass
class PrefixStats:
    """Counters since start (lookups, hits, tokens reused) and the cache's size now."""

    lookups: int = 0  # prompts looked up at prefill
    hits: int = 0  # of those, prompts that reused at least one block
    tokens_reused: int = 0  # prompt tokens not prefilled thanks to the cache
    blocks: int = 0
    bytes: int = 0
    budget_bytes: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """Blocks of prompt KV keyed by (adapter identity, the tokens so far); LRU within ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._blocks: OrderedDict[BlockKey, Block] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._next_id = 0
        self._bytes = 0
        self._stats = PrefixStats(budget_bytes=self.budget_bytes)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    # -- lookup and insertion (the engine loop) --------------------------------------------

    def match(self, identity: Identity, ids: list[int]) -> PrefixMatch:
        """The longest cached run of full blocks ``ids`` starts with under ``identity`` (touched
        as recently used, last block first)."""
        blocks: list[Block] = []
        parent = -1
        with self._lock:
            for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
                key = (identity, parent, tuple(ids[start : start + BLOCK_TOKENS]))
                block = self._blocks.get(key)
                if block is None:
                    break
                blocks.append(block)
                parent = block.id
            for block in reversed(blocks):  # parents end up more recent than their children
                self._blocks.move_to_end(block.key)
        return PrefixMatch(identity, blocks)

    def record(self, reused_tokens: int) -> None:
        """Count one prompt looked up at prefill, which reused ``reused_tokens`` tokens."""
        with self._lock:
            self._stats.lookups += 1
            self._stats.hits += reused_tokens > 0
            self._stats.tokens_reused += reused_tokens

    def insert(self, match: PrefixMatch, ids: list[int], kv_of: Callable[[int, int], torch.Tensor]) -> int:
        """Add the full blocks of ``ids`` after ``match``'s; ``kv_of(start, end)`` gives positions
        [start, end) as (layers, 2, kv_heads, end - start, head_dim). Returns the blocks added.

        Adds what the budget allows, first blocks first, evicting least recently used blocks
        but never ``match``'s own (a chain never evicts its own start)."""
        first, end = len(match.blocks), len(ids) // BLOCK_TOKENS
        if not self.enabled or first >= end:
            return 0
        start = first * BLOCK_TOKENS
        kv = kv_of(start, end * BLOCK_TOKENS)
        added = 0
        with self._lock:
            parent = match.blocks[-1] if match.blocks else None
            if parent is not None and self._blocks.get(parent.key) is not parent:
                return 0  # dropped since the lookup (its adapter left): nothing may chain to it
            keep = {id(b) for b in match.blocks}
            for n in range(first, end):
                key = (
                    match.identity,
                    parent.id if parent else -1,
                    tuple(ids[n * BLOCK_TOKENS : (n + 1) * BLOCK_TOKENS]),
                )
                existing = self._blocks.get(key)
                if existing is not None:  # another row of the same prefill added it first
                    parent = existing
                    keep.add(id(existing))
                    continue
                offset = (n - first) * BLOCK_TOKENS
                data = kv[:, :, :, offset : offset + BLOCK_TOKENS].clone()
                if not self._make_room(data.numel() * data.element_size(), keep):
                    break
                block = Block(self._next_id, key, data, parent)
                self._next_id += 1
                self._add(block)
                keep.add(id(block))
                parent = block
                added += 1
            while parent is not None:  # as in match: parents more recent than their children
                self._blocks.move_to_end(parent.key)
                parent = parent.parent
        return added

    # -- removal (any thread) --------------------------------------------------------------

    def drop_adapter(self, key: str) -> int:
        """Drop every block of an identity that names adapter ``key``; returns how many."""
        with self._lock:
            doomed = [b for b in self._blocks.values() if any(k == key for k, _ in b.key[0])]
            return sum(self._remove(b) for b in doomed)

    def clear(self) -> None:
        with self._lock:
            for block in list(self._blocks.values()):
                self._remove(block)

    def held(self) -> dict[Identity, int]:
        """Blocks held per adapter identity."""
        with self._lock:
            counts: dict[Identity, int] = {}
            for identity, _, _ in self._blocks:
                counts[identity] = counts.get(identity, 0) + 1
            return counts

    def stats(self) -> PrefixStats:
        with self._lock:
            s = self._stats
            return PrefixStats(
                s.lookups, s.hits, s.tokens_reused, len(self._blocks), self._bytes, self.budget_bytes, s.evicted_blocks
            )

    # -- internals (lock held) ---------------------------------------------------------------

    def _add(self, block: Block) -> None:
        self._blocks[block.key] = block
        self._bytes += block.nbytes
        if block.parent is not None:
            block.parent.children.append(block)

    def _make_room(self, nbytes: int, keep: set[int]) -> bool:
        """Evict least recently used blocks (with their descendants) until ``nbytes`` more fit,
        never one in ``keep`` nor an ancestor of one; False if they cannot fit."""
        if nbytes > self.budget_bytes:
            return False
        while self._bytes + nbytes > self.budget_bytes:
            victim = next((b for b in self._blocks.values() if not self._holds(b, keep)), None)
            if victim is None:
                return False
            self._stats.evicted_blocks += self._remove(victim)
        return True

    @staticmethod
    def _holds(block: Block, keep: set[int]) -> bool:
        """Whether ``block`` or one of its descendants is in ``keep``."""
        stack = [block]
        while stack:
            b = stack.pop()
            if id(b) in keep:
                return True
            stack.extend(b.children)
        return False

    def _remove(self, block: Block) -> int:
        """Remove ``block`` and its descendants (unreachable without it); how many went."""
        if self._blocks.get(block.key) is not block:
            return 0
        removed = 0
        stack = [block]
        while stack:
            b = stack.pop()
            if self._blocks.pop(b.key, None) is b:
                self._bytes -= b.nbytes
                removed += 1
            stack.extend(b.children)
            b.children = []
        if block.parent is not None and block in block.parent.children:
            block.parent.children.remove(block)
        return removed
